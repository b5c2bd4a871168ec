"""The DJ visualiser's default body through `sdstream serve`, with aiortc as the camera and the
viewer: five sd21 ControlNets fed by pose_tensorrt, soft_edge, canny, depth_tensorrt and
passthrough, on the tiny stand-ins of tests/fixtures/published-root: the tiny sd-turbo,
ControlNets and processor networks under their real ids and in the layouts their repositories
publish (each thibaud net a lone fp16 `diffusion_pytorch_model.bin` with a diffusers 0.15
config, the OpenPose body network in torch's legacy format; see
tests/reference/make_published_layouts.py).

1. Starts the server with tests/fixtures/published-root as the model root; creates a stream with
   the body (512x512, t_index_list [12, 20, 24]).
2. aiortc publishes examples/frames over WHIP and plays the stream over WHEP; frames must reach
   the viewer, and they must be the engine's pictures, not the camera's.
3. The status reports every one of the five processors' milliseconds (`engine.processor_ms`),
   the frames processed, and no error.
4. PATCH switches net 2's preprocessor from canny to hed, a processor whose network is not
   loaded yet: the answer says "hot", the network loads beside the serving stream, the switch
   happens without a reload, and hed's time then shows in the status while frames keep coming.

usage: dj_body.py --server BIN --fixtures DIR [--timeout S]
Exits non-zero on any failed check; prints a JSON summary.
"""

import asyncio
import os
import sys
import time

import numpy as np
from aiortc import RTCPeerConnection, VideoStreamTrack
from av import VideoFrame
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from e2e import h264_only, offer_to, status_data  # noqa: E402
from server_harness import api, arguments, check, finish, http, serve  # noqa: E402

API_TOKEN = "dj-api-token"
SIZE = 512
PROCESSORS = ["pose_tensorrt", "soft_edge", "canny", "depth_tensorrt", "passthrough"]


def dj_body():
    def net(kind, scale, preprocessor, params):
        return {"model_id": f"thibaud/controlnet-sd21-{kind}-diffusers", "conditioning_scale": scale,
                "preprocessor": preprocessor, "preprocessor_params": params, "enabled": True}

    return {
        "model_id": "stabilityai/sd-turbo",
        "prompt": "cartoon magical dj blue sparkle",
        "width": SIZE, "height": SIZE,
        "num_inference_steps": 25, "t_index_list": [12, 20, 24], "seed": 789,
        "controlnets": [
            net("openpose", 0.75, "pose_tensorrt", {"confidence_threshold": 0.5}),
            net("hed", 0.2, "soft_edge", {}),
            net("canny", 0.2, "canny", {"low_threshold": 100, "high_threshold": 200}),
            net("depth", 0.75, "depth_tensorrt", {}),
            net("color", 0.2, "passthrough", {}),
        ],
    }


class Camera(VideoStreamTrack):
    """examples/frames in turn, 512x512, at 10 frames a second."""

    def __init__(self, frames):
        super().__init__()
        self.frames, self.count = frames, 0

    async def recv(self):
        await asyncio.sleep(0.1)
        pts, time_base = await self.next_timestamp()
        frame = VideoFrame.from_ndarray(self.frames[self.count % len(self.frames)], format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        self.count += 1
        return frame


async def wait_for(condition, timeout, step=0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(condition):
            return True
        await asyncio.sleep(step)
    return False


async def run(base, stream, frames, timeout, summary):
    sid = stream["id"]
    received = []
    publisher = RTCPeerConnection()
    h264_only(publisher.addTransceiver(Camera(frames), direction="sendonly"))
    whip = await offer_to(publisher, stream["whip_url"])
    viewer = RTCPeerConnection()
    h264_only(viewer.addTransceiver("video", direction="recvonly"))
    done = asyncio.Event()

    @viewer.on("track")
    def on_track(track):
        async def consume():
            while not done.is_set():
                try:
                    frame = await asyncio.wait_for(track.recv(), 5)
                except asyncio.TimeoutError:
                    continue
                except Exception:
                    break
                received.append(frame.to_ndarray(format="rgb24"))

        asyncio.ensure_future(consume())

    whep = await offer_to(viewer, stream["whep_url"])

    def engine():
        return status_data(base, sid)["engine"]

    check(await wait_for(lambda: engine()["frames_processed"] >= 3, timeout),
          f"the engine processed 3 frames of the DJ body within {timeout} s")
    check(await wait_for(lambda: len(received) >= 2, 60), f"frames reached the WHEP viewer: {len(received)}")
    status = engine()
    ms = status["processor_ms"]
    summary["processor_ms"] = ms
    summary["frames_processed"] = status["frames_processed"]
    for name in PROCESSORS:
        check(ms.get(name, 0) > 0, f"status: {name} ran ({ms.get(name)} ms in the last frame)")
    check(set(ms) == set(PROCESSORS) | {"safety_checker"},
          f"status: exactly the five processors and the safety checker (on by default) ran: {sorted(ms)}")
    check(status.get("safety_frames_checked", 0) >= 3 and status.get("safety_frames_flagged") == 0,
          f"status: the safety checker saw the frames and flagged none "
          f"({status.get('safety_frames_checked')}, {status.get('safety_frames_flagged')})")
    check(status["last_error"] is None, f"no error: {status['last_error']}")
    check(status["frames_failed"] == 0, "no frame failed")

    if received:
        # The viewer gets the engine's picture, not the camera echoed (the tiny random networks
        # draw nothing like the frames).
        got = received[-1].astype(np.float32)
        nearest_input = min(float(np.abs(got - f.astype(np.float32)).mean()) for f in frames)
        summary["received_vs_nearest_input_levels"] = nearest_input
        check(nearest_input > 20, f"received frames are not the camera's: {nearest_input:.1f} levels from the nearest input")

    # A switch to a processor whose network is not loaded: hot, loaded beside the stream.
    before = engine()
    patch = {"params": {"controlnets": [dict(c) for c in dj_body()["controlnets"]]}}
    patch["params"]["controlnets"][2]["preprocessor"] = "hed"
    patch["params"]["controlnets"][2]["preprocessor_params"] = {}
    status_code, answer = await asyncio.to_thread(api, base, "PATCH", f"/v1/streams/{sid}", patch)
    check(status_code == 200 and answer.get("update") == "hot", f"PATCH canny -> hed is hot: {status_code} {answer.get('update')}")
    version = before["params_version"] + 1
    check(await wait_for(lambda: engine()["serving_params_version"] == version, timeout),
          "the serving stream took the switch once HED's network was loaded")
    processed = engine()["frames_processed"]
    check(await wait_for(lambda: engine()["frames_processed"] >= processed + 2, timeout),
          "frames keep coming after the switch")
    after = engine()
    summary["after_switch_processor_ms"] = after["processor_ms"]
    check("hed" in after["processor_ms"] and "canny" not in after["processor_ms"],
          f"status: hed replaced canny: {sorted(after['processor_ms'])}")
    check(after["restart_count"] == before["restart_count"] and after["reload_failures"] == 0,
          "the switch needed no reload")
    done.set()
    for location in (whep, whip):
        url = location if location.startswith("http") else base + location
        await asyncio.to_thread(http, "DELETE", url)
    await publisher.close()
    await viewer.close()


def main():
    ap = arguments()
    ap.add_argument("--timeout", type=float, default=420)
    args = ap.parse_args()
    fixtures = os.path.abspath(args.fixtures)
    root = os.path.join(fixtures, "published-root")
    frames_dir = os.path.join(fixtures, "..", "..", "examples", "frames")
    frames = [np.asarray(Image.open(os.path.join(frames_dir, f)).convert("RGB"))
              for f in sorted(os.listdir(frames_dir)) if f.endswith(".png")]
    server = serve(args.server, API_TOKEN, root,
                   params={"model_id": "stabilityai/sd-turbo", "width": SIZE, "height": SIZE}, allow=())
    summary = {}
    try:
        status, stream = api(server.base, "POST", "/v1/streams", {"pipeline": "streamdiffusion", "params": dj_body()})
        check(status == 201, f"POST /v1/streams with the DJ body: {status} {stream if status != 201 else ''}")
        if status == 201:
            nets = stream["params"]["controlnets"]
            check([n["preprocessor"] for n in nets] == PROCESSORS, "the stream keeps the body's five preprocessors")
            asyncio.run(run(server.base, stream, frames, args.timeout, summary))
            api(server.base, "DELETE", f"/v1/streams/{stream['id']}")
    finally:
        server.stop()
    finish(summary)


if __name__ == "__main__":
    main()
