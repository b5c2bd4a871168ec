"""End-to-end test of the Scope-style session (`POST /api/v1/webrtc/offer`) with aiortc, a WebRTC
implementation that is not ours, against `sdstream serve` over the tiny fixture.

1. `GET /api/v1/webrtc/ice-servers` lists the --ice-server flags (STUN alone, TURN with its user
   name and credential), in the W3C RTCIceServer shape.
2. Bad input, each answered in the error envelope with Scope's `detail`, no stream left behind,
   the server still serving: no token (401), no `sdp` (422), `type` not "offer" (422), garbage
   SDP (400), an offer whose video is VP8 only (400 naming H.264), parameters that cannot be
   mapped (422 naming them), a pipeline not served (422), a transition over too many frames
   (422), trickle to an unknown session (404), a malformed candidate (400), candidates not a
   list (422).
3. One aiortc peer connection sends the synthetic camera (the same pattern as e2e.py) and
   receives the output on the same connection; its offer goes out without candidates, which
   follow by PATCH (counted by the server); a `parameters` data channel carries updates:
   - a prompt change is answered `parameters_applied` / `hot`, makes a new params version
     without a reload, and the frames received afterwards are the new prompt's outputs
     (compared with `sdstream replay`'s never-switched rendering of the same inputs, as e2e.py
     does for PATCH);
   - malformed JSON and an unsupported key are answered `parameters_rejected` naming what was
     wrong, the params version stays, and frames keep coming;
   - `paused: true` stops the output (the server counts decoded pictures it held back) and
     `paused: false` brings it back.
4. Status: the ingest source is `duplex`, per-path latency figures are filled in.
5. `DELETE /api/v1/webrtc/offer/{id}` sends `stream_stopped` on the channel, then the session
   and its stream end; a second session whose client simply closes its connection is ended
   by the server (its stream deleted) within seconds.

usage: scope.py --server BIN --fixtures DIR --work DIR [--seconds S]
Exits non-zero on any failed check; prints a JSON summary.
"""

import asyncio
import json
import os
import re
import subprocess
import sys
import time

from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription

import e2e
from e2e import API_TOKEN, Camera, compare, h264_only, wait_for

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from server_harness import (  # noqa: E402
    LAST, api, arguments, check, finish, http, is_error_envelope, serve, tiny_settings,
)

STUN = "stun:stun.example.org:3478"
TURN = "turn:turn.example.org:3478?transport=udp"


def scope_call(base, method, path, payload=None, token=API_TOKEN, raw=None):
    """A call to a Scope route: (status, parsed JSON or None)."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    body = raw if raw is not None else (json.dumps(payload) if payload is not None else None)
    status, _, data = http(method, base + path, body, headers)
    try:
        return status, json.loads(data) if data else None
    except ValueError:
        return status, None


def stream_ids(base):
    return {s["id"] for s in api(base, "GET", "/v1/streams")[1]["data"]}


def has_detail(status):
    body = LAST.get("body") or b""
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError):
        detail = None
    return is_error_envelope(body, status) and isinstance(detail, str) and detail


async def local_offer(video_codec="video/H264", camera=True):
    """An aiortc offer: camera (sendrecv) or a bare video transceiver, an audio m-line
    (recvonly, as Scope's page adds) and a `parameters` data channel."""
    pc = RTCPeerConnection()
    channel = pc.createDataChannel("parameters", ordered=True)
    transceiver = pc.addTransceiver(Camera() if camera else "video", direction="sendrecv")
    codecs = [c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType == video_codec]
    transceiver.setCodecPreferences(codecs)
    pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, channel


async def offer_sdp(video_codec):
    """The SDP of an offer whose peer is closed at once (for requests that must fail)."""
    pc, _ = await local_offer(video_codec, camera=False)
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


def bad_inputs(base, summary):
    before = stream_ids(base)
    vp8_sdp = asyncio.run(offer_sdp("video/VP8"))
    good_sdp = asyncio.run(offer_sdp("video/H264"))
    offer = "/api/v1/webrtc/offer"
    cases = [
        ("offer without a token", lambda: scope_call(base, "POST", offer, {"sdp": good_sdp, "type": "offer"}, token=None), 401, None),
        ("offer without sdp", lambda: scope_call(base, "POST", offer, {"type": "offer"}), 422, "sdp"),
        ("offer whose type is answer", lambda: scope_call(base, "POST", offer, {"sdp": good_sdp, "type": "answer"}), 422, "type"),
        ("offer with malformed JSON", lambda: scope_call(base, "POST", offer, raw="{\"sdp\":"), 400, None),
        ("offer with garbage SDP", lambda: scope_call(base, "POST", offer, {"sdp": "not sdp at all", "type": "offer"}), 400, "SDP"),
        ("offer whose video is VP8 only", lambda: scope_call(base, "POST", offer, {"sdp": vp8_sdp, "type": "offer"}), 400, "H.264"),
        ("offer with parameters that cannot be mapped",
         lambda: scope_call(base, "POST", offer, {"sdp": good_sdp, "type": "offer",
                                                  "initialParameters": {"noise_scale": 0.7, "vace_enabled": True}}), 422, "noise_scale"),
        ("offer for another pipeline",
         lambda: scope_call(base, "POST", offer, {"sdp": good_sdp, "type": "offer",
                                                  "initialParameters": {"pipeline_ids": ["longlive"]}}), 422, "pipeline_ids"),
        ("offer with a transition over 5000 frames",
         lambda: scope_call(base, "POST", offer, {"sdp": good_sdp, "type": "offer",
                                                  "initialParameters": {"transition": {"target_prompts": [{"text": "x"}],
                                                                                       "num_steps": 5000}}}),
         422, "num_steps"),
        ("offer with invalid StreamDiffusion params",
         lambda: scope_call(base, "POST", offer, {"sdp": good_sdp, "type": "offer",
                                                  "initialParameters": {"guidance_scale": "high"}}), 422, "guidance_scale"),
        ("trickle to an unknown session",
         lambda: scope_call(base, "PATCH", offer + "/str_nosuchsession",
                            {"candidates": [{"candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host", "sdpMid": "0"}]}), 404, None),
        ("ice-servers without a token", lambda: scope_call(base, "GET", "/api/v1/webrtc/ice-servers", token=None), 401, None),
    ]
    for name, call, want, names in cases:
        LAST.clear()
        got, body = call()
        check(got == want, f"{name}: {got} (want {want})")
        check(has_detail(want), f"  in the error envelope with Scope's detail: {LAST.get('body', b'')[:200]!r}")
        if names:
            check(names in (body or {}).get("error", ""), f"  the message names {names!r}")
        check(api(base, "GET", "/readyz", token=None)[0] == 200, f"  server still serves after: {name}")
    check(stream_ids(base) == before, "no failed offer left a stream behind")
    summary["bad_inputs"] = len(cases)


async def session(base, record_root, seconds, summary):
    pc, channel = await local_offer()
    messages = []  # (monotonic time, parsed)
    channel.on("message", lambda m: messages.append((time.monotonic(), json.loads(m))))
    received = []  # (monotonic time, HxWx3)
    done = asyncio.Event()

    @pc.on("track")
    def on_track(track):
        if track.kind != "video":
            return

        async def consume():
            while not done.is_set():
                try:
                    frame = await asyncio.wait_for(track.recv(), 5)
                except asyncio.TimeoutError:
                    continue  # paused: no frames for a while
                except Exception:
                    break
                received.append((time.monotonic(), frame.to_ndarray(format="rgb24")))

        asyncio.ensure_future(consume())

    # The offer goes out without candidates; they follow by PATCH (trickle ICE).
    sdp = pc.localDescription.sdp
    lines = sdp.split("\r\n")
    candidates, mid, stripped = [], None, []
    for line in lines:
        if line.startswith("a=mid:"):
            mid = line[len("a=mid:"):]
        if line.startswith("a=candidate:"):
            candidates.append({"candidate": line[2:], "sdpMid": mid, "sdpMLineIndex": None})
            continue
        if line == "a=end-of-candidates":
            continue
        stripped.append(line)
    status, answer = await asyncio.to_thread(
        scope_call, base, "POST", "/api/v1/webrtc/offer",
        {"sdp": "\r\n".join(stripped), "type": "offer",
         "initialParameters": {"prompts": [{"text": "a watercolor of a lighthouse", "weight": 1.0}],
                               "pipeline_ids": ["streamdiffusion"], "input_mode": "video"},
         "user_id": "e2e"})
    check(status == 200, f"POST /api/v1/webrtc/offer: {status}")
    check(answer.get("type") == "answer" and answer.get("sdp", "").startswith("v=0"), "the answer is {sdp, type: answer}")
    sid = answer["sessionId"]
    check(sid in stream_ids(base), "the session is a stream of the API (its id is the session id)")
    check(api(base, "GET", f"/v1/streams/{sid}")[1]["params"]["prompt"] == "a watercolor of a lighthouse",
          "initialParameters' prompts became the stream's prompt")
    # The answer's video section both sends and receives.
    video = answer["sdp"].split("m=video", 1)[1].split("m=", 1)[0]
    check("a=sendrecv" in video, "the answer's video section is sendrecv (output on the input's own section)")
    check(len(candidates) > 0, f"aiortc gathered candidates to trickle: {len(candidates)}")
    status, _ = await asyncio.to_thread(scope_call, base, "PATCH", f"/api/v1/webrtc/offer/{sid}",
                                        {"candidates": candidates + [{"candidate": "", "sdpMid": mid}]})
    check(status == 204, f"PATCH the trickled candidates (and end-of-candidates): {status}")
    for name, payload, want in [
        ("a malformed candidate", {"candidates": [{"candidate": "candidate:garbage", "sdpMid": mid}]}, 400),
        ("a candidate without sdpMid or sdpMLineIndex",
         {"candidates": [{"candidate": candidates[0]["candidate"]}]}, 400),
        ("candidates that are not a list", {"candidates": "a=candidate"}, 422),
    ]:
        LAST.clear()
        got, _ = await asyncio.to_thread(scope_call, base, "PATCH", f"/api/v1/webrtc/offer/{sid}", payload)
        check(got == want, f"PATCH with {name}: {got} (want {want})")
        check(has_detail(want), f"  in the error envelope with Scope's detail: {LAST.get('body', b'')[:160]!r}")
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
    transport = await e2e.transport_status(base, sid)
    check(transport["remote_candidates_added"] == len(candidates),
          f"the server added every trickled candidate: {transport['remote_candidates_added']} of {len(candidates)}")

    check(await wait_for(lambda: len(received) >= 40, seconds * 2),
          f"output frames arrive on the offer's own connection: {len(received)}")
    check(await wait_for(lambda: channel.readyState == "open", seconds), "the parameters channel is open")

    def replies(after):
        return [m for t, m in messages if t >= after]

    async def send(message):
        at = time.monotonic()
        channel.send(message if isinstance(message, str) else json.dumps(message))
        ok = await wait_for(lambda: len(replies(at)) >= 1, 10)
        return replies(at)[0] if ok else {}

    before = e2e.status_data(base, sid)["engine"]
    patch_time = time.monotonic()
    reply = await send({"prompts": [{"text": "an oil painting of a red fox in snow", "weight": 1.0}]})
    check(reply.get("type") == "parameters_applied" and reply.get("update") == "hot",
          f"a prompt change on the channel is applied hot: {reply}")
    after = e2e.status_data(base, sid)["engine"]
    check(after["params_version"] == before["params_version"] + 1 == reply.get("params_version"),
          "the prompt change made one new params version, the one the reply names")
    check(not after["reloading"] and after["restart_count"] == before["restart_count"], "no reload and no restart")
    n = len(received)
    check(await wait_for(lambda: len(received) >= n + 40, seconds * 2), "frames keep coming after the change")

    version = e2e.status_data(base, sid)["engine"]["params_version"]
    for name, message, field in [
        ("malformed JSON", "{\"prompts\": [", "message"),
        ("an unsupported key", {"kv_cache_attention_bias": 0.3}, "kv_cache_attention_bias"),
        ("an invalid value", {"guidance_scale": "loud"}, "guidance_scale"),
        ("a transition too long", {"transition": {"target_prompts": [{"text": "x"}], "num_steps": 5000}},
         "transition.num_steps"),
    ]:
        reply = await send(message)
        check(reply.get("type") == "parameters_rejected" and field in reply.get("fields", []) and reply.get("error_message"),
              f"{name} on the channel is rejected naming {field}: {reply}")
    check(e2e.status_data(base, sid)["engine"]["params_version"] == version, "rejected messages changed no params")
    n = len(received)
    check(await wait_for(lambda: len(received) >= n + 10, seconds), "frames keep coming after the rejected messages")

    # Pause: the output stops; resume: it comes back.
    reply = await send({"paused": True})
    check(reply.get("type") == "parameters_applied" and reply.get("paused") is True and reply.get("update") == "unchanged",
          f"paused: true is applied: {reply}")
    await asyncio.sleep(2.0)  # frames in flight drain
    t_paused = await e2e.transport_status(base, sid)
    n_paused = len(received)
    await asyncio.sleep(2.0)
    t_still = await e2e.transport_status(base, sid)
    check(t_still["frames_submitted"] == t_paused["frames_submitted"] and t_still["frames_paused"] > t_paused["frames_paused"],
          f"while paused no picture reaches the engine ({t_still['frames_paused'] - t_paused['frames_paused']} held back)")
    check(len(received) - n_paused <= 2, f"while paused the output stops: {len(received) - n_paused} frames in 2 s")
    reply = await send({"paused": False})
    check(reply.get("paused") is False, f"paused: false is applied: {reply}")
    n = len(received)
    check(await wait_for(lambda: len(received) >= n + 10, seconds), "after paused: false the output resumes")

    final = e2e.status_data(base, sid)
    latency = final["latency"]
    check(latency["ingest"]["source"] == "duplex", f"status: the ingest source is duplex ({latency['ingest']['source']})")
    for path in (("ingest", "total"), ("engine",), ("encode",), ("delivery", "webrtc")):
        figure = latency
        for key in path:
            figure = figure[key]
        check(figure["count"] > 0 and figure["mean_ms"] > 0, f"status: latency {'.'.join(path)} measured: {figure['mean_ms']:.2f} ms")
    check(final["transport"]["duplex_sessions_answered"] == 1, "status: one duplex session answered")
    summary["latency"] = latency
    summary["transport"] = {k: final["transport"][k] for k in (
        "frames_submitted", "frames_paused", "frames_encoded", "frames_sent", "control_messages_received",
        "control_messages_sent", "remote_candidates_added")}

    # DELETE: stream_stopped first, then the session and its stream end.
    at = time.monotonic()
    status, _ = await asyncio.to_thread(scope_call, base, "DELETE", f"/api/v1/webrtc/offer/{sid}")
    check(status == 204, f"DELETE /api/v1/webrtc/offer/{{id}}: {status}")
    stopped = await wait_for(lambda: any(m.get("type") == "stream_stopped" for m in replies(at)), 5)
    check(stopped, f"stream_stopped arrived on the channel: {replies(at)}")
    check(api(base, "GET", f"/v1/streams/{sid}")[0] == 404, "the session's stream is gone")
    check(await wait_for(lambda: pc.connectionState == "closed", 10), f"the server closed the connection: {pc.connectionState}")
    status, _ = await asyncio.to_thread(scope_call, base, "DELETE", f"/api/v1/webrtc/offer/{sid}")
    check(status == 204, f"DELETE again (Scope's DELETE is idempotent): {status}")
    done.set()
    await pc.close()
    summary["received_frames"] = len(received)
    return sid, received, patch_time


async def closed_by_client(base, seconds):
    pc, channel = await local_offer()
    status, answer = await asyncio.to_thread(
        scope_call, base, "POST", "/api/v1/webrtc/offer",
        {"sdp": pc.localDescription.sdp, "type": "offer", "initialParameters": {"prompts": [{"text": "a kite"}]}})
    check(status == 200, f"a second session: {status}")
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
    sid = answer["sessionId"]
    check(await wait_for(lambda: channel.readyState == "open", seconds), "its channel opens")
    # A transition over frames (the glide's numbers are checked in core/tests/integration/stream_updates.rs).
    replies = []
    channel.on("message", lambda m: replies.append(json.loads(m)))
    channel.send(json.dumps({"transition": {"target_prompts": [{"text": "a kite at dusk"}], "num_steps": 8,
                                            "temporal_interpolation_method": "slerp"}}))
    check(await wait_for(lambda: len(replies) >= 1, 10) and replies[0].get("type") == "parameters_applied"
          and replies[0].get("update") == "hot", f"a transition over 8 frames on the channel is applied hot: {replies}")
    check(api(base, "GET", f"/v1/streams/{sid}")[1]["params"]["prompt"] == "a kite at dusk",
          "its target prompts became the prompt")
    closed_at = time.monotonic()
    await pc.close()
    gone = await wait_for(lambda: api(base, "GET", f"/v1/streams/{sid}")[0] == 404, 15)
    check(gone, f"a session whose client closed its connection is ended by the server "
                f"({time.monotonic() - closed_at:.1f} s)")


def main():
    ap = arguments(work=True)
    ap.add_argument("--seconds", type=float, default=20)
    args = ap.parse_args()
    fixtures = os.path.abspath(args.fixtures)
    os.makedirs(args.work, exist_ok=True)
    record = os.path.join(args.work, "record")
    log_path = os.path.join(args.work, "server.log")
    server = serve(args.server, API_TOKEN, fixtures,
                   # Residual CFG at 4, as e2e.py's stream (which says why): the prompt
                   # switch's effect stays clear of H.264's error in the shared checks.
                   params={"seed": 42, "delta": 0.7, "guidance_scale": 4.0},
                   flags=["--record", record, "--ice-server", STUN, "--ice-server", f"{TURN},alice,s3cret"],
                   log_path=log_path)
    base = server.base
    summary = {}
    try:
        status, servers = scope_call(base, "GET", "/api/v1/webrtc/ice-servers")
        check(status == 200 and servers == {"iceServers": [
            {"urls": [STUN], "username": None, "credential": None},
            {"urls": [TURN], "username": "alice", "credential": "s3cret"}]},
            f"ice-servers lists the configured STUN and TURN servers: {servers}")
        status, health = scope_call(base, "GET", "/health", token=None)
        check(status == 200 and health.get("status") == "healthy", f"GET /health: {status} {health}")
        status, pipeline = scope_call(base, "GET", "/api/v1/pipeline/status")
        check(status == 200 and pipeline.get("status") == "loaded" and pipeline.get("pipeline_id") == "streamdiffusion",
              f"GET /api/v1/pipeline/status: {pipeline}")
        bad_inputs(base, summary)
        sid, received, patch_time = asyncio.run(session(base, record, args.seconds, summary))
        asyncio.run(closed_by_client(base, args.seconds))
    finally:
        server.stop()
    with open(log_path) as f:
        log = f.read()
    check("Scope session answered" in log and "duplex session ended" in log, "the log has the sessions' lines")
    check(not re.search(r"token=[0-9a-f]{8}", log), "the log never shows a stream key")

    stream_dir = os.path.join(record, sid)
    unswitched_dir = os.path.join(args.work, "unswitched")
    replay = subprocess.run(
        [args.server, "replay", "--record", stream_dir, "--settings", tiny_settings(fixtures), "--dump-unswitched", unswitched_dir],
        capture_output=True, text=True,
    )
    if replay.returncode != 0:
        check(False, f"replay failed: {replay.stderr.strip()}")
    else:
        report = json.loads(replay.stdout.strip().splitlines()[-1])
        summary["replay"] = report
        check(report["served_vs_replay"]["max_abs"] == 0,
              f"served outputs == a fresh engine's outputs on the decoded inputs (max abs {report['served_vs_replay']['max_abs']})")
        check(report["update_kinds"] == ["hot"], f"the data channel's prompt switch is hot in the replay: {report['update_kinds']}")
        compare(received, patch_time, stream_dir, unswitched_dir, summary)
    finish(summary)


if __name__ == "__main__":
    main()
