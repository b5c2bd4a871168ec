"""Transport figures of the server example (not a test): one aiortc publisher at SIZE x SIZE and
N aiortc viewers for S seconds over the tiny fixture, then the server's own counters.

Prints JSON: the server's transport summary (decode, encode, engine queueing, transport-path
latency per frame: access unit complete -> handed to the first viewer's track, minus the pipeline
call) and, per viewer, how many frames it received against the frames the engine put out while
it watched.

usage: figures.py --server BIN --fixtures DIR --work DIR [--size 512] [--viewers 1] [--seconds 15]
"""

import asyncio
import json
import os
import sys
import time

import numpy as np
from aiortc import RTCPeerConnection, VideoStreamTrack
from av import VideoFrame

import e2e

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from server_harness import api, arguments, serve  # noqa: E402


class Camera(VideoStreamTrack):
    def __init__(self, size):
        super().__init__()
        self.size, self.count = size, 0
        y, x = np.mgrid[0:size, 0:size].astype(np.float32)
        self.x, self.y = x, y

    async def recv(self):
        pts, time_base = await self.next_timestamp()
        t = self.count * 0.15
        r = 127 + 100 * np.sin((self.x + self.y) / 40.0 + t)
        g = 127 + 100 * np.sin((self.x - self.y) / 60.0 - t)
        b = np.full_like(r, 90.0)
        rgb = np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)
        frame = VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        self.count += 1
        return frame


async def run(base, stream, size, viewers, seconds):
    publisher = RTCPeerConnection()
    e2e.h264_only(publisher.addTransceiver(Camera(size), direction="sendonly"))
    await e2e.offer_to(publisher, stream["whip_url"])
    counts = [0] * viewers
    pcs = []
    for i in range(viewers):
        pc = RTCPeerConnection()
        e2e.h264_only(pc.addTransceiver("video", direction="recvonly"))

        def on_track(track, i=i):
            async def consume():
                while True:
                    try:
                        await asyncio.wait_for(track.recv(), 60)
                    except Exception:
                        break
                    counts[i] += 1
            asyncio.ensure_future(consume())

        pc.on("track", on_track)
        await e2e.offer_to(pc, stream["whep_url"])
        pcs.append(pc)
    await asyncio.sleep(3)  # connect, first keyframe
    start = await e2e.transport_status(base, stream["id"])
    counts_start = list(counts)
    await asyncio.sleep(seconds)
    end = await e2e.transport_status(base, stream["id"])
    got = [c - s for c, s in zip(counts, counts_start)]
    encoded = end["frames_encoded"] - start["frames_encoded"]
    for pc in pcs + [publisher]:
        await pc.close()
    return end, got, encoded


def main():
    ap = arguments(work=True)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--viewers", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=15)
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    server = serve(args.server, e2e.API_TOKEN, os.path.abspath(args.fixtures),
                   params={"width": args.size, "height": args.size},
                   flags=["--max-viewers", max(args.viewers, 1)], log_path=os.path.join(args.work, "server.log"))
    base = server.base
    try:
        _, stream = api(base, "POST", "/v1/streams", {"params": {"prompt": "a lighthouse"}})
        transport, got, encoded = asyncio.run(run(base, stream, args.size, args.viewers, args.seconds))
        status = e2e.status_data(base, stream["id"])["engine"]
    finally:
        server.stop()
    print(json.dumps({
        "size": args.size, "viewers": args.viewers, "seconds": args.seconds,
        "engine": {k: status[k] for k in ("input_fps", "output_fps", "timings")},
        "frames_encoded_in_window": encoded,
        "frames_received_per_viewer": got,
        "worst_viewer_share": min(got) / max(encoded, 1),
        "transport": {k: transport[k] for k in ("decode", "ingest", "encode", "send", "engine_queueing", "transport",
                                                "frames_dropped_for_viewers", "keyframes_encoded",
                                                "plis_sent", "keyframe_requests_received")},
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }, indent=1))


if __name__ == "__main__":
    main()
