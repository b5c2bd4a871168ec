"""End-to-end test of `sdstream serve` (WHIP/WHEP and Daydream's API) with aiortc, a WebRTC
implementation that is not ours.

1. Starts `sdstream serve` on a loopback port over the tiny fixture (64x64), recording every
   decoded input and engine output, its logs (stderr) in the work folder.
2. Bad inputs: wrong content type, garbage SDP, unknown stream id, missing or wrong token,
   oversized body -> 415/400/404/401/413 (and 422 for invalid params), each in the error envelope
   {success: false, error, code, status} and followed by a good request that must still succeed.
   Every WHIP/WHEP answer carries an ETag (RFC 9725).
3. aiortc publishes a synthetic moving pattern over WHIP (H.264) and plays the stream over WHEP
   (H.264); the received frames are decoded by aiortc (PyAV / FFmpeg).
   Keyframe requests both ways: the viewer sends a PLI after a dozen pictures without an IDR,
   and the next WHEP picture (at most the third) must be an IDR that the server counts as made
   on request; later one publisher RTP packet (and its NACK retransmissions) is dropped, and the
   server must count a damaged picture and send a PLI, aiortc's sender must force its next
   picture to an IDR, and frames must keep reaching the viewer.
4. Mid-stream, PATCH changes the prompt: the answer must say "hot" and the status must show no
   reload; the frames received afterwards must match outputs made with the new parameters.
5. On a second stream: 32 viewer offers that never connect, then a real viewer joins at once
   and gets frames; the server's counters must account for every fake session (evicted or timed
   out) and show none left connecting. A second publisher is refused with 409 while the first
   is live; when the first closes without DELETE (a camera that reconnects), the second gets in
   by retrying and its pictures reach the engine and the viewer.
6. Model ids that name folders (`/etc`, `../../..`, an existing fixture folder, a missing one)
   are refused with 422 and byte-identical bodies, on create and on PATCH; bodies cut short get
   400 (not 413).
7. Liveness: once the publisher's session is DELETEd the stream reports DEGRADED_INPUT at once;
   once a publisher's connection closes without DELETE it does so as soon as the server sees the
   close; a stream left without publisher for --idle-timeout is deleted (and logged as such).
8. SIGTERM: the server exits 0 and logs the shutdown. The log has a line per request (never a
   stream key) and per session.
9. Runs `sdstream replay`, which feeds the recorded decoded inputs to a fresh
   engine: the served outputs must equal the engine's outputs exactly, and the frames after the
   PATCH must differ clearly from a replay that never switched prompts.

Checks on the received frames (H.264 is lossy on the way out, so they are compared with a
tolerance): each is matched to the nearest recorded engine output; the median error to it must
be small and far below the error to the nearest input (decoded or synthetic) - the viewer gets
the engine's picture, not the camera echoed.

usage: e2e.py --server BIN --fixtures DIR --work DIR [--seconds S]
Exits non-zero on any failed check; prints a JSON summary.
"""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription, VideoStreamTrack
from aiortc.rtp import RTCP_PSFB_FIR, RTCP_PSFB_PLI, RTCP_RTPFB_NACK, RtcpPsfbPacket, RtcpRtpfbPacket, is_rtcp
from av import VideoFrame

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from server_harness import (  # noqa: E402
    LAST, SIZE, api, arguments, check, finish, http, is_error_envelope, serve, tiny_settings,
)

API_TOKEN = "e2e-api-token"
IDLE_TIMEOUT = 10  # seconds: --idle-timeout of the server under test


def status_data(base, sid):
    """The `data` of GET /v1/streams/{sid}/status ({success, error, data})."""
    return api(base, "GET", f"/v1/streams/{sid}/status")[1]["data"]


def metrics_check(base, sid, status, summary):
    """GET /metrics, parsed by Prometheus' own client parser: the stream's series agree with its
    status (fetched just before, so counters may only have grown), the latency histogram's count
    equals the frames processed in the same scrape, its buckets are cumulative up to +Inf, the
    state is one-hot, and the route wants the API token."""
    from prometheus_client.parser import text_string_to_metric_families

    st, headers, raw = http("GET", base + "/metrics", headers={"Authorization": f"Bearer {API_TOKEN}"})
    check(st == 200, f"GET /metrics: {st}")
    check(headers.get("content-type", "").startswith("text/plain; version=0.0.4"),
          f"/metrics is Prometheus' text format: {headers.get('content-type')}")
    families = {f.name: f for f in text_string_to_metric_families(raw.decode())}
    samples = [s for f in families.values() for s in f.samples]
    mine = lambda name: [s for s in families[name].samples if s.labels.get("stream") == sid]  # noqa: E731
    one = lambda family, sample: next(s.value for s in mine(family) if s.name == sample)  # noqa: E731
    processed = one("sdstream_frames_processed", "sdstream_frames_processed_total")
    check(processed >= status["frames_processed"] > 0,
          f"/metrics: frames processed {processed} (status said {status['frames_processed']})")
    submitted = one("sdstream_frames_submitted", "sdstream_frames_submitted_total")
    check(submitted >= processed, f"/metrics: submitted {submitted} >= processed {processed}")
    latency = mine("sdstream_frame_latency_seconds")
    buckets = [(s.labels["le"], s.value) for s in latency if s.name.endswith("_bucket")]
    count = next(s.value for s in latency if s.name.endswith("_count"))
    total = next(s.value for s in latency if s.name.endswith("_sum"))
    check(count == processed, f"/metrics: latency histogram count {count} = frames processed {processed}")
    check(buckets[-1] == ("+Inf", count) and all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:])),
          f"/metrics: {len(buckets)} cumulative buckets ending at +Inf with the count")
    check(0 < total < 600 * count, f"/metrics: latency sum {total:.3f} s over {count:.0f} frames")
    states = {s.labels["state"]: s.value for s in mine("sdstream_stream_state")}
    check(sorted(states.values()) == [0, 0, 0, 0, 0, 1], f"/metrics: one state of six is 1: {states}")
    pool = families["sdstream_model_pool_bytes"].samples[0].value
    check(pool > 0, f"/metrics: the model pool holds {pool:.0f} bytes")
    st, _, _ = http("GET", base + "/metrics")
    check(st == 401, f"/metrics without the token: {st}")
    summary["metrics"] = {"families": len(families), "samples": len(samples), "frames_processed": processed,
                          "latency_mean_ms": 1e3 * total / count if count else None}


def raw_http(base, raw, half_close=True, timeout=30):
    """Sends raw bytes on a fresh connection, shuts the write side (as a client whose body was cut
    off would) and returns the answer's status (0 for none)."""
    host, port = base.split("//", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(raw)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
    parts = answer.split(b" ", 2)
    LAST["body"] = answer.split(b"\r\n\r\n", 1)[-1]
    return int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else 0


def read_ppm(path):
    with open(path, "rb") as f:
        data = f.read()
    # The server writes exactly "P6\n{w} {h}\n255\n" before the pixels.
    magic, size, depth, pixels = data.split(b"\n", 3)
    w, h = map(int, size.split())
    assert magic == b"P6" and depth == b"255", path
    return np.frombuffer(pixels, dtype=np.uint8).reshape(h, w, 3)


def pattern(i):
    """A synthetic camera: moving diagonal bands and a disc that travels, 64x64 RGB."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    t = i * 0.15
    r = 127 + 100 * np.sin((x + y) / 9.0 + t)
    g = 127 + 100 * np.sin((x - y) / 13.0 - 0.7 * t)
    cx, cy = 32 + 18 * np.cos(t * 0.5), 32 + 18 * np.sin(t * 0.5)
    disc = ((x - cx) ** 2 + (y - cy) ** 2) < 100
    b = np.where(disc, 230.0, 40.0)
    return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)


class Camera(VideoStreamTrack):
    def __init__(self):
        super().__init__()
        self.count = 0

    async def recv(self):
        pts, time_base = await self.next_timestamp()
        frame = VideoFrame.from_ndarray(pattern(self.count), format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        self.count += 1
        return frame


def nal_types(payload):
    """The H.264 NAL unit types an RTP payload starts or carries (RFC 6184: single NAL unit,
    STAP-A, the first fragment of an FU-A); 5 is an IDR slice."""
    if not payload:
        return set()
    kind = payload[0] & 0x1F
    if kind == 24:  # STAP-A: 16-bit size, NAL unit, ...
        found, at = set(), 1
        while at + 2 < len(payload):
            size = int.from_bytes(payload[at:at + 2], "big")
            found.add(payload[at + 2] & 0x1F)
            at += 2 + size
        return found
    if kind == 28:  # FU-A: the header's type counts on the start fragment only
        return {payload[1] & 0x1F} if len(payload) > 1 and payload[1] & 0x80 else set()
    return {kind}


class ViewerTap:
    """Sees every RTP packet the WHEP viewer's receiver handles (aiortc 1.16:
    RTCRtpReceiver._handle_rtp_packet) and notes each picture (one RTP timestamp) in arrival
    order and whether it is an IDR."""

    def __init__(self, receiver):
        self.receiver = receiver
        self.pictures = []  # [timestamp, idr]
        self.media_ssrc = None
        handle = receiver._handle_rtp_packet

        async def tapped(packet, arrival_time_ms):
            self.media_ssrc = packet.ssrc
            if not self.pictures or self.pictures[-1][0] != packet.timestamp:
                self.pictures.append([packet.timestamp, False])
            if 5 in nal_types(packet.payload):
                self.pictures[-1][1] = True
            return await handle(packet, arrival_time_ms)

        receiver._handle_rtp_packet = tapped

    def idrs(self, start=0):
        return [i for i, (_, idr) in enumerate(self.pictures) if idr and i >= start]

    async def send_pli(self):
        # aiortc 1.16's own loss reporting path (RTCRtpReceiver._send_rtcp_pli).
        await self.receiver._send_rtcp_pli(self.media_ssrc)


class PublisherTap:
    """On the WHIP publisher (aiortc 1.16): drops chosen outgoing video RTP packets (and their
    NACK retransmissions, which reuse the sequence number: no RTX is negotiated with the server),
    logs the keyframe requests and NACKs the RTCRtpSender receives, and every encoder call with
    its force_keyframe flag and whether the output holds an IDR."""

    def __init__(self, sender):
        self.sender = sender
        self.drop_next = False
        self.dropped = set()  # sequence numbers
        self.drops = 0  # packets dropped, retransmissions included
        self.keyframe_requests = []  # monotonic times of PLI/FIR received
        self.nacked = []  # sequence numbers NACKed
        self.encodes = []  # (monotonic start, force_keyframe, idr)
        transport = sender.transport
        send_rtp = transport._send_rtp

        async def send(data):
            if not is_rtcp(data) and len(data) >= 12 and int.from_bytes(data[8:12], "big") == sender._ssrc:
                seq = int.from_bytes(data[2:4], "big")
                if self.drop_next and seq not in self.dropped:
                    self.drop_next = False
                    self.dropped.add(seq)
                if seq in self.dropped:
                    self.drops += 1
                    return
            return await send_rtp(data)

        transport._send_rtp = send
        handle_rtcp = sender._handle_rtcp_packet

        async def rtcp(packet):
            if isinstance(packet, RtcpPsfbPacket) and packet.fmt in (RTCP_PSFB_PLI, RTCP_PSFB_FIR):
                self.keyframe_requests.append(time.monotonic())
            if isinstance(packet, RtcpRtpfbPacket) and packet.fmt == RTCP_RTPFB_NACK:
                self.nacked.extend(packet.lost)
            return await handle_rtcp(packet)

        sender._handle_rtcp_packet = rtcp
        self.wrapped_encoder = None

    def wrap_encoder(self):
        """The sender makes its encoder on the first frame; wrap it once it exists."""
        encoder = getattr(self.sender, "_RTCRtpSender__encoder", None)
        if encoder is None or encoder is self.wrapped_encoder:
            return encoder is not None
        encode = encoder.encode

        def tapped(frame, force_keyframe=False):
            started = time.monotonic()
            payloads, timestamp = encode(frame, force_keyframe)
            idr = any(5 in nal_types(p) for p in payloads)
            self.encodes.append((started, bool(force_keyframe), idr))
            return payloads, timestamp

        encoder.encode = tapped
        self.wrapped_encoder = encoder
        return True


def h264_only(transceiver):
    codecs = [c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType == "video/H264"]
    transceiver.setCodecPreferences(codecs)


async def offer_to(pc, url):
    await pc.setLocalDescription(await pc.createOffer())  # aiortc gathers before returning
    status, headers, body = await asyncio.to_thread(
        http, "POST", url, pc.localDescription.sdp, {"Content-Type": "application/sdp"}
    )
    if status != 201:
        raise RuntimeError(f"POST {url}: {status} {body[:200]!r}")
    check(headers.get("content-type", "").startswith("application/sdp"), "answer is application/sdp")
    location = headers.get("location")
    check(bool(location), f"201 carries a Location ({location})")
    session = (location or "").split("?")[0].rsplit("/", 1)[-1]
    check(headers.get("etag") == f'"{session}"', f"201 carries the session's ETag ({headers.get('etag')})")
    await pc.setRemoteDescription(RTCSessionDescription(sdp=body.decode(), type="answer"))
    return location


def bad_inputs(base, stream):
    sid, whip, whep = stream["id"], stream["whip_url"], stream["whep_url"]
    good = lambda: api(base, "GET", f"/v1/streams/{sid}")[0] == 200  # noqa: E731
    sdp_headers = {"Content-Type": "application/sdp"}
    without_token = whip.split("?")[0]
    cases = [
        ("API without token", lambda: api(base, "GET", f"/v1/streams/{sid}", token=None)[0], 401),
        ("API with a wrong token", lambda: api(base, "GET", f"/v1/streams/{sid}", token="nope")[0], 401),
        ("API unknown stream id", lambda: api(base, "GET", "/v1/streams/str_unknown")[0], 404),
        ("PATCH unknown stream id", lambda: api(base, "PATCH", "/v1/streams/str_unknown", {"params": {}})[0], 404),
        ("status of unknown stream id", lambda: api(base, "GET", "/v1/streams/str_unknown/status")[0], 404),
        ("DELETE unknown stream id", lambda: api(base, "DELETE", "/v1/streams?id=str_unknown")[0], 404),
        ("create with text/plain", lambda: http("POST", base + "/v1/streams", "{}",
                                                {"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "text/plain"})[0], 415),
        ("create with malformed JSON", lambda: http("POST", base + "/v1/streams", "{",
                                                     {"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "application/json"})[0], 400),
        ("create with invalid params", lambda: api(base, "POST", "/v1/streams", {"params": {"width": 63}})[0], 422),
        ("PATCH with invalid params", lambda: api(base, "PATCH", f"/v1/streams/{sid}", {"params": {"guidance_scale": "x"}})[0], 422),
        ("create with an oversized body", lambda: http("POST", base + "/v1/streams",
                                                        json.dumps({"name": "x" * 400_000}),
                                                        {"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "application/json"})[0], 413),
        ("WHIP with application/json", lambda: http("POST", whip, "v=0\r\n", {"Content-Type": "application/json"})[0], 415),
        ("WHIP with garbage SDP", lambda: http("POST", whip, "this is not SDP", sdp_headers)[0], 400),
        ("WHIP with SDP lacking video", lambda: http("POST", whip, "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n", sdp_headers)[0], 400),
        ("WHIP unknown stream id", lambda: http("POST", base + "/whip/str_unknown?token=x", "v=0\r\n", sdp_headers)[0], 404),
        ("WHIP without token", lambda: http("POST", without_token, "v=0\r\n", sdp_headers)[0], 401),
        ("WHIP with a wrong token", lambda: http("POST", without_token + "?token=wrong", "v=0\r\n", sdp_headers)[0], 401),
        ("WHIP with the API token instead of the stream's", lambda: http("POST", without_token, "v=0\r\n",
                                                                         {**sdp_headers, "Authorization": f"Bearer {API_TOKEN}"})[0], 401),
        ("WHIP with an oversized offer", lambda: http("POST", whip, "v=0\r\n" + "a=x\r\n" * 20_000, sdp_headers)[0], 413),
        ("WHEP with garbage SDP", lambda: http("POST", whep, "\x00\x01garbage", sdp_headers)[0], 400),
        ("WHEP with text/plain", lambda: http("POST", whep, "v=0\r\n", {"Content-Type": "text/plain"})[0], 415),
        ("DELETE an unknown WHIP session", lambda: http("DELETE", whip.replace("?", "/nosuchsession?"))[0], 404),
        ("PATCH (trickle) a WHIP session", lambda: http("PATCH", whip.replace("?", "/nosuchsession?"), "a=candidate",
                                                         {"Content-Type": "application/trickle-ice-sdpfrag"})[0], 405),
        ("create with a body shorter than its Content-Length",
         lambda: raw_http(base, b"POST /v1/streams HTTP/1.1\r\nHost: e2e\r\nAuthorization: Bearer " + API_TOKEN.encode()
                          + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"params\":"), 400),
        ("WHIP with an offer shorter than its Content-Length",
         lambda: raw_http(base, f"POST {whip.split(base, 1)[-1]} HTTP/1.1\r\nHost: e2e\r\nContent-Type: application/sdp\r\n"
                                f"Content-Length: 500\r\n\r\nv=0\r\n".encode()), 400),
        ("WHEP with a chunked offer cut off",
         lambda: raw_http(base, f"POST {whep.split(base, 1)[-1]} HTTP/1.1\r\nHost: e2e\r\nContent-Type: application/sdp\r\n"
                                f"Transfer-Encoding: chunked\r\n\r\n40\r\nv=0\r\n".encode()), 400),
    ]
    for name, call, want in cases:
        LAST.clear()
        got = call()
        check(got == want, f"{name}: {got} (want {want})")
        check(is_error_envelope(LAST.get("body"), want), f"  in the error envelope: {LAST.get('body', b'')[:160]!r}")
        check(good(), f"  server still serves after: {name}")


async def wait_for(condition, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not condition():
        await asyncio.sleep(0.01)
    return bool(condition())


async def transport_status(base, sid):
    return (await asyncio.to_thread(status_data, base, sid))["transport"]


def grew(before, after, key):
    return after[key] - before[key]


async def viewer_keyframe_request(base, sid, tap, seconds, summary):
    """Viewer -> server: a PLI from the WHEP viewer makes the next picture sent an IDR. The
    encoder's own keyframes are 120 frames apart, so a quiet stretch before the PLI and an IDR
    right after it (and the server's count of keyframes made on request) tell the two apart."""
    quiet = 12  # pictures after the viewer's first IDR before the PLI goes out
    ready = await wait_for(lambda: tap.idrs() and len(tap.pictures) - tap.idrs()[0] > quiet, seconds)
    check(ready, f"the viewer got an IDR and {quiet} more pictures before the PLI")
    if not ready:
        return
    first = tap.idrs()[0]
    before = await transport_status(base, sid)
    sent_at = len(tap.pictures)  # pictures [0, sent_at) arrived before the PLI
    check(tap.idrs(first + 1) == [],
          f"no IDR among the {sent_at - first - 1} pictures between the viewer's first IDR and its PLI")
    await tap.send_pli()
    # Bounded by the run's wait, not 5 s: a slow machine makes few pictures a second, and
    # which picture the IDR is (nth below) is what tells a keyframe on request apart.
    got = await wait_for(lambda: tap.idrs(sent_at), seconds)
    after = await transport_status(base, sid)
    check(got, "an IDR arrived after the viewer's PLI")
    if not got:
        return
    nth = tap.idrs(sent_at)[0] - sent_at + 1
    check(1 <= nth <= 3, f"the IDR is picture {nth} after the PLI (<= 3: only frames already in flight come first)")
    check(grew(before, after, "keyframe_requests_received") == 1,
          f"the server counted the viewer's keyframe request: +{grew(before, after, 'keyframe_requests_received')}")
    check(grew(before, after, "keyframes_on_request") == 1,
          f"the server made one keyframe on request: +{grew(before, after, 'keyframes_on_request')}")
    summary["viewer_pli"] = {
        "pictures_before_pli_since_first_idr": sent_at - first - 1,
        "idr_is_nth_picture_after_pli": nth,
        "keyframes_encoded_meanwhile": grew(before, after, "keyframes_encoded"),
    }


async def publisher_picture_loss(base, sid, tap, received, seconds, summary):
    """Server -> publisher: one video RTP packet of the WHIP publisher is lost (and so is every
    retransmission of it): the server must count a damaged picture and send a PLI, aiortc's
    sender must get it and encode its next picture as an IDR, and the stream must go on."""
    ready = await wait_for(lambda: tap.wrap_encoder() and len(tap.encodes) >= 5, seconds)
    check(ready, "the publisher's encoder is running (and watched)")
    if not ready:
        return
    before = await transport_status(base, sid)
    requests_before, encodes_before = len(tap.keyframe_requests), len(tap.encodes)
    dropped_at = time.monotonic()
    tap.drop_next = True

    def keyframe_sent():
        if len(tap.keyframe_requests) == requests_before:
            return False
        return any(force for _, force, _ in tap.encodes[encodes_before:])

    got = await wait_for(keyframe_sent, seconds)
    check(tap.drops >= 1, f"one publisher packet was dropped (seq {sorted(tap.dropped)}, "
                          f"and {tap.drops - 1} retransmission(s) of it so far)")
    check(got, "the publisher got a keyframe request after the loss and encoded a forced keyframe")
    if not got:
        return
    pli_at = tap.keyframe_requests[requests_before]
    encodes = tap.encodes[encodes_before:]
    first_after = next((i for i, (t, _, _) in enumerate(encodes) if t >= pli_at), len(encodes))
    forced = next(i for i, (_, force, _) in enumerate(encodes) if force)
    check(forced in (first_after - 1, first_after, first_after + 1),
          f"the forced picture is the publisher's next one after the PLI (encode {forced - first_after:+d})")
    check(encodes[forced][2], "the forced picture is an IDR")
    check(not any(idr for _, _, idr in encodes[:forced]),
          f"no IDR from the publisher between the loss and the forced one ({forced} pictures)")
    # Recovery: the server decodes again and the viewer keeps getting frames.
    received_at_keyframe = len(received)
    recovered = await wait_for(lambda: len(received) >= received_at_keyframe + 10, seconds)
    after = await transport_status(base, sid)
    check(recovered, f"the viewer got {len(received) - received_at_keyframe} frames after the publisher's keyframe (>= 10)")
    check(grew(before, after, "pictures_damaged") >= 1,
          f"the server counted the damaged picture: +{grew(before, after, 'pictures_damaged')}")
    check(grew(before, after, "plis_sent") >= 1, f"the server sent a PLI: +{grew(before, after, 'plis_sent')}")
    check(grew(before, after, "frames_submitted") >= 10,
          f"the server kept decoding the publisher: +{grew(before, after, 'frames_submitted')} pictures")
    summary["publisher_loss"] = {
        "dropped_sequence_numbers": sorted(tap.dropped),
        "retransmissions_dropped": tap.drops - 1,
        "nacks_received_for_it": sum(1 for q in tap.nacked if q in tap.dropped),
        "pli_after_drop_ms": round((pli_at - dropped_at) * 1e3, 1),
        "plis_received": len(tap.keyframe_requests) - requests_before,
        "pictures_damaged": grew(before, after, "pictures_damaged"),
        "decode_errors": grew(before, after, "decode_errors"),
        "plis_sent": grew(before, after, "plis_sent"),
        "forced_encode_after_pli": forced - first_after,
    }


async def stream_media(base, stream, seconds, summary):
    sid = stream["id"]
    received = []  # (monotonic time, HxWx3 array)

    publisher = RTCPeerConnection()
    camera = Camera()
    h264_only(publisher.addTransceiver(camera, direction="sendonly"))
    whip_session = await offer_to(publisher, stream["whip_url"])
    publisher_tap = PublisherTap(publisher.getTransceivers()[0].sender)

    viewer = RTCPeerConnection()
    h264_only(viewer.addTransceiver("video", direction="recvonly"))
    viewer_tap = ViewerTap(viewer.getTransceivers()[0].receiver)
    done = asyncio.Event()

    @viewer.on("track")
    def on_track(track):
        async def consume():
            while not done.is_set():
                try:
                    frame = await asyncio.wait_for(track.recv(), 5)
                except asyncio.TimeoutError:
                    continue  # a gap (no publisher for a while) is not the end of the track
                except Exception:
                    break
                received.append((time.monotonic(), frame.to_ndarray(format="rgb24")))

        asyncio.ensure_future(consume())

    whep_session = await offer_to(viewer, stream["whep_url"])

    # Phase A: prompt A; the viewer asks for a keyframe on the way.
    await viewer_keyframe_request(base, sid, viewer_tap, seconds, summary)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(received) < 40:
        await asyncio.sleep(0.2)
    check(len(received) >= 10, f"frames received over WHEP before the PATCH: {len(received)}")

    status_before = (await asyncio.to_thread(status_data, base, sid))["engine"]
    patch_time = time.monotonic()
    status, patched = await asyncio.to_thread(
        api, base, "PATCH", f"/v1/streams/{sid}", {"params": {"prompt": "an oil painting of a red fox in snow"}}
    )
    check(status == 200, f"PATCH prompt: {status}")
    check(patched.get("update") == "hot", f"PATCH says the update is hot: {patched.get('update')}")
    check(patched["params"]["prompt"] == "an oil painting of a red fox in snow", "PATCH merged the prompt")
    check(patched["params"]["width"] == SIZE, "PATCH kept the other params")
    status_after = (await asyncio.to_thread(status_data, base, sid))["engine"]
    check(status_after["params_version"] == status_before["params_version"] + 1, "PATCH made a new params version")
    check(not status_after["reloading"], "no reload in progress after the PATCH")
    check(status_after["restart_count"] == status_before["restart_count"], "no restart after the PATCH")

    # Phase B: prompt B.
    n_before = len(received)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(received) < n_before + 40:
        await asyncio.sleep(0.2)
    # Phase C: a publisher packet is lost.
    await publisher_picture_loss(base, sid, publisher_tap, received, seconds, summary)
    final = await asyncio.to_thread(status_data, base, sid)
    final_status = final["engine"]
    check(final_status["serving_params_version"] == final_status["params_version"],
          "the serving pipeline runs the PATCHed params (no reload pending)")
    check(final_status["restart_count"] == 0, "no restarts over the stream")
    check(final["transport"]["keyframes_encoded"] >= 1, "the viewer got a keyframe")
    check(final["state"] in ("ONLINE", "DEGRADED_INFERENCE"), f"the stream is served: {final['state']}")
    check(final["inference_status"]["last_params"]["prompt"] == "an oil painting of a red fox in snow",
          "status: inference_status.last_params holds the PATCHed prompt")
    stats = final["gateway_status"]["ingest_metrics"]["stats"]
    track = stats["track_stats"][0] if stats["track_stats"] else {}
    check(track.get("packets_received", 0) > 0 and stats["peer_conn_stats"]["BytesReceived"] > 0,
          f"status: ingest metrics count the publisher's packets ({track.get('packets_received')})")
    check(stats["peer_conn_stats"]["BytesSent"] > 0, "status: ingest metrics count the bytes sent to viewers")
    await asyncio.to_thread(metrics_check, base, sid, final_status, summary)
    summary["status"] = {k: final_status[k] for k in ("state", "input_fps", "output_fps", "frames_processed", "frames_dropped")}
    summary["ingest_metrics"] = stats
    summary["transport"] = final["transport"]
    done.set()

    # Sessions end with DELETE on their Locations.
    for location in (whep_session, whip_session):
        url = location if location.startswith("http") else base + location
        st = (await asyncio.to_thread(http, "DELETE", url))[0]
        check(st == 200, f"DELETE session {location.split('?')[0]}: {st}")
    # The publisher is gone: DEGRADED_INPUT at once, not after the input timeout.
    after_delete = await asyncio.to_thread(status_data, base, sid)
    check(after_delete["state"] == "DEGRADED_INPUT",
          f"right after the WHIP DELETE the stream is DEGRADED_INPUT: {after_delete['state']}")
    await publisher.close()
    await viewer.close()
    return received, patch_time


def model_paths(base, sid, fixtures, summary):
    """Model ids that name folders on the server's disk are refused alike (422, the same bytes),
    whether the folder exists or not, on create and on PATCH; the stream keeps its params."""
    ids = ["/etc", "../../..", "org/../../x", os.path.join(fixtures, "tiny-sd-turbo"),
           os.path.join(fixtures, "no-such-model"), "tiny-taesd", "no-such-model"]
    version = lambda: status_data(base, sid)["engine"]["params_version"]  # noqa: E731
    before = version()
    answers = {}
    for what, call in [
        ("create", lambda i: http("POST", base + "/v1/streams", json.dumps({"params": {"model_id": i}}),
                                  {"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "application/json"})),
        ("create with a ControlNet", lambda i: http("POST", base + "/v1/streams",
                                                    json.dumps({"params": {"controlnets": [{"model_id": i}]}}),
                                                    {"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "application/json"})),
        ("PATCH", lambda i: http("PATCH", f"{base}/v1/streams/{sid}", json.dumps({"params": {"model_id": i}}),
                                 {"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "application/json"})),
    ]:
        got = [(i, call(i)) for i in ids]
        statuses = sorted({r[0] for _, r in got})
        bodies = {r[2] for _, r in got}
        check(statuses == [422], f"{what} with a model path: {statuses} (want [422])")
        check(len(bodies) == 1, f"{what}: one answer, byte for byte, for {len(ids)} ids (existing and missing folders)")
        check(not any(b"reload" in r[2] or b"fixtures" in r[2] for _, r in got), f"{what}: no reload, no path in the answer")
        answers[what] = next(iter(bodies)).decode(errors="replace")
    check(version() == before, "the refused PATCHes changed no params")
    summary["model_path_refusal"] = json.loads(answers["PATCH"])["error"]


async def sessions(base, seconds, summary):
    """A second stream: a viewer flood that never connects, then a real viewer; a second
    publisher (409), then the first one closes without DELETE and the second gets in."""
    status, stream = await asyncio.to_thread(api, base, "POST", "/v1/streams", {"params": {"prompt": "a red kite"}})
    check(status == 201, f"POST a second stream: {status}")
    sid = stream["id"]
    start = await transport_status(base, sid)
    pcs = []

    camera = RTCPeerConnection()
    pcs.append(camera)
    h264_only(camera.addTransceiver(Camera(), direction="sendonly"))
    await offer_to(camera, stream["whip_url"])
    check(await wait_for_status(base, sid, lambda t: t["frames_submitted"] >= 5, seconds),
          "the first publisher's pictures reach the engine")

    # The flood: offers whose client is gone before it could answer a connectivity check.
    fake = RTCPeerConnection()
    h264_only(fake.addTransceiver("video", direction="recvonly"))
    await fake.setLocalDescription(await fake.createOffer())
    fake_sdp = fake.localDescription.sdp
    await fake.close()
    flood = 32
    statuses = []
    for _ in range(flood):
        st, _, _ = await asyncio.to_thread(http, "POST", stream["whep_url"], fake_sdp, {"Content-Type": "application/sdp"})
        statuses.append(st)
    after_flood = await transport_status(base, sid)
    check(statuses == [201] * flood, f"every flood offer was answered (the oldest still connecting gave way): "
                                     f"{ {s: statuses.count(s) for s in set(statuses)} }")
    check(after_flood["viewers_connecting"] <= 8, f"at most 8 viewers connecting at once: {after_flood['viewers_connecting']}")

    # A real viewer right after it.
    viewer = RTCPeerConnection()
    pcs.append(viewer)
    h264_only(viewer.addTransceiver("video", direction="recvonly"))
    received = []
    done = asyncio.Event()

    @viewer.on("track")
    def on_track(track):
        async def consume():
            while not done.is_set():
                try:
                    await asyncio.wait_for(track.recv(), 5)
                except asyncio.TimeoutError:
                    # Between the first publisher's close and the second's first picture the
                    # server has nothing to send; the track goes on.
                    continue
                except Exception:
                    break
                received.append(time.monotonic())

        asyncio.ensure_future(consume())

    await offer_to(viewer, stream["whep_url"])
    got = await wait_for(lambda: len(received) >= 10, seconds)
    check(got, f"the real viewer joined right after the flood and got frames: {len(received)}")
    settled = await wait_for_status(base, sid, lambda t: t["viewers_connecting"] == 0, seconds + 30)
    end_flood = await transport_status(base, sid)
    freed = grew(start, end_flood, "viewers_evicted") + grew(start, end_flood, "viewers_connect_failed")
    check(settled, f"no viewer left connecting: {end_flood['viewers_connecting']}")
    check(freed == flood, f"every flood session was ended and counted: {freed} of {flood} "
                          f"({grew(start, end_flood, 'viewers_evicted')} gave way, "
                          f"{grew(start, end_flood, 'viewers_connect_failed')} timed out)")
    check(grew(start, end_flood, "viewer_offers_answered") == flood + 1, "the server answered the flood and the real viewer")
    check(end_flood["viewers"] == 1, f"one viewer connected: {end_flood['viewers']}")
    summary["viewer_flood"] = {
        "offers": flood,
        "answered_201": statuses.count(201),
        "connecting_after_flood": after_flood["viewers_connecting"],
        "evicted": grew(start, end_flood, "viewers_evicted"),
        "timed_out": grew(start, end_flood, "viewers_connect_failed"),
        "real_viewer_frames": len(received),
    }

    # A second publisher while the first is live: 409, and the first goes on.
    second = RTCPeerConnection()
    pcs.append(second)
    h264_only(second.addTransceiver(Camera(), direction="sendonly"))
    await second.setLocalDescription(await second.createOffer())
    second_sdp = second.localDescription.sdp
    st, _, body = await asyncio.to_thread(http, "POST", stream["whip_url"], second_sdp, {"Content-Type": "application/sdp"})
    check(st == 409, f"a second publisher is refused while the first is live: {st} {body[:80]!r}")
    before = await transport_status(base, sid)
    check(grew(start, before, "publisher_offers_refused") == 1, "the server counted the refusal")
    check(await wait_for_status(base, sid, lambda t: t["frames_submitted"] >= before["frames_submitted"] + 5, seconds),
          "the first publisher is still the one feeding the engine")

    # The first publisher goes away without DELETE (a camera that reconnects): retrying, the
    # second gets in once the server has seen the first connection end.
    await camera.close()
    retries, st = 0, 409
    deadline = time.monotonic() + seconds + 30
    while st == 409 and time.monotonic() < deadline:
        st, headers, body = await asyncio.to_thread(http, "POST", stream["whip_url"], second_sdp,
                                                    {"Content-Type": "application/sdp"})
        if st == 409:
            retries += 1
            await asyncio.sleep(0.1)
    check(st == 201, f"after the first publisher closed, the second got in: {st} after {retries} refusals")
    if st == 201:
        await second.setRemoteDescription(RTCSessionDescription(sdp=body.decode(), type="answer"))
        mid = await transport_status(base, sid)
        n = len(received)
        check(await wait_for_status(base, sid, lambda t: t["frames_submitted"] >= mid["frames_submitted"] + 10, seconds),
              "the second publisher's pictures reach the engine")
        check(await wait_for(lambda: len(received) >= n + 10, seconds), "and the viewer keeps getting frames")
    end = await transport_status(base, sid)
    summary["second_publisher"] = {
        "refused_while_first_live": 1,
        "refused_while_first_closing": retries,
        "publisher_offers_answered": grew(start, end, "publisher_offers_answered"),
        "publisher_offers_refused": grew(start, end, "publisher_offers_refused"),
    }
    done.set()
    closed_at = time.monotonic()
    for pc in pcs:
        await pc.close()
    # Closed without DELETE: DEGRADED_INPUT as soon as the server sees the connection close.
    degraded = False
    while not degraded and time.monotonic() < closed_at + seconds:
        degraded = (await asyncio.to_thread(status_data, base, sid))["state"] == "DEGRADED_INPUT"
        if not degraded:
            await asyncio.sleep(0.05)
    check(degraded, "a publisher that closed without DELETE: the stream turns DEGRADED_INPUT")
    summary["second_publisher"]["degraded_input_after_close_s"] = round(time.monotonic() - closed_at, 2)
    status, _ = await asyncio.to_thread(api, base, "DELETE", f"/v1/streams/{sid}")
    check(status == 200, f"DELETE the second stream: {status}")


async def wait_for_status(base, sid, condition, timeout):
    deadline = time.monotonic() + timeout
    while True:
        if condition(await transport_status(base, sid)):
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)


def load_ppms(folder, prefix):
    """{frame id: HxWx3 float32} of the PPMs named PREFIX-ID.ppm in folder."""
    return {int(n[len(prefix) + 1:-4]): read_ppm(os.path.join(folder, n)).astype(np.float32)
            for n in os.listdir(folder) if n.startswith(prefix + "-") and n.endswith(".ppm")}


def luma(a):
    return a @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def compare(received, patch_time, record_dir, unswitched_dir, summary):
    versions = {}
    with open(os.path.join(record_dir, "outputs.jsonl")) as f:
        for line in f:
            v = json.loads(line)
            versions[v["id"]] = v["params_version"]
    first_version = min(versions.values())
    outputs = load_ppms(record_dir, "out")
    unswitched = load_ppms(unswitched_dir, "unswitched")
    ids = sorted(outputs)
    served = np.stack([outputs[i] for i in ids])
    served_versions = np.array([versions.get(i, -1) for i in ids])
    later = served[served_versions != first_version]
    never_patched = np.stack([unswitched[i] for i in ids if versions.get(i) != first_version])
    inputs = np.stack(list(load_ppms(record_dir, "in").values()))
    sources = np.stack([pattern(i).astype(np.float32) for i in range(0, 2000, 2)])

    def nearest(stack, f):
        d = np.abs(stack - f).mean(axis=(1, 2, 3))
        i = int(d.argmin())
        return float(d[i]), i

    luma_later = luma(later)[..., None]
    luma_never = luma(never_patched)[..., None]
    rows = []
    for t, frame in received[3:]:  # the very first frames may still show the keyframe settling
        f = frame.astype(np.float32)
        if f.shape != (SIZE, SIZE, 3):
            check(False, f"received frame of shape {f.shape}")
            continue
        d_out, best = nearest(served, f)
        rows.append({
            "t": t,
            "to_output": d_out,
            "version": int(served_versions[best]),
            "luma_to_output": float(np.abs(luma(served[best]) - luma(f)).mean()),
            "to_input": nearest(inputs, f)[0],
            "to_source": nearest(sources, f)[0],
            # The prompt check uses luma: 4:2:0 chroma error would drown a small prompt effect.
            "to_later": nearest(luma_later, luma(f)[..., None])[0] if len(later) else np.inf,
            "to_never_patched": nearest(luma_never, luma(f)[..., None])[0] if len(never_patched) else np.inf,
            # The same frame as the never-PATCHed replay rendered it: the nearest-of-all above can
            # land on a neighbouring frame of the moving pattern, which sits closer than the frame
            # itself and made the prompt's effect look smaller than it is.
            "to_same_frame_never_patched": (
                float(np.abs(luma(unswitched[ids[best]]) - luma(f)).mean()) if ids[best] in unswitched else np.inf),
        })
    col = lambda k, rs=rows: np.array([r[k] for r in rs])  # noqa: E731
    med = lambda k, rs=rows: float(np.median(col(k, rs)))  # noqa: E731
    summary["received_frames"] = len(received)
    summary["mean_abs_levels"] = {
        "to_nearest_output": {"median": med("to_output"), "p95": float(np.percentile(col("to_output"), 95))},
        "luma_to_nearest_output": {"median": med("luma_to_output")},
        "to_nearest_decoded_input": {"median": med("to_input"), "min": float(col("to_input").min())},
        "to_nearest_synthetic_frame": {"median": med("to_source"), "min": float(col("to_source").min())},
    }
    # H.264 4:2:0 on the tiny model's noisy colours costs a few levels (luma stays closer).
    check(med("to_output") < 10.0, f"received frames match engine outputs: median mean-abs {med('to_output'):.2f} levels (< 10)")
    check(med("to_input") > 5 * med("to_output") and med("to_source") > 5 * med("to_output"),
          f"received frames are not the input echoed: {med('to_input'):.2f} / {med('to_source'):.2f} vs {med('to_output'):.2f}")

    settle = 1.0  # frames in flight at the PATCH still carry the old prompt
    after = [r for r in rows if r["t"] > patch_time + settle]
    before = [r for r in rows if r["t"] < patch_time]
    closer = float(np.mean(col("to_later", after) < col("to_never_patched", after))) if after else 0.0
    summary["after_patch"] = {
        "frames": len(after),
        "share_closer_to_new_prompt": closer,
        "median_to_new_prompt_outputs": med("to_later", after) if after else None,
        "median_to_never_patched_outputs": med("to_never_patched", after) if after else None,
        "median_to_same_frame_never_patched": med("to_same_frame_never_patched", after) if after else None,
    }
    old_share = float(np.mean(col("version", before) == first_version)) if before else 0.0
    summary["before_patch"] = {"frames": len(before), "share_matching_old_params": old_share}
    check(len(after) >= 5 and closer >= 0.9,
          f"after the PATCH, received frames are the new prompt's outputs, not the old one's ({closer:.0%} of {len(after)})")
    check(len(after) >= 5 and med("to_same_frame_never_patched", after) > 1.5 * med("to_later", after),
          "after the PATCH, each frame's never-PATCHed rendering is 1.5x as far (luma) as the new prompt's: "
          f"{med('to_same_frame_never_patched', after):.2f} vs {med('to_later', after):.2f} "
          f"(nearest never-PATCHed frame of any: {med('to_never_patched', after):.2f})")
    check(len(before) >= 5 and old_share >= 0.9, f"before the PATCH, frames match the old prompt's outputs ({old_share:.0%} of {len(before)})")


def logs(path, stream, summary):
    """The server's structured log: requests, sessions, the idle deletion, the shutdown; no key."""
    with open(path) as f:
        lines = f.read().splitlines()
    sid = stream["id"]
    has = lambda *parts: [line for line in lines if all(p in line for p in parts)]  # noqa: E731
    check(bool(has("request", "method=POST", "path=/v1/streams", "status=201")), "log: a line per request")
    check(bool(has("WHIP publisher answered")) and bool(has("WHEP viewer answered")), "log: session lines")
    check(bool(has("stream deleted", f"stream={sid}", 'reason="idle"')), "log: the idle stream's deletion")
    check(bool(has("SIGTERM")) and bool(has("stopped")), "log: the shutdown")
    check(not any(stream["stream_key"] in line or "token=" in line for line in lines), "log: no stream key, no token")
    summary["log_lines"] = len(lines)


def main():
    ap = arguments(work=True)
    ap.add_argument("--seconds", type=float, default=20)
    args = ap.parse_args()
    fixtures = os.path.abspath(args.fixtures)
    os.makedirs(args.work, exist_ok=True)
    record = os.path.join(args.work, "record")
    log_path = os.path.join(args.work, "server.log")
    server = serve(args.server, API_TOKEN, fixtures,
                   # Residual CFG at 4: the tiny model's text conditioning then moves the
                   # engine's outputs by about 5.8 levels (mean abs) at the PATCH's prompt
                   # change, 3.3 at the least; at 3 it was 4.9 and 2.4, and the received
                   # frames' luma check sat at its bound, H.264's own error being 1.8 levels.
                   params={"seed": 42, "delta": 0.7, "guidance_scale": 4.0},
                   flags=["--record", record, "--connect-timeout", 3, "--idle-timeout", IDLE_TIMEOUT],
                   log_path=log_path)
    base = server.base
    summary = {}
    try:
        status, stream = api(base, "POST", "/v1/streams",
                             {"pipeline": "streamdiffusion", "params": {"prompt": "a watercolor of a lighthouse"}})
        check(status == 201, f"POST /v1/streams: {status}")
        for key in ("id", "whip_url", "whep_url", "output_stream_url", "created_at", "stream_key", "params"):
            check(key in stream, f"the stream has {key}")
        check(stream["params"]["model_id"] == "tiny-sd-turbo", "server defaults merged under the body")
        status, got = api(base, "GET", f"/v1/streams/{stream['id']}")
        check(status == 200 and got["id"] == stream["id"], "GET /v1/streams/{id}")

        bad_inputs(base, stream)
        received, patch_time = asyncio.run(stream_media(base, stream, args.seconds, summary))
        model_paths(base, stream["id"], fixtures, summary)
        idle_from = time.monotonic()  # at the latest: the publisher went before model_paths
        asyncio.run(sessions(base, args.seconds, summary))
        # Left without publisher, the first stream is deleted after the idle timeout.
        deadline = idle_from + IDLE_TIMEOUT + 15
        while api(base, "GET", f"/v1/streams/{stream['id']}")[0] == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        check(api(base, "GET", f"/v1/streams/{stream['id']}")[0] == 404,
              f"the stream left without publisher was deleted after --idle-timeout {IDLE_TIMEOUT}")
        status, third = api(base, "POST", "/v1/streams", {"params": {"prompt": "a third"}})
        status, deleted = api(base, "DELETE", f"/v1/streams?id={third['id']}")
        check((status, deleted) == (200, {"success": True, "data": {}}), f"DELETE /v1/streams?id=: {status} {deleted}")
        check(api(base, "GET", f"/v1/streams/{third['id']}")[0] == 404, "deleted stream is gone")
    finally:
        server.stop()
    logs(log_path, stream, summary)

    stream_dir = os.path.join(record, stream["id"])
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
        check(report["update_kinds"] == ["hot"], f"the replay's prompt switch is hot: {report['update_kinds']}")
        later = report["later_versions_vs_unswitched"]
        check(later["frames"] >= 5 and later["min_frame_mean_abs_after_ramp"] > 1.0 and later["mean_abs"] > 3.0,
              "after the PATCH (and the stream batch's ramp) every served frame differs from the never-PATCHed "
              f"replay: mean {later['mean_abs']:.2f}, min {later['min_frame_mean_abs_after_ramp']:.2f} levels")
        check(report["first_version_vs_unswitched_max_abs"] == 0, "before the PATCH both replays agree")
        compare(received, patch_time, stream_dir, unswitched_dir, summary)

    finish(summary)


if __name__ == "__main__":
    main()
