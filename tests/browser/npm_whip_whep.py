"""The WHIP and WHEP clients on npm, in a real browser, against `sdstream serve`: the `whip-whep`
package (Medooze's WHIPClient and WHEPClient, by an author of the WHIP and WHEP drafts; plain ES
modules), fetched from the npm registry at a pinned version and checked against its published
SHA-512, run in Debian's Chromium (headless, fake camera) from a page on another origin than the
server's (so their requests cross origins, as a web app's do).

1. The server runs over the tiny fixture (64x64); a stream is created through the API.
2. WHIPClient.publish() sends the fake camera to the stream's `whip_url`: 201 with a Location,
   the connection connects, the client's trickled candidates get 405 (the server takes none
   trickled, RFC 9725) and the session stands; the stream's status counts the frames coming in.
3. WHEPClient.view() plays the stream's `output_stream_url` (WHEP): the connection connects and
   the <video> presents frames of the stream's size (64x64) while the status counts frames
   going out.
4. stop() on both: each DELETEs its resource (200); the stream loses its publisher
   (`DEGRADED_INPUT`) and is deleted through the API; SIGTERM ends the server with 0.

usage: npm_whip_whep.py --server BIN --fixtures DIR --work DIR [--chromium /usr/bin/chromium]
Exits non-zero on any failed check; prints a JSON summary.
"""

import base64
import hashlib
import http.server
import io
import os
import sys
import tarfile
import threading
import time
import urllib.request

from playwright.sync_api import sync_playwright

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from server_harness import api, arguments, check, finish, serve, unwrap  # noqa: E402

from page_e2e import ALLOW_CAMERA, CHROMIUM_FLAGS, FAKE_CAMERA  # noqa: E402

# The package as published (npm view whip-whep@1.2.0 dist).
PACKAGE = "whip-whep"
VERSION = "1.2.0"
TARBALL = f"https://registry.npmjs.org/{PACKAGE}/-/{PACKAGE}-{VERSION}.tgz"
INTEGRITY = ("sha512-CP+Tht3O/N6QLebW5LxsNKgzFN5KX6WinLr1SLs74feagYu+Gqy+0dw48p5RQuE+FlrM4xyOlOdW2UOQ"
             "wljImA==")
REGISTRY = os.environ.get("NPM_CONFIG_REGISTRY", "https://registry.npmjs.org").rstrip("/")

TOKEN = "npm-whip-whep-token"
WAIT_MS = 30_000

PAGE = """<!doctype html>
<title>whip-whep</title>
<video id="out" muted autoplay playsinline></video>
<script type="module">
import { WHIPClient } from "./whip.js";
import { WHEPClient } from "./whep.js";

const until = async (what, ok, ms) => {
  const end = performance.now() + ms;
  while (!ok()) {
    if (performance.now() > end) throw new Error("timed out waiting for " + what);
    await new Promise((r) => setTimeout(r, 50));
  }
};

window.publish = async (url, ms) => {
  const media = await navigator.mediaDevices.getUserMedia({ video: { width: 320, height: 240 } });
  const pc = new RTCPeerConnection();
  for (const track of media.getTracks()) pc.addTransceiver(track, { direction: "sendonly" });
  window.whip = new WHIPClient();
  window.publisher = pc;
  await window.whip.publish(pc, url);
  await until("the publisher to connect", () => pc.connectionState === "connected", ms);
  return pc.connectionState;
};

window.view = async (url, frames, ms) => {
  const pc = new RTCPeerConnection();
  pc.addTransceiver("video", { direction: "recvonly" });
  const video = document.getElementById("out");
  pc.ontrack = (e) => { video.srcObject = e.streams[0] || new MediaStream([e.track]); };
  window.whep = new WHEPClient();
  await window.whep.view(pc, url);
  await until("the viewer to connect", () => pc.connectionState === "connected", ms);
  let presented = 0;
  const count = () => { presented += 1; video.requestVideoFrameCallback(count); };
  video.requestVideoFrameCallback(count);
  await until(frames + " frames", () => presented >= frames, ms);
  return { state: pc.connectionState, presented, width: video.videoWidth, height: video.videoHeight };
};

window.stopBoth = async () => {
  await window.whep.stop();
  await window.whip.stop();
};
window.ready = true;
</script>
"""


def client_files(cache):
    """whip.js and whep.js of the pinned package: from `cache` when there, else from the
    registry; the tarball checked against its published SHA-512 either way."""
    os.makedirs(cache, exist_ok=True)
    tgz = os.path.join(cache, f"{PACKAGE}-{VERSION}.tgz")
    if not os.path.exists(tgz):
        url = TARBALL.replace("https://registry.npmjs.org", REGISTRY)
        with urllib.request.urlopen(url, timeout=60) as r:
            data = r.read()
        with open(tgz + ".part", "wb") as f:
            f.write(data)
        os.replace(tgz + ".part", tgz)
    data = open(tgz, "rb").read()
    digest = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    if not check(digest == INTEGRITY, f"the {PACKAGE}@{VERSION} tarball has its published SHA-512"):
        return None
    files = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for name in ("whip.js", "whep.js"):
            files[name] = tar.extractfile(f"package/{name}").read()
    return files


def stream_state(base, stream_id):
    code, body = api(base, "GET", f"/v1/streams/{stream_id}/status")
    data = unwrap(body) if code == 200 else {}
    return data if isinstance(data, dict) else {}


def counter(status, *path):
    """A number inside the status (0 where it is missing)."""
    value = status
    for key in path:
        value = value.get(key, {}) if isinstance(value, dict) else {}
    return value if isinstance(value, (int, float)) else 0


def main():
    ap = arguments(work=True)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    page_dir = os.path.join(args.work, "page")
    os.makedirs(page_dir, exist_ok=True)
    summary = {"package": f"{PACKAGE}@{VERSION}"}
    files = client_files(os.path.join(args.work, "npm-cache"))
    if files is None:
        finish(summary)
    for name, data in files.items():
        with open(os.path.join(page_dir, name), "wb") as f:
            f.write(data)
    with open(os.path.join(page_dir, "index.html"), "w") as f:
        f.write(PAGE)
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=page_dir, **k)  # noqa: E731
    pages = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=pages.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{pages.server_address[1]}"
    server = serve(args.server, TOKEN, os.path.abspath(args.fixtures), flags=["--connect-timeout", 10],
                   log_path=os.path.join(args.work, "server.log"))
    base = server.base
    answers = []  # (method, url, status) of every request the page made to the server
    try:
        code, created = api(base, "POST", "/v1/streams", {"pipeline": "streamdiffusion", "params": {}})
        stream = unwrap(created) if code == 201 else {}
        check(code == 201 and "whip_url" in stream, f"POST /v1/streams: {code}")
        stream_id = stream.get("id")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium,
                                        args=CHROMIUM_FLAGS + FAKE_CAMERA + ALLOW_CAMERA)
            page = browser.new_page()
            page.on("response", lambda r: answers.append((r.request.method, r.url, r.status))
                    if r.url.startswith(base) else None)
            page.on("console", lambda m: print(f"page {m.type}: {m.text}") if m.type == "error" else None)
            page.goto(origin + "/")
            page.wait_for_function("window.ready === true")
            state = page.evaluate("([u, ms]) => publish(u, ms)", [stream["whip_url"], WAIT_MS])
            check(state == "connected", f"WHIPClient.publish(): the publisher connects ({state})")
            posts = [a for a in answers if a[0] == "POST" and a[1].startswith(stream["whip_url"])]
            check([a[2] for a in posts] == [201], f"the WHIP offer got 201 ({posts})")
            patches = [a[2] for a in answers if a[0] == "PATCH"]
            check(patches and set(patches) == {405},
                  f"the client's trickled candidates got 405 ({len(patches)} PATCH)")
            # Frames reach the engine.
            deadline, received = time.time() + WAIT_MS / 1000, 0
            while time.time() < deadline and received < 10:
                received = counter(stream_state(base, stream_id), "transport", "frames_submitted")
                time.sleep(0.2)
            check(received >= 10, f"the publisher's pictures reach the engine ({received} submitted)")
            shown = page.evaluate("([u, n, ms]) => view(u, n, ms)",
                                  [stream["output_stream_url"], 20, WAIT_MS])
            summary["viewer"] = shown
            check(shown["state"] == "connected" and shown["presented"] >= 20,
                  f"WHEPClient.view(): the <video> presents the output ({shown['presented']} frames)")
            check((shown["width"], shown["height"]) == (64, 64),
                  f"the output is the stream's size ({shown['width']}x{shown['height']})")
            status = stream_state(base, stream_id)
            sent = counter(status, "transport", "frames_sent")
            check(sent >= 20, f"the stream's status counts frames to the viewer ({sent})")
            summary["transport"] = status.get("transport")
            page.evaluate("() => stopBoth()")
            deletes = [a[2] for a in answers if a[0] == "DELETE"]
            check(sorted(deletes) == [200, 200], f"stop() deletes both sessions ({deletes})")
            deadline, state = time.time() + 10, None
            while time.time() < deadline and state != "DEGRADED_INPUT":
                state = stream_state(base, stream_id).get("state")
                time.sleep(0.2)
            check(state == "DEGRADED_INPUT", f"the stream has lost its publisher ({state})")
            browser.close()
        code, _ = api(base, "DELETE", f"/v1/streams/{stream_id}")
        check(code == 200, f"DELETE /v1/streams/{{id}}: {code}")
        summary["requests"] = [f"{m} {s}" for m, _, s in answers]
    finally:
        server.stop()
        pages.shutdown()
    finish(summary)


if __name__ == "__main__":
    main()
