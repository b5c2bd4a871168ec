"""The control page at `/`, driven in a real browser: Debian's Chromium, headless, with its fake
camera, through Playwright (the browser is the system's; Playwright never downloads one).

1. Starts the server over the tiny fixture (64x64, one ControlNet) on a loopback port.
2. The page loads only from the server (every request the browser makes stays on its origin),
   and every control has a label.
3. A denied camera: the banner says so and no stream is created (no POST /v1/streams is sent).
4. A wrong token: the banner shows the 401, nothing is published, the camera is released.
5. Start: "Waiting for the first frame" shows until the output <video> presents frames; then it
   plays (frames presented, currentTime advancing), and the output differs from the camera
   (both grabbed to canvases: the output is far from the camera, further than the camera is from
   itself a moment later).
6. Controls reach the engine (read back from GET /v1/streams/{id}/status): a prompt applied with
   Enter (last_params.prompt and params_version change), a weighted blend of two prompts, the
   creativity/quality sliders (t_index_list and num_inference_steps), the seed, the ControlNet
   scale; the status panel shows the engine's state and params version.
7. Stop deletes the stream (GET /v1/streams/{id} -> 404); so do a reload and closing the tab.
8. The same page against Daydream's answer shapes (the server's answers rewritten in the browser:
   the {success, data} envelope, errors with a code, the WHEP address only in the status's
   gateway_status, the status in Daydream's vocabulary): a wrong token, play, a prompt, Stop.
9. SIGTERM: the server exits 0.

Screenshots go to WORK/screens (PNG). Waits are bounded only so that a broken run ends; no check
depends on how fast anything is.

usage: page_e2e.py --server BIN --fixtures DIR --work DIR [--chromium /usr/bin/chromium]
Exits non-zero on any failed check; prints a JSON summary.
"""

import json
import os
import re
import sys
import time

from playwright.sync_api import sync_playwright

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from server_harness import CHECKS, FAILURES, api, arguments, check, finish, serve, unwrap  # noqa: E402

TOKEN = "browser-e2e-token"

# Chromium as root in this sandbox (see the machine notes): no sandbox, no GPU, and none of the
# background connections a closed network refuses.
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
FAKE_CAMERA = ["--use-fake-device-for-media-stream"]
ALLOW_CAMERA = ["--use-fake-ui-for-media-stream"]
DENY_CAMERA = ["--deny-permission-prompts"]

# Liveness bounds (seconds): a broken run fails instead of hanging.
LOAD_WAIT = 120
WAIT = 30


def status_of(base, stream_id):
    """(state, last_params, params_version or hash) from the status, in either vocabulary."""
    code, st = api(base, "GET", f"/v1/streams/{stream_id}/status")
    st = unwrap(st)
    if code != 200 or not isinstance(st, dict):
        return None, {}, None
    inf = st.get("inference_status") or {}
    params = inf.get("last_params") or st.get("last_params") or {}
    version = st.get("params_version", inf.get("params_version", (st.get("engine") or {}).get("params_version")))
    if version is None:
        version = st.get("last_params_hash") or inf.get("last_params_hash")
    return st.get("state") or inf.get("state"), params, version


def wait_until(fn, timeout=WAIT, every=0.2, page=None):
    """fn()'s first truthy value, or the last one when the bound runs out. With `page`, waits in
    the page: Playwright's sync API delivers the browser's events (requests seen) only while one
    of its calls runs."""
    end = time.monotonic() + timeout
    value = fn()
    while not value and time.monotonic() < end:
        if page is None:
            time.sleep(every)
        else:
            page.wait_for_timeout(every * 1000)
        value = fn()
    return value


def start_server(args):
    return serve(args.server, TOKEN, os.path.abspath(args.fixtures),
                 params={"seed": 42, "guidance_scale": 3.0,
                         "controlnets": [{"model_id": "tiny-controlnet-a", "conditioning_scale": 0.5}]},
                 allow=("tiny-sd-turbo", "tiny-controlnet-a"), flags=["--connect-timeout", 5],
                 log_path=os.path.join(args.work, "server.log"))


# Records, in order, what the output overlay says and whether it is shown.
OVERLAY_LOG = """
window.__overlay = [];
document.addEventListener("DOMContentLoaded", () => {
  const box = document.getElementById("output-overlay");
  const main = document.getElementById("overlay-main");
  const note = () => {
    const last = window.__overlay[window.__overlay.length - 1];
    const now = { text: main.textContent, hidden: box.hidden, at: performance.now() };
    if (!last || last.text !== now.text || last.hidden !== now.hidden) window.__overlay.push(now);
  };
  note();
  new MutationObserver(note).observe(box, { attributes: true, childList: true, characterData: true, subtree: true });
});
"""

# Frames presented by the output <video> over the next `n` callbacks, its size and time.
PRESENTED = """
async (n) => {
  const v = document.getElementById("output");
  const t0 = v.currentTime;
  const count = await new Promise((done) => {
    let c = 0;
    const each = () => { c += 1; if (c >= n) done(c); else v.requestVideoFrameCallback(each); };
    v.requestVideoFrameCallback(each);
    setTimeout(() => done(c), 30000);
  });
  return { count, width: v.videoWidth, height: v.videoHeight, t0, t1: v.currentTime };
}
"""

# Both videos drawn at 64x64: mean absolute difference of output vs camera, of the camera vs a
# grab of itself `gap_ms` later, and each picture's mean and standard deviation (RGB).
PIXELS = """
async (gapMs) => {
  const grab = (id) => {
    const c = document.createElement("canvas");
    c.width = 64; c.height = 64;
    const g = c.getContext("2d", { willReadFrequently: true });
    g.drawImage(document.getElementById(id), 0, 0, 64, 64);
    return g.getImageData(0, 0, 64, 64).data;
  };
  const stats = (a) => {
    let s = 0, s2 = 0, n = 0;
    for (let i = 0; i < a.length; i += 4) for (let k = 0; k < 3; k++) { s += a[i + k]; s2 += a[i + k] ** 2; n++; }
    const mean = s / n;
    return { mean, std: Math.sqrt(Math.max(0, s2 / n - mean * mean)) };
  };
  const diff = (a, b) => {
    let d = 0, n = 0;
    for (let i = 0; i < a.length; i += 4) for (let k = 0; k < 3; k++) { d += Math.abs(a[i + k] - b[i + k]); n++; }
    return d / n;
  };
  const cam = grab("camera"), out = grab("output");
  await new Promise((r) => setTimeout(r, gapMs));
  const camLater = grab("camera");
  return { outVsCam: diff(out, cam), camVsCam: diff(cam, camLater), cam: stats(cam), out: stats(out) };
}
"""


class Requests:
    """Every request the browser makes, as (method, url)."""

    def __init__(self):
        self.seen = []

    def attach(self, page):
        page.on("request", lambda r: self.seen.append((r.method, r.url)))

    def count(self, method, path_part):
        return sum(1 for m, u in self.seen if m == method and path_part in u)


def open_page(context, base, requests, token):
    # Element look-ups wait this long (ms) for an element before the scenario fails.
    context.set_default_timeout(10000)
    page = context.new_page()
    requests.attach(page)
    page.add_init_script(OVERLAY_LOG)
    page.goto(base + "/")
    page.fill("#token", token)
    return page


def banner(page):
    return page.evaluate("() => document.getElementById('banner').hidden ? '' : document.getElementById('banner').innerText")


def stream_id(page):
    text = (page.text_content("#st-id") or "").strip()
    return text if text and text != "–" else None


def gone(base, sid):
    return api(base, "GET", f"/v1/streams/{sid}")[0] == 404


def shot(page, args, name):
    path = os.path.join(args.work, "screens", name + ".png")
    page.screenshot(path=path, full_page=True)
    return path


def scenario_static(browser, base, args, requests, summary):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = open_page(context, base, requests, TOKEN)
    unlabeled = page.evaluate("""() => [...document.querySelectorAll('input, textarea, button')].filter((el) =>
        el.tagName === 'BUTTON' ? !(el.textContent.trim() || el.getAttribute('aria-label'))
                                : !(el.labels && el.labels.length) && !el.getAttribute('aria-label')).map((el) => el.id)""")
    check(unlabeled == [], f"every input, text box and button has a label (unlabeled: {unlabeled})")
    check(page.text_content("#overlay-main") == "Press Start to begin", "idle page says 'Press Start to begin'")
    summary["screens"].append(shot(page, args, "01-idle"))
    context.close()


def scenario_denied(playwright, base, args, requests, summary):
    browser = playwright.chromium.launch(executable_path=args.chromium, headless=True,
                                         args=CHROMIUM_FLAGS + FAKE_CAMERA + DENY_CAMERA)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = open_page(context, base, requests, TOKEN)
    posts_before = requests.count("POST", "/v1/streams")
    page.click("#start")
    text = wait_until(lambda: banner(page))
    check("camera" in text.lower() and "denied" in text.lower(), f"denied camera: the banner says so ({text!r})")
    page.wait_for_timeout(500)  # lets the browser's request events in (see wait_until)
    check(requests.count("GET", base + "/") > 0 and requests.count("POST", "/v1/streams") == posts_before,
          "denied camera: no POST /v1/streams was sent")
    check(page.is_enabled("#start") and not page.is_enabled("#stop"), "denied camera: Start is offered again")
    summary["screens"].append(shot(page, args, "02-camera-denied"))
    browser.close()


def scenario_wrong_token(browser, base, args, requests, summary):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = open_page(context, base, requests, "not-the-token")
    posts_before = requests.count("POST", "/v1/streams")
    page.click("#start")
    text = wait_until(lambda: banner(page))
    check("401" in text and "token" in text.lower(), f"wrong token: the banner shows the 401 ({text!r})")
    page.wait_for_timeout(500)  # lets the browser's request events in (see wait_until)
    check(requests.count("POST", "/v1/streams") == posts_before + 1 and requests.count("POST", "/whip/") == 0,
          "wrong token: one refused create, nothing published over WHIP")
    released = page.evaluate("() => !document.getElementById('camera').srcObject")
    check(released, "wrong token: the camera is released")
    check(page.evaluate("() => document.body.dataset.phase") == "idle", "wrong token: the page is back to idle")
    summary["screens"].append(shot(page, args, "03-wrong-token"))
    context.close()


def start_stream(page, base):
    page.click("#start")
    sid = wait_until(lambda: stream_id(page))
    check(bool(sid), f"Start created a stream ({sid})")
    return sid


def scenario_session(browser, base, args, requests, summary):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = open_page(context, base, requests, TOKEN)
    sid = start_stream(page, base)
    if not sid:
        return
    summary["stream"] = sid
    code, stream = api(base, "GET", f"/v1/streams/{sid}")
    check(code == 200, f"GET /v1/streams/{{id}} finds the page's stream: {code}")
    both = wait_until(lambda: requests.count("POST", f"/whip/{sid}") == 1 and requests.count("POST", f"/whep/{sid}") == 1,
                      page=page)
    check(bool(both), "the page published (WHIP) and asked to play (WHEP) once each")

    playing = wait_until(lambda: page.evaluate("() => document.body.dataset.phase") == "playing", timeout=LOAD_WAIT)
    check(playing, "the output plays (phase 'playing')")
    overlay = page.evaluate("() => window.__overlay")
    waiting = [i for i, o in enumerate(overlay) if "Waiting for the first frame" in o["text"] and not o["hidden"]]
    hidden = [i for i, o in enumerate(overlay) if o["hidden"]]
    check(bool(waiting) and bool(hidden) and waiting[0] < hidden[-1],
          f"'Waiting for the first frame' showed before the first frame hid it ({len(overlay)} overlay states)")
    summary["overlay"] = [o["text"] + (" (hidden)" if o["hidden"] else "") for o in overlay]
    starts = [o["at"] for o in overlay if o["text"].startswith("Starting")]
    if starts and hidden:
        # Reported, not checked: how long the first frame took here.
        summary["start_to_first_frame_ms"] = round(overlay[hidden[-1]]["at"] - starts[0])

    frames = page.evaluate(PRESENTED, 10)
    later = page.evaluate(PRESENTED, 5)
    check(frames["count"] >= 10, f"the output <video> presented frames ({frames['count']} of 10 waited for)")
    check(frames["width"] == 64 and frames["height"] == 64, f"the output is the engine's 64x64 ({frames['width']}x{frames['height']})")
    check(later["t1"] > frames["t0"], f"the output's currentTime advances ({frames['t0']:.2f} -> {later['t1']:.2f})")
    pixels = page.evaluate(PIXELS, 300)
    summary["pixels"] = pixels
    check(pixels["out"]["std"] > 2, f"the output is a picture, not a flat colour (std {pixels['out']['std']:.1f})")
    check(pixels["outVsCam"] > 10 and pixels["outVsCam"] > 3 * pixels["camVsCam"],
          f"the output differs from the camera: {pixels['outVsCam']:.1f} levels, the camera from itself "
          f"{pixels['camVsCam']:.1f}")
    summary["screens"].append(shot(page, args, "04-playing"))

    # The status panel mirrors the server's status.
    state, params, version = status_of(base, sid)
    shown = wait_until(lambda: page.text_content("#st-state") == state and page.text_content("#st-params") == f"version {version}")
    check(bool(shown), f"the status panel shows the engine's state and params version ({state}, {version})")
    check(params.get("t_index_list") == [12, 24] and params.get("num_inference_steps") == 50,
          f"the page created the stream with its default creativity 5 / quality 0.4: {params.get('t_index_list')}")
    check(page.locator("#cn-0").count() == 1 and page.locator("#controlnets input").count() == 1,
          "one ControlNet slider for the stream's one ControlNet")

    # A prompt applied with Enter reaches the engine.
    _, before, v0 = status_of(base, sid)
    patches = requests.count("PATCH", f"/v1/streams/{sid}")
    page.fill("#prompt", "a charcoal drawing of a harbour")
    page.press("#prompt", "Enter")
    got = wait_until(lambda: status_of(base, sid)[1].get("prompt") == "a charcoal drawing of a harbour")
    _, after, v1 = status_of(base, sid)
    check(bool(got), f"Enter applies the prompt: last_params.prompt {before.get('prompt')!r} -> {after.get('prompt')!r}")
    check(v1 != v0 and (not isinstance(v0, int) or v1 > v0), f"params_version changes ({v0} -> {v1})")
    page.wait_for_timeout(500)  # lets the browser's request events in (see wait_until)
    check(requests.count("PATCH", f"/v1/streams/{sid}") == patches + 1, "Enter sent one PATCH")
    summary["screens"].append(shot(page, args, "05-prompt-applied"))

    # A weighted blend: the slider (by keyboard: 50% - 4 steps of 5) is the second prompt's share.
    page.fill("#prompt-b", "a neon city at night")
    page.focus("#blend")
    for _ in range(4):
        page.keyboard.press("ArrowLeft")
    want = [["a charcoal drawing of a harbour", 0.7], ["a neon city at night", 0.3]]
    got = wait_until(lambda: status_of(base, sid)[1].get("prompt") == want)
    check(bool(got), f"the blend reaches the engine as {want} ({status_of(base, sid)[1].get('prompt')})")

    # Creativity and quality, by keyboard: End/End and Home/Home.
    def look(creativity_key, quality_key, expected):
        page.focus("#creativity")
        page.keyboard.press(creativity_key)
        page.focus("#quality")
        page.keyboard.press(quality_key)
        got = wait_until(lambda: status_of(base, sid)[1].get("t_index_list") == expected)
        p = status_of(base, sid)[1]
        check(bool(got) and p.get("num_inference_steps") == 50,
              f"creativity {creativity_key}, quality {quality_key}: t_index_list {p.get('t_index_list')} "
              f"(expected {expected}), num_inference_steps {p.get('num_inference_steps')}")

    # 2.62 - 0.132*10 = 1.3: 6, 12, 18, 24 -> 7.8, 15.6, 23.4, 31.2; 2.62 - 0.132 = 2.488: 6 -> 14.9.
    look("End", "End", [8, 16, 23, 31])
    look("Home", "Home", [15])

    page.fill("#seed", "1234")
    page.press("#seed", "Enter")
    got = wait_until(lambda: status_of(base, sid)[1].get("seed") == 1234)
    check(bool(got), f"the seed reaches the engine ({status_of(base, sid)[1].get('seed')})")

    page.focus("#cn-0")
    page.keyboard.press("Home")
    got = wait_until(lambda: (status_of(base, sid)[1].get("controlnets") or [{}])[0].get("conditioning_scale") == 0)
    nets = status_of(base, sid)[1].get("controlnets") or []
    check(bool(got) and len(nets) == 1 and nets[0].get("model_id") == "tiny-controlnet-a",
          f"the ControlNet slider sets conditioning_scale 0 on tiny-controlnet-a ({nets})")
    check(banner(page) == "", f"no error banner during the session ({banner(page)!r})")
    frames = page.evaluate(PRESENTED, 5)
    check(frames["count"] >= 5, f"the output still plays after the changes ({frames['count']} frames)")
    summary["screens"].append(shot(page, args, "06-controls"))

    # Stop deletes the stream.
    page.click("#stop")
    check(bool(wait_until(lambda: gone(base, sid))), "Stop deletes the stream (GET -> 404)")
    idle = wait_until(lambda: page.evaluate("() => document.body.dataset.phase") == "idle")
    check(bool(idle) and banner(page) == "" and page.text_content("#st-id") == "–",
          f"after Stop the page is idle, without an error ({banner(page)!r})")
    summary["screens"].append(shot(page, args, "07-stopped"))

    # A reload deletes the stream (keepalive DELETE on pagehide).
    sid = start_stream(page, base)
    wait_until(lambda: requests.count("POST", f"/whep/{sid}") == 1, page=page)
    page.reload()
    check(bool(wait_until(lambda: gone(base, sid))), "a reload deletes the stream (GET -> 404)")
    check(page.text_content("#overlay-main") == "Press Start to begin" and banner(page) == "",
          "the reloaded page is idle, without an error")

    # Closing the tab deletes the stream.
    sid = start_stream(page, base)
    wait_until(lambda: requests.count("POST", f"/whep/{sid}") == 1, page=page)
    page.close()
    check(bool(wait_until(lambda: gone(base, sid))), "closing the tab deletes the stream (GET -> 404)")
    context.close()


class DaydreamShapes:
    """Rewrites the server's answers, in the browser, into the shapes of Daydream's hosted API, so
    that the page is shown to work with both: every answer in the envelope {success, data}, errors
    as {success: false, error, code, status}, the create answer without whep_url (Daydream gives
    it in the status's gateway_status), and the status in Daydream's own vocabulary only
    (input_status, inference_status, gateway_status; no params_version). Answers already in the
    envelope pass unchanged."""

    def __init__(self):
        self.whep = {}
        self.rewritten = 0

    def status(self, st, stream_id):
        if "inference_status" in st:
            return st
        return {
            "state": st.get("state"), "stream_id": stream_id, "pipeline": "streamdiffusion",
            "start_time": None,
            "input_status": {"fps": st.get("input_fps"), "last_input_time": st.get("last_input_time")},
            "inference_status": {
                "fps": st.get("output_fps"), "input_fps": st.get("input_fps"), "output_fps": st.get("output_fps"),
                "last_error": st.get("last_error"), "last_error_time": st.get("last_error_time"),
                "last_output_time": st.get("last_output_time"), "last_params": st.get("last_params"),
                "last_params_hash": st.get("last_params_hash"),
                "last_params_update_time": st.get("last_params_update_time"),
                "restart_count": st.get("restart_count"), "last_restart_time": st.get("last_restart_time"),
                "last_restart_logs": None,
            },
            "gateway_status": {"whep_url": self.whep.get(stream_id)},
        }

    def __call__(self, route, request):
        answer = route.fetch()
        try:
            body = json.loads(answer.body() or b"null")
        except json.JSONDecodeError:
            return route.fulfill(response=answer)
        if isinstance(body, dict) and "success" in body and ("data" in body or "code" in body):
            return route.fulfill(response=answer)
        path = request.url.split("?", 1)[0].split("/v1/streams", 1)[1]
        if answer.status >= 400:
            error = body.get("error") if isinstance(body, dict) else str(body)
            out = {"success": False, "error": error, "code": f"HTTP_{answer.status}", "status": answer.status}
        elif path.endswith("/status"):
            out = {"success": True, "error": None, "data": self.status(body, path.split("/")[1])}
        else:
            if request.method == "POST" and isinstance(body, dict) and "id" in body:
                self.whep[body["id"]] = body.pop("whep_url", None)
                body.pop("output_stream_url", None)
            out = {"success": True, "data": body}
        self.rewritten += 1
        route.fulfill(status=answer.status, headers=answer.headers, body=json.dumps(out))


def scenario_daydream_shapes(browser, base, args, requests, summary):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    shapes = DaydreamShapes()
    # Playwright's sync API runs route handlers only while one of its calls is in progress, so
    # every wait below waits in the page.
    context.route(re.compile(r"/v1/streams"), shapes)
    page = open_page(context, base, requests, "not-the-token")
    page.click("#start")
    text = wait_until(lambda: banner(page), page=page)
    check("401" in text and re.search(r"\[[A-Z0-9_/]+\]", text) is not None,
          f"Daydream's error envelope: the banner shows the 401 and its code ({text!r})")
    page.click("#banner-close")
    page.fill("#token", TOKEN)
    sid = start_stream(page, base)
    if not sid:
        return
    playing = wait_until(lambda: page.evaluate("() => document.body.dataset.phase") == "playing", timeout=LOAD_WAIT, page=page)
    frames = page.evaluate(PRESENTED, 5)
    check(playing and frames["count"] >= 5,
          f"Daydream's shapes (envelope, WHEP address from gateway_status): the output plays ({frames['count']} frames)")
    # The server's own status already speaks Daydream's vocabulary (with sdstream's `engine`
    # report beside it, whose params_version the panel prefers); the hash serves without it.
    shown = wait_until(lambda: page.text_content("#st-params").startswith(("hash ", "version "))
                       and page.text_content("#st-state") == status_of(base, sid)[0], page=page)
    check(bool(shown), f"Daydream's status vocabulary: the panel shows the state and the params version or hash "
                       f"({page.text_content('#st-state')}, {page.text_content('#st-params')})")
    _, _, v0 = status_of(base, sid)
    page.fill("#prompt", "an ink sketch of a forest")
    page.press("#prompt", "Enter")
    got = wait_until(lambda: status_of(base, sid)[1].get("prompt") == "an ink sketch of a forest", page=page)
    check(bool(got) and status_of(base, sid)[2] != v0, "Daydream's shapes: a prompt applied with Enter reaches the engine")
    check(banner(page) == "", f"Daydream's shapes: no error banner during the session ({banner(page)!r})")
    page.click("#stop")
    check(bool(wait_until(lambda: gone(base, sid), page=page)), "Daydream's shapes: Stop deletes the stream (GET -> 404)")
    wait_until(lambda: page.evaluate("() => document.body.dataset.phase") == "idle", page=page)
    context.unroute_all(behavior="ignoreErrors")
    summary["rewritten_answers"] = shapes.rewritten
    context.close()


def main():
    ap = arguments(work=True)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    os.makedirs(os.path.join(args.work, "screens"), exist_ok=True)
    summary = {"screens": []}
    server = start_server(args)
    base = server.base
    requests = Requests()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, headless=True,
                                                 args=CHROMIUM_FLAGS + FAKE_CAMERA + ALLOW_CAMERA)
            for scenario, driver in [(scenario_static, browser), (scenario_denied, playwright),
                                     (scenario_wrong_token, browser), (scenario_session, browser),
                                     (scenario_daydream_shapes, browser)]:
                # A page without the expected elements fails its scenario, not the whole run.
                try:
                    scenario(driver, base, args, requests, summary)
                except Exception as e:  # noqa: BLE001 - reported as a failed check
                    check(False, f"{scenario.__name__} raised {type(e).__name__}: {str(e).splitlines()[0]}")
            browser.close()
        code, listed = api(base, "GET", "/v1/streams")
        listed = unwrap(listed)
        if code == 200 and isinstance(listed, list):
            check(listed == [], f"GET /v1/streams lists no stream at the end ({len(listed)})")
        foreign = sorted({u for _, u in requests.seen if not u.startswith(base) and not u.startswith(("data:", "blob:"))})
        check(foreign == [], f"every request stayed on the server's origin ({len(requests.seen)} requests; "
                             f"elsewhere: {foreign})")
    finally:
        server.stop()
    summary["checks"] = len(CHECKS)
    summary["failures"] = FAILURES
    finish(summary)


if __name__ == "__main__":
    main()
