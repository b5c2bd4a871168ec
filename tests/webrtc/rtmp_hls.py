"""End-to-end test of RTMP ingest, HLS output and RTMP push with ffmpeg (Debian's), a peer no one
here wrote, against `sdstream serve` over the tiny fixture.

1. The stream object carries `rtmp_url`, `rtmp_publish_url` (= rtmp_url/stream_key) and `hls_url`.
2. Bad input, each refused with a reason and nothing else disturbed: an HLS playlist before any
   output (503, Retry-After), a wrong token (401), an unknown stream (404), a segment that is
   not one (404); `output_rtmp_url` that is not rtmp:// (422 naming it); on the RTMP port an
   HTTP request and a handshake cut off after one byte (closed; counted), a publish with an
   unknown stream key and one to another application (ffmpeg fails with the server's reason;
   counted). The server keeps serving after each.
3. ffmpeg publishes a test pattern over RTMP (H.264): the pictures reach the engine; a second
   RTMP publisher for the same key is refused while the first is live, and so is a WHIP offer
   (409); ffmpeg reads the stream's HLS playlist and decodes its segments: each decoded frame is
   matched to the nearest recorded engine output and input, and must be the output (H.264
   twice costs a few levels), not the input. The playlist itself: target duration, media
   sequence, segment durations, MPEG-TS segments.
4. A second stream created with `output_rtmp_url` pointing at `ffmpeg -listen 1`: while ffmpeg
   publishes into that stream over RTMP, the listening ffmpeg receives its output and the decoded
   frames are that stream's engine outputs, not its inputs.
5. Status: the ingest source is `rtmp`, per-path latency (ingest, engine, encode, HLS and RTMP
   push delivery) is measured; when the publisher stops, the stream turns DEGRADED_INPUT at once,
   and a new RTMP publisher takes it again.
6. The log never shows a stream key.

usage: rtmp_hls.py --server BIN --fixtures DIR --work DIR [--ffmpeg ffmpeg]
Exits non-zero on any failed check; prints a JSON summary.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np

from e2e import API_TOKEN, load_ppms, status_data

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from server_harness import (  # noqa: E402
    LAST, SIZE, api, arguments, check, finish, http, is_error_envelope, serve,
)

SEGMENT_MS = 500


def wait(condition, timeout, step=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return bool(condition())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def publish(ffmpeg, url, seconds, rate=15):
    """ffmpeg pushing a moving test pattern over RTMP (H.264 baseline, a keyframe a second)."""
    return subprocess.Popen(
        [ffmpeg, "-hide_banner", "-loglevel", "error", "-re", "-f", "lavfi",
         "-i", f"testsrc2=size={SIZE}x{SIZE}:rate={rate}", "-t", str(seconds),
         "-c:v", "libx264", "-profile:v", "baseline", "-preset", "ultrafast", "-tune", "zerolatency",
         "-g", str(rate), "-pix_fmt", "yuv420p", "-f", "flv", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def decode(ffmpeg, args, frames, timeout=60):
    """Runs ffmpeg with input `args`, decoding `frames` pictures to RGB: (N, SIZE, SIZE, 3)
    float32, ffmpeg's stderr."""
    run = subprocess.run(
        [ffmpeg, "-hide_banner", "-loglevel", "error", *args, "-frames:v", str(frames),
         # Every decoded picture once: rawvideo would otherwise be filled to a constant rate.
         "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        capture_output=True, timeout=timeout)
    data = np.frombuffer(run.stdout, dtype=np.uint8)
    n = len(data) // (SIZE * SIZE * 3)
    return data[:n * SIZE * SIZE * 3].reshape(n, SIZE, SIZE, 3).astype(np.float32), run.stderr.decode(errors="replace")


def raw_rtmp(port, data, half_close=False, wait_s=5):
    """Sends `data` to the RTMP port (then, with `half_close`, shuts the write side as a client
    cut off would); returns whether the server closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        try:
            while s.recv(4096):
                pass
            return True
        except socket.timeout:
            return False
        except OSError:
            return True


def rtmp_stats(base):
    return api(base, "GET", "/readyz", token=None)[1]["rtmp"]


def matched_to_outputs(frames, record_dir, summary, name):
    """Each decoded frame to its nearest recorded output and input (mean abs levels)."""
    outputs = np.stack(list(load_ppms(record_dir, "out").values()))
    inputs = np.stack(list(load_ppms(record_dir, "in").values()))
    to_out, to_in = [], []
    for f in frames:
        to_out.append(float(np.abs(outputs - f).mean(axis=(1, 2, 3)).min()))
        to_in.append(float(np.abs(inputs - f).mean(axis=(1, 2, 3)).min()))
    med_out, med_in = float(np.median(to_out)), float(np.median(to_in))
    summary[name] = {"frames": len(frames), "median_to_nearest_output": med_out, "median_to_nearest_input": med_in,
                     "recorded_outputs": len(outputs), "recorded_inputs": len(inputs)}
    # Two H.264 generations (ingest, then output) on the tiny model's noisy colours.
    check(med_out < 10.0, f"{name}: frames match engine outputs: median mean-abs {med_out:.2f} levels (< 10)")
    check(med_in > 5 * med_out, f"{name}: frames are not the input echoed: {med_in:.2f} vs {med_out:.2f} levels")


def bad_inputs(base, stream, port, ffmpeg, summary):
    sid, hls = stream["id"], stream["hls_url"]
    without_token = hls.split("?")[0]
    t0 = time.monotonic()
    LAST.clear()
    status, headers, _ = http("GET", hls, timeout=60)
    waited = time.monotonic() - t0
    check(status == 503 and is_error_envelope(LAST.get("body"), 503) and headers.get("retry-after") == "1",
          f"HLS before any output: {status} with Retry-After after {waited:.1f} s: {LAST.get('body', b'')[:120]!r}")
    cases = [
        ("HLS without a token", lambda: http("GET", without_token)[0], 401),
        ("HLS with a wrong token", lambda: http("GET", without_token + "?token=nope")[0], 401),
        ("HLS with the API token instead of the stream's",
         lambda: http("GET", without_token, headers={"Authorization": f"Bearer {API_TOKEN}"})[0], 401),
        ("HLS of an unknown stream", lambda: http("GET", hls.replace(sid, "str_unknown"))[0], 404),
        ("an HLS file that is no segment", lambda: http("GET", hls.replace("index.m3u8", "../../etc.ts"))[0], 404),
        ("an HLS segment never made", lambda: http("GET", hls.replace("index.m3u8", "999999.ts"))[0], 404),
        ("output_rtmp_url over TLS", lambda: api(base, "POST", "/v1/streams", {"output_rtmp_url": "rtmps://x.example/live/k"})[0], 422),
        ("output_rtmp_url not RTMP", lambda: api(base, "POST", "/v1/streams", {"output_rtmp_url": "http://x.example/live/k"})[0], 422),
        ("output_rtmp_url without a key", lambda: api(base, "POST", "/v1/streams", {"output_rtmp_url": "rtmp://x.example/live"})[0], 422),
    ]
    for name, call, want in cases:
        LAST.clear()
        got = call()
        check(got == want, f"{name}: {got} (want {want})")
        check(is_error_envelope(LAST.get("body"), want), f"  in the error envelope: {LAST.get('body', b'')[:160]!r}")
        if name.startswith("output_rtmp_url"):
            check(b"output_rtmp_url" in LAST.get("body", b""), "  the message names output_rtmp_url")
        check(api(base, "GET", f"/v1/streams/{sid}")[0] == 200, f"  server still serves after: {name}")

    before = rtmp_stats(base)
    check(raw_rtmp(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(1600)), "RTMP: an HTTP request is answered by a close")
    check(raw_rtmp(port, b"\x03", half_close=True), "RTMP: a handshake cut off after one byte ends in a close")
    bad_key = publish(ffmpeg, stream["rtmp_url"] + "/not-a-stream-key", 3)
    _, err = bad_key.communicate(timeout=30)
    check(bad_key.returncode != 0 and "unknown stream key" in err,
          f"RTMP: ffmpeg publishing with an unknown key fails with the server's reason: {err.strip()[:160]!r}")
    wrong_app = publish(ffmpeg, stream["rtmp_url"].rsplit("/", 1)[0] + "/other/" + stream["stream_key"], 3)
    _, err = wrong_app.communicate(timeout=30)
    check(wrong_app.returncode != 0, f"RTMP: ffmpeg publishing to another application fails: {err.strip()[:160]!r}")
    after = rtmp_stats(base)
    check(after["handshake_failures"] - before["handshake_failures"] >= 2, f"RTMP: bad handshakes counted: {after}")
    check(after["unknown_keys"] - before["unknown_keys"] == 1 and after["wrong_app"] - before["wrong_app"] == 1,
          "RTMP: the unknown key and the wrong application are counted")
    check(status_data(base, sid)["transport"]["frames_submitted"] == 0, "nothing from the refused publishers reached the stream")
    summary["rtmp_refusals"] = after


def main():
    ap = arguments(work=True)
    ap.add_argument("--ffmpeg", default="ffmpeg")
    args = ap.parse_args()
    ffmpeg = args.ffmpeg
    fixtures = os.path.abspath(args.fixtures)
    os.makedirs(args.work, exist_ok=True)
    record = os.path.join(args.work, "record")
    log_path = os.path.join(args.work, "server.log")
    server = serve(args.server, API_TOKEN, fixtures, params={"seed": 42, "delta": 0.7, "guidance_scale": 3.0},
                   # The RTMP push goes to an ffmpeg on 127.0.0.1: a LAN destination, which the
                   # server reaches only when told to (by default pushes go to public addresses).
                   flags=["--record", record, "--hls-segment-ms", SEGMENT_MS, "--allow-private-network"],
                   log_path=log_path)
    base = server.base
    summary = {}
    keys = []
    processes = []
    try:
        status, stream = api(base, "POST", "/v1/streams", {"params": {"prompt": "a watercolor of a lighthouse"}})
        check(status == 201, f"POST /v1/streams: {status}")
        sid = stream["id"]
        keys.append(stream["stream_key"])
        check(re.fullmatch(r"rtmp://127\.0\.0\.1:\d+/live", stream.get("rtmp_url") or "") is not None,
              f"the stream has rtmp_url: {stream.get('rtmp_url')}")
        check(stream.get("rtmp_publish_url") == f"{stream['rtmp_url']}/{stream['stream_key']}",
              "rtmp_publish_url is rtmp_url/stream_key")
        check(stream.get("hls_url", "").startswith(f"{base}/hls/{sid}/index.m3u8?token="), f"the stream has hls_url: {stream.get('hls_url')}")
        port = int(stream["rtmp_url"].split(":")[2].split("/")[0])
        bad_inputs(base, stream, port, ffmpeg, summary)

        # --- RTMP in, HLS out ----------------------------------------------------------------
        first = publish(ffmpeg, stream["rtmp_publish_url"], 40)
        processes.append(first)
        check(wait(lambda: status_data(base, sid)["transport"]["frames_submitted"] >= 5, 30),
              "ffmpeg's RTMP pictures reach the engine")
        second = publish(ffmpeg, stream["rtmp_publish_url"], 3)
        _, err = second.communicate(timeout=30)
        check(second.returncode != 0 and "already has a publisher" in err,
              f"a second RTMP publisher is refused while the first is live: {err.strip()[:120]!r}")
        LAST.clear()
        whip = http("POST", stream["whip_url"], "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
                    "m=video 9 UDP/TLS/RTP/SAVPF 102\r\nc=IN IP4 0.0.0.0\r\na=rtpmap:102 H264/90000\r\n"
                    "a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuv\r\n"
                    "a=fingerprint:sha-256 " + ":".join(["00"] * 32) + "\r\na=setup:actpass\r\na=mid:0\r\na=sendonly\r\n",
                    {"Content-Type": "application/sdp"})[0]
        check(whip == 409 and is_error_envelope(LAST.get("body"), 409), f"a WHIP offer while RTMP publishes: {whip} (want 409)")
        before = status_data(base, sid)["transport"]["frames_submitted"]
        check(wait(lambda: status_data(base, sid)["transport"]["frames_submitted"] > before + 5, 10),
              "the first RTMP publisher goes on after the refusals")

        status, headers, playlist = http("GET", stream["hls_url"], timeout=60)
        text = playlist.decode()
        check(status == 200 and headers.get("content-type") == "application/vnd.apple.mpegurl",
              f"GET the HLS playlist: {status} {headers.get('content-type')}")
        target = re.search(r"#EXT-X-TARGETDURATION:(\d+)", text)
        durations = [float(d) for d in re.findall(r"#EXTINF:([\d.]+),", text)]
        uris = [line for line in text.splitlines() if line and not line.startswith("#")]
        check(text.startswith("#EXTM3U") and target and int(target.group(1)) == 1,
              f"the playlist: #EXTM3U, target duration 1 s for {SEGMENT_MS} ms segments")
        check(durations and all(0.3 <= d <= int(target.group(1)) for d in durations),
              f"segment durations within the target: {durations}")
        check(uris and all(re.fullmatch(r"\d+\.ts\?token=[0-9a-f]+", u) for u in uris), f"segment URIs carry the token: {uris[:2]}")
        status, headers, segment = http("GET", stream["hls_url"].split("?")[0].replace("index.m3u8", uris[-1]))
        check(status == 200 and headers.get("content-type") == "video/mp2t" and len(segment) % 188 == 0
              and segment[:1] == b"\x47" and len(segment) > 188 * 3,
              f"a segment is MPEG-TS: {status}, {len(segment)} bytes")
        first_sequence = int(re.search(r"#EXT-X-MEDIA-SEQUENCE:(\d+)", text).group(1))
        hls_frames, err = decode(ffmpeg, ["-i", stream["hls_url"]], 40)
        check(len(hls_frames) == 40, f"ffmpeg decoded 40 frames from the HLS playlist ({len(hls_frames)}; {err.strip()[:120]!r})")
        text2 = http("GET", stream["hls_url"])[2].decode()
        later_sequence = int(re.search(r"#EXT-X-MEDIA-SEQUENCE:(\d+)", text2).group(1))
        check(later_sequence > first_sequence, f"the live playlist moves on: media sequence {first_sequence} -> {later_sequence}")

        # --- RTMP push of a second stream's output ------------------------------------------
        out_port = free_port()
        listen_url = f"rtmp://127.0.0.1:{out_port}/live/out-key"
        listener = subprocess.Popen(
            [ffmpeg, "-hide_banner", "-loglevel", "error", "-listen", "1", "-timeout", "30", "-i", listen_url,
             "-frames:v", "30", "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        processes.append(listener)
        time.sleep(1.0)  # ffmpeg listening
        status, pushed = api(base, "POST", "/v1/streams", {"params": {"prompt": "a red kite"}, "output_rtmp_url": listen_url})
        check(status == 201 and pushed.get("output_rtmp_url") == listen_url, f"a stream with output_rtmp_url: {status}")
        keys.append(pushed["stream_key"])
        feeder = publish(ffmpeg, pushed["rtmp_publish_url"], 30)
        processes.append(feeder)
        out, err = listener.communicate(timeout=90)
        data = np.frombuffer(out, dtype=np.uint8)
        n = len(data) // (SIZE * SIZE * 3)
        pushed_frames = data[:n * SIZE * SIZE * 3].reshape(n, SIZE, SIZE, 3).astype(np.float32)
        check(n == 30, f"the listening ffmpeg received 30 pushed frames ({n}; {err.decode(errors='replace').strip()[:120]!r})")
        push_status = status_data(base, pushed["id"])
        check(push_status["rtmp_push"]["frames_sent"] >= 30 and push_status["rtmp_push"]["publishes"] >= 1,
              f"status: the push counted its frames: {push_status['rtmp_push']}")
        summary["rtmp_push"] = push_status["rtmp_push"]
        summary["rtmp_push_latency"] = push_status["latency"]["delivery"]["rtmp_push"]
        feeder.kill()
        feeder.wait()

        # --- status, publisher gone, a new publisher ----------------------------------------
        final = status_data(base, sid)
        latency = final["latency"]
        check(latency["ingest"]["source"] == "rtmp", f"status: the ingest source is rtmp ({latency['ingest']['source']})")
        for path in (("ingest", "total"), ("engine",), ("encode",), ("delivery", "hls")):
            figure = latency
            for key in path:
                figure = figure[key]
            check(figure["count"] > 0 and figure["mean_ms"] > 0, f"status: latency {'.'.join(path)} measured: {figure['mean_ms']:.2f} ms")
        check(final["hls"]["segments"] >= 3 and final["hls"]["segment_requests"] >= 1, f"status: HLS counters: {final['hls']}")
        check(final["gateway_status"]["ingest_metrics"]["stats"]["peer_conn_stats"]["BytesReceived"] > 0,
              "status: ingest metrics count the RTMP bytes")
        summary["latency"] = latency
        summary["hls"] = final["hls"]
        first.kill()
        first.wait()
        check(wait(lambda: status_data(base, sid)["state"] == "DEGRADED_INPUT", 5),
              f"when the RTMP publisher stops the stream is DEGRADED_INPUT: {status_data(base, sid)['state']}")
        before = status_data(base, sid)["transport"]["frames_submitted"]
        again = publish(ffmpeg, stream["rtmp_publish_url"], 4)
        processes.append(again)
        check(wait(lambda: status_data(base, sid)["transport"]["frames_submitted"] > before + 5, 30),
              "a new RTMP publisher takes the stream again")
        again.wait(timeout=30)
        summary["readyz_rtmp"] = rtmp_stats(base)
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
        server.stop()

    with open(log_path) as f:
        log = f.read()
    check("RTMP publisher connected" in log and "RTMP push publishing" in log, "the log has the RTMP lines")
    check(not any(k in log for k in keys), "the log never shows a stream key")
    matched_to_outputs(hls_frames, os.path.join(record, sid), summary, "HLS")
    matched_to_outputs(pushed_frames, os.path.join(record, pushed["id"]), summary, "RTMP push")
    finish(summary)


if __name__ == "__main__":
    main()
