"""Latency figures of every way in and out (not a test): at SIZE x SIZE over the tiny fixture,
each path runs for S seconds and the server's own per-path latency report is printed.

- whip_whep: aiortc publishes over WHIP and watches over WHEP;
- scope: one aiortc connection both ways (POST /api/v1/webrtc/offer);
- rtmp_hls_push: ffmpeg publishes over RTMP; the output is read as HLS (ffmpeg) and pushed over
  RTMP to a listening ffmpeg.

Each path's figures are the server's (GET /v1/streams/{id}/status `latency`): ingest (access unit
complete -> submitted), queueing and engine (inside the engine), encode, and delivery per output
(WebRTC: taken from the engine -> on the first viewer's track; HLS: encoded -> its segment
published; RTMP push: encoded -> written to the socket). For HLS a player adds its own buffer on
top (it starts about three segments from the live edge).

Cameras send RATE (10) pictures a second. On a small CPU the tiny fixture at 512² makes a frame in
seconds, so most frames wait in the engine's queue (`queueing`): that figure is the engine's
backlog, not the transport's; ingest, encode and delivery are the transport's own.

usage: path_figures.py --server BIN --fixtures DIR --work DIR [--size 512] [--seconds 45] [--ffmpeg ffmpeg]
"""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import fractions

from aiortc import RTCPeerConnection, RTCSessionDescription

import e2e
import figures

# Cameras send 10 pictures a second: the peers (aiortc's Python encoder, ffmpeg) share this
# machine's cores with the engine, and the figures are about the server's own share.
RATE = 10


class Camera(figures.Camera):
    """figures.Camera at RATE pictures a second."""

    async def recv(self):
        if not hasattr(self, "_start"):
            self._start, self._n = time.monotonic(), 0
        self._n += 1
        wait = self._start + self._n / RATE - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        frame = await super().recv()
        frame.pts, frame.time_base = self._n * (90_000 // RATE), fractions.Fraction(1, 90_000)
        return frame

    async def next_timestamp(self):
        return 0, fractions.Fraction(1, 90_000)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from server_harness import api, arguments, serve  # noqa: E402


def summary(latency):
    """mean / p95 in ms of each figure of a `latency` report."""
    def pick(s):
        return {"mean_ms": round(s["mean_ms"], 2), "p95_ms": round(s["p95_ms"], 2), "count": s["count"]} if s else None
    return {
        "ingest": pick(latency["ingest"]["total"]), "ingest_decode": pick(latency["ingest"]["decode"]),
        "queueing": pick(latency["queueing"]), "engine": pick(latency["engine"]), "encode": pick(latency["encode"]),
        "delivery": {k: pick(v) for k, v in latency["delivery"].items()},
        "transport_added": pick(latency["transport_added"]),
    }


async def whip_whep(base, size, seconds):
    _, stream = await asyncio.to_thread(api, base, "POST", "/v1/streams", {"params": {"prompt": "a lighthouse"}})
    publisher = RTCPeerConnection()
    e2e.h264_only(publisher.addTransceiver(Camera(size), direction="sendonly"))
    await e2e.offer_to(publisher, stream["whip_url"])
    viewer = RTCPeerConnection()
    e2e.h264_only(viewer.addTransceiver("video", direction="recvonly"))

    @viewer.on("track")
    def on_track(track):
        async def consume():
            while True:
                try:
                    await asyncio.wait_for(track.recv(), 30)
                except Exception:
                    break
        asyncio.ensure_future(consume())

    await e2e.offer_to(viewer, stream["whep_url"])
    await asyncio.sleep(seconds)
    status = await asyncio.to_thread(e2e.status_data, base, stream["id"])
    await viewer.close()
    await publisher.close()
    await asyncio.to_thread(api, base, "DELETE", f"/v1/streams/{stream['id']}")
    return status


async def scope(base, size, seconds):
    pc = RTCPeerConnection()
    pc.createDataChannel("parameters", ordered=True)
    e2e.h264_only(pc.addTransceiver(Camera(size), direction="sendrecv"))

    @pc.on("track")
    def on_track(track):
        async def consume():
            while True:
                try:
                    await asyncio.wait_for(track.recv(), 30)
                except Exception:
                    break
        asyncio.ensure_future(consume())

    await pc.setLocalDescription(await pc.createOffer())
    status, answer = await asyncio.to_thread(
        api, base, "POST", "/api/v1/webrtc/offer",
        {"sdp": pc.localDescription.sdp, "type": "offer", "initialParameters": {"prompts": [{"text": "a lighthouse"}]}})
    if status != 200:
        raise RuntimeError(f"offer: {status} {answer}")
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
    await asyncio.sleep(seconds)
    report = await asyncio.to_thread(e2e.status_data, base, answer["sessionId"])
    await asyncio.to_thread(api, base, "DELETE", f"/api/v1/webrtc/offer/{answer['sessionId']}")
    await pc.close()
    return report


def rtmp_hls_push(base, size, seconds, ffmpeg):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        out_port = s.getsockname()[1]
    listen = subprocess.Popen([ffmpeg, "-hide_banner", "-loglevel", "error", "-listen", "1", "-timeout", "60",
                               "-i", f"rtmp://127.0.0.1:{out_port}/live/out", "-f", "null", "-"])
    time.sleep(1)
    _, stream = api(base, "POST", "/v1/streams", {"params": {"prompt": "a lighthouse"},
                                                   "output_rtmp_url": f"rtmp://127.0.0.1:{out_port}/live/out"})
    push = subprocess.Popen(
        [ffmpeg, "-hide_banner", "-loglevel", "error", "-re", "-f", "lavfi", "-i", f"testsrc2=size={size}x{size}:rate={RATE}",
         "-t", str(seconds + 10), "-c:v", "libx264", "-profile:v", "baseline", "-preset", "ultrafast", "-tune", "zerolatency",
         "-g", str(RATE), "-pix_fmt", "yuv420p", "-f", "flv", stream["rtmp_publish_url"]])
    time.sleep(3)
    reader = subprocess.Popen([ffmpeg, "-hide_banner", "-loglevel", "error", "-i", stream["hls_url"], "-f", "null", "-"])
    time.sleep(seconds)
    report = e2e.status_data(base, stream["id"])
    for p in (reader, push, listen):
        p.kill()
        p.wait()
    api(base, "DELETE", f"/v1/streams/{stream['id']}")
    return report


def main():
    ap = arguments(work=True)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--seconds", type=float, default=45)
    ap.add_argument("--ffmpeg", default="ffmpeg")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    server = serve(args.server, e2e.API_TOKEN, os.path.abspath(args.fixtures),
                   params={"width": args.size, "height": args.size},
                   log_path=os.path.join(args.work, "server.log"))
    results = {}
    try:
        results["whip_whep"] = asyncio.run(whip_whep(server.base, args.size, args.seconds))
        results["scope"] = asyncio.run(scope(server.base, args.size, args.seconds))
        results["rtmp_hls_push"] = rtmp_hls_push(server.base, args.size, args.seconds, args.ffmpeg)
    finally:
        server.stop()
    out = {"size": args.size, "seconds": args.seconds, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    for name, report in results.items():
        out[name] = summary(report["latency"])
        out[name]["engine_fps"] = {k: round(report["engine"][k], 2) for k in ("input_fps", "output_fps")}
        if report.get("hls"):
            out[name]["hls_segment_ms"] = round(report["hls"]["segment_duration"]["mean_ms"], 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
