"""A browser's own recording through `sdstream run`: Debian's Chromium records its fake camera and
microphone with MediaRecorder as MP4 (H.264 and Opus, a keyframe every 500 ms), which Chromium
writes as a fragmented MP4 (an index without samples, then one movie fragment a keyframe), the
file a web app uploads. Then:

1. The recording is what the test means to check: MP4 with movie fragments (at least 2 `moof`
   boxes), H.264 and Opus by ffprobe.
2. `sdstream run` (the tiny checkpoint, 64x64) reads it whole: exit 0, and its output, a plain
   MP4 (no `moof`), has by ffprobe every picture of the recording at the recording's presentation
   time (the same count, the same times in the same time base) and every audio packet at its
   time.
3. The recording cut in its last fragment's media data (a recording stopped by a crash): exit 0,
   a note that the file ends inside a movie fragment, and exactly the pictures of the whole
   fragments before it (those ffprobe places before the last `moof`).

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

MIME = "video/mp4;codecs=avc1,opus"
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
    """[(pts, pos, size)] of the first stream of `kind` ("v" or "a"), in file order."""
    out = subprocess.run(
        [ffprobe, "-v", "error", "-select_streams", f"{kind}:0", "-show_entries",
         "packet=pts,pos,size", "-of", "json", path],
        check=True, capture_output=True, text=True).stdout
    return [(int(p["pts"]), int(p.get("pos", -1)), int(p["size"]))
            for p in json.loads(out).get("packets", [])]


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
    """Chromium's MediaRecorder recording of its fake devices (bytes), from a page served on a
    loopback address (getUserMedia needs a secure context)."""
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=folder, **k)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=chromium, args=CHROMIUM_FLAGS + FAKE_CAMERA + ALLOW_CAMERA)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{httpd.server_address[1]}/")
            supported = page.evaluate(f"MediaRecorder.isTypeSupported('{MIME}')")
            check(supported, f"Chromium's MediaRecorder records {MIME}")
            data = base64.b64decode(page.evaluate(RECORD, [MIME, RECORD_MS])) if supported else b""
            browser.close()
            return data
    finally:
        httpd.shutdown()


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
    data = record(args.chromium, page_dir)
    recording = os.path.join(args.work, "recording.mp4")
    with open(recording, "wb") as f:
        f.write(data)
    summary = {"recording_bytes": len(data)}
    boxes = top_level_boxes(data)
    moofs = [b for b in boxes if b[0] == "moof"]
    summary["fragments"] = len(moofs)
    check(len(moofs) >= 2, f"the recording is a fragmented MP4: {len(moofs)} movie fragments")
    if not moofs:
        finish(summary)
    check(codecs(args.ffprobe, recording) in (["h264", "opus"], ["opus", "h264"]),
          "the recording holds H.264 and Opus")
    video = packets(args.ffprobe, recording, "v")
    audio = packets(args.ffprobe, recording, "a")
    summary.update(pictures=len(video), audio_packets=len(audio))
    check(len(video) >= 20 and len(audio) >= 20,
          f"the recording holds {len(video)} pictures and {len(audio)} audio packets")

    # 2. The whole recording.
    output = os.path.join(args.work, "out.mp4")
    code, stderr = run(args.server, args.fixtures, recording, output)
    if not check(code == 0 and f"done: {len(video)} frames" in stderr,
                 f"sdstream run reads the recording: exit {code}, {len(video)} frames"):
        print(stderr[-2000:])
    if code == 0:
        with open(output, "rb") as f:
            out_boxes = top_level_boxes(f.read())
        check(not any(b[0] == "moof" for b in out_boxes), "the output is a plain MP4")
        out_video = packets(args.ffprobe, output, "v")
        out_audio = packets(args.ffprobe, output, "a")
        check(sorted(p[0] for p in out_video) == sorted(p[0] for p in video),
              f"every picture at the recording's time ({len(out_video)} of {len(video)})")
        check([(p[0], p[2]) for p in out_audio] == [(p[0], p[2]) for p in audio],
              f"every audio packet at its time and size ({len(out_audio)} of {len(audio)})")

    # 3. Cut in the last fragment's media data.
    last = moofs[-1][1]
    mdat = next(b for b in boxes if b[0] == "mdat" and b[1] > last)
    cut = os.path.join(args.work, "cut.mp4")
    with open(cut, "wb") as f:
        f.write(data[:mdat[1] + mdat[2] // 2])
    whole = sum(1 for p in video if 0 <= p[1] and p[1] + p[2] <= last)
    summary["pictures_before_the_cut"] = whole
    output = os.path.join(args.work, "out-cut.mp4")
    code, stderr = run(args.server, args.fixtures, cut, output)
    if not check(code == 0 and "note: the file ends inside a movie fragment" in stderr
                 and f"done: {whole} frames" in stderr,
                 f"a recording cut in its last fragment runs its {whole} whole-fragment "
                 f"pictures (of {len(video)}), with a note: exit {code}"):
        print(stderr[-2000:])
    finish(summary)


if __name__ == "__main__":
    main()
