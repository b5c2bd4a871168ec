"""A browser's own recordings through `sdstream run`: Debian's Chromium records its fake camera
and microphone with MediaRecorder (H.264 and Opus, a keyframe every 500 ms) as MP4, which it
writes fragmented (an index without samples, then one movie fragment a keyframe), and as
Matroska, which it writes live (sizes unknown, Annex-B pictures carrying their parameter sets,
no CodecPrivate): the files a web app uploads. For each:

1. The recording is what the test means to check: H.264 and Opus by ffprobe (and the MP4 with
   at least 2 movie fragments).
2. `sdstream run` (the tiny checkpoint, 64x64) reads it whole: exit 0, and its output, a plain
   MP4 (no `moof`), has by ffprobe every picture of the recording at the recording's presentation
   time (the same count, the same times in the same time base) and every audio packet at its
   time.
3. The recording cut short (a recording stopped by a crash; the MP4 in its last fragment's media
   data, the Matroska file two thirds in): exit 0, a note saying where the file ends, and
   exactly the pictures whole before the cut (by ffprobe's packet positions; in the MP4, those
   of the fragments before the last).

Chromium's default recording, WebM with VP8, is refused naming the codec and the ffmpeg command
that converts it (exit code 1, no output).

usage: media_recorder.py --server BIN --fixtures DIR --work DIR [--chromium /usr/bin/chromium]
       [--ffprobe ffprobe]
Exits non-zero on any failed check; prints a JSON summary.
"""

import base64
import http.server
import json
import os
import struct
import subprocess
import sys
import threading

from playwright.sync_api import sync_playwright

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from server_harness import arguments, check, finish  # noqa: E402

from page_e2e import CHROMIUM_FLAGS, FAKE_CAMERA, ALLOW_CAMERA  # noqa: E402

# The two containers Chromium records H.264 in: MP4 (fragmented) and Matroska (written live:
# sizes unknown, the parameter sets in the stream, Annex-B start codes, no CodecPrivate).
CONTAINERS = [("mp4", "video/mp4;codecs=avc1,opus"), ("mkv", "video/x-matroska;codecs=avc1,opus"),
              # Chromium's default: WebM with VP8, which sdstream run refuses by name.
              ("webm", "video/webm;codecs=vp8,opus")]
RECORD_MS = 3000

RECORD = """async ([mime, ms]) => {
  const media = await navigator.mediaDevices.getUserMedia(
      {video: {width: 320, height: 240}, audio: true});
  const recorder = new MediaRecorder(media, {mimeType: mime, videoKeyFrameIntervalDuration: 500});
  const chunks = [];
  recorder.ondataavailable = (e) => chunks.push(e.data);
  recorder.start(250);
  await new Promise((done) => setTimeout(done, ms));
  await new Promise((done) => { recorder.onstop = done; recorder.stop(); });
  media.getTracks().forEach((t) => t.stop());
  const bytes = new Uint8Array(await new Blob(chunks).arrayBuffer());
  let text = '';
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}"""


def top_level_boxes(data):
    """[(type, offset, size)] of the file's top-level boxes."""
    boxes, pos = [], 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if size == 1:
            size = struct.unpack(">Q", data[pos + 8:pos + 16])[0]
        elif size == 0:
            size = len(data) - pos
        if size < 8:
            break
        boxes.append((kind.decode("latin-1"), pos, size))
        pos += size
    return boxes


def packets(ffprobe, path, kind):
    """[(pts in seconds, pos, size)] of the first stream of `kind` ("v" or "a"), in file order."""
    out = subprocess.run(
        [ffprobe, "-v", "error", "-select_streams", f"{kind}:0", "-show_entries",
         "packet=pts_time,pos,size", "-of", "json", path],
        check=True, capture_output=True, text=True).stdout
    return [(float(p["pts_time"]), int(p.get("pos", -1)), int(p["size"]))
            for p in json.loads(out).get("packets", [])]


def same_times(a, b, tolerance):
    """Two lists of times equal within `tolerance` seconds."""
    return len(a) == len(b) and all(abs(x - y) <= tolerance for x, y in zip(a, b))


def codecs(ffprobe, path):
    out = subprocess.run(
        [ffprobe, "-v", "error", "-show_entries", "stream=codec_name", "-of", "csv=p=0", path],
        check=True, capture_output=True, text=True).stdout
    return [line.strip().rstrip(",") for line in out.splitlines() if line.strip()]


def run(server, fixtures, source, output):
    """`sdstream run` on the tiny checkpoint: (exit code, stderr)."""
    params = {"model_id": os.path.join(fixtures, "tiny-sd-turbo"), "width": 64, "height": 64}
    settings = {"vae": os.path.join(fixtures, "tiny-taesd"), "allow_any_resolution": True}
    done = subprocess.run(
        [server, "run", "--input", source, "--output", output, "--params", json.dumps(params),
         "--settings", json.dumps(settings)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "SDSTREAM_LOG": "warn"})
    return done.returncode, done.stderr


def record(chromium, folder):
    """Chromium's MediaRecorder recordings of its fake devices, {extension: bytes}, from a page
    served on a loopback address (getUserMedia needs a secure context)."""
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=folder, **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    recordings = {}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=chromium, args=CHROMIUM_FLAGS + FAKE_CAMERA + ALLOW_CAMERA)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{httpd.server_address[1]}/")
            for extension, mime in CONTAINERS:
                supported = page.evaluate(f"MediaRecorder.isTypeSupported('{mime}')")
                if check(supported, f"Chromium's MediaRecorder records {mime}"):
                    recordings[extension] = base64.b64decode(page.evaluate(RECORD, [mime, RECORD_MS]))
            browser.close()
    finally:
        httpd.shutdown()
    return recordings


def exercise(args, extension, data, summary):
    """Checks 1-3 of the module's docstring on one recording."""
    recording = os.path.join(args.work, f"recording.{extension}")
    with open(recording, "wb") as f:
        f.write(data)
    figures = summary.setdefault(extension, {"bytes": len(data)})
    # Matroska keeps times to the millisecond; the output MP4 keeps them to the microsecond.
    tolerance = 1e-6 if extension == "mp4" else 0.0011
    boxes = top_level_boxes(data) if extension == "mp4" else []
    if extension == "mp4":
        moofs = [b for b in boxes if b[0] == "moof"]
        figures["fragments"] = len(moofs)
        if not check(len(moofs) >= 2, f"the MP4 recording is fragmented: {len(moofs)} movie fragments"):
            return
    check(sorted(codecs(args.ffprobe, recording)) == ["h264", "opus"],
          f"the {extension} recording holds H.264 and Opus")
    video = packets(args.ffprobe, recording, "v")
    audio = packets(args.ffprobe, recording, "a")
    figures.update(pictures=len(video), audio_packets=len(audio))
    check(len(video) >= 20 and len(audio) >= 20,
          f"the {extension} recording holds {len(video)} pictures and {len(audio)} audio packets")

    # 2. The whole recording.
    output = os.path.join(args.work, f"out-{extension}.mp4")
    code, stderr = run(args.server, args.fixtures, recording, output)
    if not check(code == 0 and f"done: {len(video)} frames" in stderr,
                 f"sdstream run reads the {extension} recording: exit {code}, {len(video)} frames"):
        print(stderr[-2000:])
    if code == 0:
        with open(output, "rb") as f:
            out_boxes = top_level_boxes(f.read())
        check(not any(b[0] == "moof" for b in out_boxes), "the output is a plain MP4")
        out_video = packets(args.ffprobe, output, "v")
        out_audio = packets(args.ffprobe, output, "a")
        check(same_times(sorted(p[0] for p in out_video), sorted(p[0] for p in video), tolerance),
              f"every picture at the recording's time ({len(out_video)} of {len(video)})")
        check(same_times([p[0] for p in out_audio], [p[0] for p in audio], tolerance)
              and [p[2] for p in out_audio] == [p[2] for p in audio],
              f"every audio packet at its time and size ({len(out_audio)} of {len(audio)})")

    # 3. Cut short: in an MP4, in its last fragment's media data; in Matroska, two thirds in.
    if extension == "mp4":
        last = [b for b in boxes if b[0] == "moof"][-1][1]
        mdat = next(b for b in boxes if b[0] == "mdat" and b[1] > last)
        cut_at = mdat[1] + mdat[2] // 2
        whole = sum(1 for p in video if 0 <= p[1] and p[1] + p[2] <= last)
        note = "note: the file ends inside a movie fragment"
    else:
        cut_at = len(data) * 2 // 3
        whole = sum(1 for p in video if 0 <= p[1] and p[1] + p[2] <= cut_at)
        note = "note: the file ends inside a cluster"
    cut = os.path.join(args.work, f"cut.{extension}")
    with open(cut, "wb") as f:
        f.write(data[:cut_at])
    figures["pictures_before_the_cut"] = whole
    output = os.path.join(args.work, f"out-cut-{extension}.mp4")
    code, stderr = run(args.server, args.fixtures, cut, output)
    if not check(code == 0 and note in stderr and f"done: {whole} frames" in stderr,
                 f"the {extension} recording cut short runs its {whole} whole pictures "
                 f"(of {len(video)}), with a note: exit {code}"):
        print(stderr[-2000:])


def refused(args, data, summary):
    """4. Chromium's default recording (WebM, VP8): refused naming the codec and the command that
    converts it, exit code 1, no output."""
    recording = os.path.join(args.work, "recording.webm")
    with open(recording, "wb") as f:
        f.write(data)
    summary["webm"] = {"bytes": len(data)}
    output = os.path.join(args.work, "out-webm.mp4")
    if os.path.exists(output):
        os.remove(output)
    code, stderr = run(args.server, args.fixtures, recording, output)
    if not check(code == 1 and "VP8 (V_VP8), not H.264" in stderr and "ffmpeg -i IN" in stderr
                 and not os.path.exists(output),
                 f"the WebM (VP8) recording is refused naming its codec: exit {code}"):
        print(stderr[-2000:])


def main():
    ap = arguments(work=True)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--ffprobe", default=os.environ.get("FFPROBE", "ffprobe"))
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    page_dir = os.path.join(args.work, "page")
    os.makedirs(page_dir, exist_ok=True)
    with open(os.path.join(page_dir, "index.html"), "w") as f:
        f.write("<!doctype html><title>recorder</title>")
    summary = {}
    for extension, data in record(args.chromium, page_dir).items():
        if extension == "webm":
            refused(args, data, summary)
        else:
            exercise(args, extension, data, summary)
    finish(summary)


if __name__ == "__main__":
    main()
