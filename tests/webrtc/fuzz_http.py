"""A bounded HTTP fuzz run against `sdstream serve`: hostile and malformed requests (methods,
paths, request lines, headers, tokens, JSON, SDP, sizes, bodies cut short or too slow) on fresh
connections, a few at a time, from a fixed seed.

Checks: every complete request gets an answer (bytes that are no HTTP/1.1 request, such as a TLS
greeting, may be closed on); no answer is a 5xx except 503 (documented: no viewer place free and
none can give way); every error answer of the server is Daydream's envelope
{success: false, error, code, status} with the answer's status - only a request the HTTP layer
cannot parse (a bad request line or header) may get its bare 4xx; bodies cut short get 400,
bodies over the limit 413, bodies too slow 408; the model paths sent as model_id never get
anything but 422; creates beyond --max-streams get 429; and afterwards the server still serves
good requests (the API, a WHEP offer) and its stream still runs. Prints the status histogram
(overall and per kind of request) as JSON.

usage: fuzz_http.py --server BIN --fixtures DIR [--requests N] [--seed S] [--concurrency C]
Exits non-zero on any failed check.
"""

import asyncio
import collections
import json
import os
import random
import sys
import time
import urllib.parse

from aiortc import RTCPeerConnection

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from server_harness import api, arguments, check, finish, http, is_error_envelope, serve  # noqa: E402

API_TOKEN = "fuzz-api-token"
MAX_JSON = 256 * 1024
MAX_SDP = 64 * 1024
BODY_TIMEOUT = 10  # the server's (sdstream::webrtc::BODY_TIMEOUT)


async def sdp_offer(direction):
    pc = RTCPeerConnection()
    if direction == "sendonly":
        from aiortc import VideoStreamTrack
        pc.addTransceiver(VideoStreamTrack(), direction="sendonly")
    else:
        pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


class Request:
    """One fuzz case: raw bytes to send, what kind it is and what it must get. `half_close`
    shuts the client's write side after sending, as a client whose body was cut off leaves it
    (hyper, as configured by axum::serve, drops a connection whose client half-closes while
    a complete request is being handled, so complete requests keep it open); `may_close` marks
    bytes that are no complete request, which hyper may close without answering."""

    def __init__(self, kind, raw, half_close=False, may_close=False, want=None):
        self.kind, self.raw, self.half_close, self.may_close, self.want = kind, raw, half_close, may_close, want


class Fuzzer:
    def __init__(self, rng, stream, viewer_sdp, publisher_sdp, fixtures):
        self.rng = rng
        self.sid, self.key = stream["id"], stream["stream_key"]
        self.viewer_sdp, self.publisher_sdp = viewer_sdp, publisher_sdp
        self.fixtures = fixtures

    # --- pieces -----------------------------------------------------------------------------

    def junk(self, n):
        return bytes(self.rng.randrange(256) for _ in range(n))

    def text(self, n):
        alphabet = "abcxyz019 -_./%?&=#:;,{}[]\"'\\\t~é漢\u0000\u202e"
        return "".join(self.rng.choice(alphabet) for _ in range(n))

    def mutate(self, data):
        data = bytearray(data)
        for _ in range(self.rng.randint(1, 8)):
            op = self.rng.randrange(4)
            if not data:
                data += self.junk(4)
            i = self.rng.randrange(len(data))
            if op == 0:
                data[i] = self.rng.randrange(256)
            elif op == 1:
                del data[i:i + self.rng.randint(1, 64)]
            elif op == 2:
                data[i:i] = self.junk(self.rng.randint(1, 16))
            else:
                j = self.rng.randrange(len(data))
                data[i:i] = data[j:j + self.rng.randint(1, 200)]
        return bytes(data)

    def path(self):
        sid, key = self.sid, self.key
        choices = [
            "/", "/v1/streams", f"/v1/streams/{sid}", f"/v1/streams/{sid}/status", f"/v1/streams?id=str_nope",
            f"/whip/{sid}?token={key}", f"/whep/{sid}?token={key}", f"/whip/{sid}", f"/whep/{sid}?token=wrong",
            f"/whip/{sid}/nosession?token={key}", f"/whep/{sid}/nosession?token={key}", "/whip/", "/whep//",
            "/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/v1/streams/%00", "/v1/streams/" + "a" * 5000,
            "/" + "x/" * 2000, f"/v1/streams/{sid}/status/extra", "/v2/streams", "/index.html", "*",
            "http://example.com/v1/streams", f"/whep/{sid}?token={key}&token=x", f"/whip/{sid}?token=" + "k" * 3000,
            "/v1/streams/" + self.text(20), "/whep/" + self.text(12),
            "/api/v1/webrtc/offer", f"/api/v1/webrtc/offer/{sid}", "/api/v1/webrtc/offer/str_nope",
            "/api/v1/webrtc/ice-servers", "/api/v1/pipeline/status", "/api/v1/pipeline/load", "/health",
            f"/hls/{sid}/index.m3u8?token={key}", f"/hls/{sid}/0.ts?token={key}", f"/hls/{sid}/x.ts",
            "/hls/str_nope/index.m3u8", f"/hls/{sid}/" + self.text(8),
        ]
        return self.rng.choice(choices)

    def auth(self):
        return self.rng.choice([
            f"Authorization: Bearer {API_TOKEN}\r\n", f"Authorization: Bearer {API_TOKEN}\r\n", "",
            "Authorization: Bearer wrong\r\n", "Authorization: Basic Zm9vOmJhcg==\r\n", "Authorization: \r\n",
            "Authorization: Bearer\r\n", f"Authorization: bearer   {API_TOKEN}  \r\n",
            "Authorization: Bearer " + "t" * 9000 + "\r\n", f"Authorization: Bearer {self.key}\r\n",
            f"Authorization: Bearer {API_TOKEN}\r\nAuthorization: Bearer wrong\r\n",
        ])

    def json_body(self):
        good = {"params": {"prompt": "a kite", "guidance_scale": 1.2}}
        bodies = [
            json.dumps(good), "{", "}", "[]", "null", "1e999999", '{"params": 1}', '{"params": []}',
            '{"params": {"width": "a"}}', '{"params": {"width": 1e300}}', '{"params": {"seed": -1}}',
            '{"params": {"prompt": ""}}', '{"params": {"t_index_list": [' + ",".join(["1"] * 1000) + ']}}',
            '{"params": {"nope": 1}}', '{"params": {"prompt": NaN}}', "[" * 20000 + "]" * 20000,
            '{"a":' * 5000 + "1" + "}" * 5000, json.dumps({"params": {"prompt": "x" * 200_000}}),
            json.dumps({"params": {"model_id": self.rng.choice(["/etc", "../../..", "org/../../x", "/",
                                                                os.path.join(self.fixtures, "tiny-sd-turbo")])}}),
            json.dumps({"params": {"controlnets": [{"model_id": "/etc"}]}}),
            json.dumps({"params": {"controlnets": [{"model_id": "thibaud/controlnet-sd21-canny-diffusers",
                                                    "conditioning_scale": "x"}]}}),
            json.dumps({"name": "\ud800"}, ensure_ascii=False).encode("utf-8", "surrogatepass").decode("latin-1"),
            "\ufeff" + json.dumps(good), json.dumps(good) + "garbage", self.text(40),
        ]
        body = self.rng.choice(bodies)
        body = body.encode("latin-1", "replace") if isinstance(body, str) else body
        if self.rng.random() < 0.3:
            body = self.mutate(body)
        return body

    def sdp_body(self):
        sdp = self.rng.choice([self.viewer_sdp, self.publisher_sdp]).encode()
        r = self.rng.random()
        if r < 0.5:
            return self.mutate(sdp)
        if r < 0.6:
            return sdp[:self.rng.randrange(len(sdp))]
        if r < 0.7:
            return b"v=0\r\n" + b"a=" + b"x" * self.rng.randint(1, 60_000) + b"\r\n"
        if r < 0.8:
            return self.junk(self.rng.randint(0, 300))
        if r < 0.9:
            lines = sdp.split(b"\r\n")
            self.rng.shuffle(lines)
            return b"\r\n".join(lines)
        return sdp.replace(b"H264", b"VP8").replace(b"m=video", b"m=audio")

    def framed(self, method, path, headers, body, version="HTTP/1.1", length=None):
        length = len(body) if length is None else length
        head = f"{method} {path} {version}\r\nHost: fuzz\r\nConnection: close\r\n{headers}"
        if length is not False:
            head += f"Content-Length: {length}\r\n"
        return head.encode("utf-8", "surrogateescape") + b"\r\n" + body

    # --- cases ------------------------------------------------------------------------------

    def case(self):
        rng = self.rng
        kind = rng.choices(
            ["request_line", "headers", "api_json", "sdp", "cut_body", "over_limit", "slow_body", "valid_offer",
             "model_path", "scope"],
            weights=[12, 14, 26, 24, 8, 5, 1, 2, 8, 8],
        )[0]
        sid, key = self.sid, self.key
        if kind == "request_line":
            choice = rng.randrange(8)
            if choice == 0:
                raw = self.junk(rng.randint(1, 400))
            elif choice == 1:
                method = rng.choice(["GET", "PUT", "TRACE", "CONNECT", "FOO", "get", "G\x00T", "M" * 300, "POST "])
                raw = self.framed(method, self.path(), self.auth(), b"")
            elif choice == 2:
                version = rng.choice(["HTTP/2.0", "HTTP/0.9", "HTTP/1.2", "HTTPS/1.1", "", "HTTP/1.1 x"])
                raw = f"GET {self.path()} {version}\r\nConnection: close\r\n\r\n".encode()
            elif choice == 3:
                raw = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + self.junk(200)  # a TLS ClientHello
            elif choice == 4:
                raw = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + self.junk(30)
            elif choice == 5:
                method, path = rng.choice(["GET", "DELETE", "OPTIONS", "PATCH", "POST"]), self.path()
                if method == "DELETE" and path.startswith(f"/v1/streams/{sid}"):
                    path = "/v1/streams/str_nope"  # the run's stream stays
                raw = self.framed(method, path, self.auth(), b"")
            elif choice == 6:
                raw = f"GET /{'a' * rng.randint(10_000, 100_000)} HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n\r\n".encode()
            else:
                raw = b"\r\n" * rng.randint(1, 50) + self.framed("GET", "/v1/streams/" + sid, self.auth(), b"")
            # Random bytes, a TLS or HTTP/2 greeting: no HTTP/1.1 request, so the client closes its
            # side when done and the server may close without a word.
            junk = choice in (0, 3, 4)
            return Request(kind, raw, half_close=junk, may_close=junk)
        if kind == "headers":
            choice = rng.randrange(9)
            body = self.json_body()
            base = self.auth() + "Content-Type: application/json\r\n"
            path = rng.choice(["/v1/streams", f"/v1/streams/{sid}"])
            method = "POST" if path == "/v1/streams" else "PATCH"
            if choice == 0:
                raw = self.framed(method, path, base + f"Content-Length: {len(body)}\r\n", body)
            elif choice == 1:
                raw = self.framed(method, path, base + "Transfer-Encoding: chunked\r\n", body)
            elif choice == 2:
                raw = self.framed(method, path, base, body, length=rng.choice(["-1", "abc", "1e3", "99999999999999999999999", " 5", "0x10"]))
            elif choice == 3:
                raw = self.framed(method, path, base + "X-Big: " + "b" * rng.randint(20_000, 120_000) + "\r\n", body)
            elif choice == 4:
                raw = self.framed(method, path, base + "".join(f"X-{i}: {i}\r\n" for i in range(rng.randint(50, 400))), body)
            elif choice == 5:
                raw = self.framed(method, path, base + "X-Bin: \xff\xfe\x01\r\n", body)
            elif choice == 6:
                ct = rng.choice(["text/plain", "application/json; charset=latin1", "application/JSON", "",
                                 "application/json\x00", "multipart/form-data; boundary=x", "application/sdp"])
                raw = self.framed(method, path, self.auth() + f"Content-Type: {ct}\r\n", body)
            elif choice == 7:
                raw = self.framed(method, path, base + "Transfer-Encoding: gzip, chunked\r\n", body, length=False)
            else:
                raw = self.framed(method, path, base + "Expect: 100-continue\r\n", body)
            return Request(kind, raw)
        if kind == "api_json":
            method, path = rng.choice([("POST", "/v1/streams"), ("PATCH", f"/v1/streams/{sid}"),
                                       ("PATCH", "/v1/streams/str_nope"), ("GET", f"/v1/streams/{sid}"),
                                       ("DELETE", "/v1/streams/str_nope"), ("DELETE", "/v1/streams"),
                                       ("PUT", f"/v1/streams/{sid}")])
            raw = self.framed(method, path, self.auth() + "Content-Type: application/json\r\n", self.json_body())
            return Request(kind, raw)
        if kind == "sdp":
            path = rng.choice([f"/whip/{sid}?token={key}", f"/whep/{sid}?token={key}", f"/whep/{sid}",
                               f"/whip/{sid}?token=bad", f"/whep/str_nope?token={key}"])
            ct = rng.choice(["application/sdp"] * 6 + ["application/SDP; charset=utf-8", "text/plain", ""])
            raw = self.framed("POST", path, f"Content-Type: {ct}\r\n", self.sdp_body())
            return Request(kind, raw)
        if kind == "cut_body":
            if rng.random() < 0.5:
                path, ct, body = "/v1/streams", "application/json", self.json_body()
                headers = f"Authorization: Bearer {API_TOKEN}\r\n"
            else:
                path, ct, body = rng.choice([f"/whip/{sid}?token={key}", f"/whep/{sid}?token={key}"]), "application/sdp", self.viewer_sdp.encode()
                headers = ""
            headers += f"Content-Type: {ct}\r\n"
            if len(body) < 2:
                body = b"{}" * 8
            cut = rng.randrange(1, len(body))
            if rng.random() < 0.5:
                raw = self.framed("POST", path, headers, body[:cut], length=len(body))
            else:
                raw = self.framed("POST", path, headers + "Transfer-Encoding: chunked\r\n",
                                  f"{len(body):x}\r\n".encode() + body[:cut], length=False)
            return Request(kind, raw, half_close=True, want={400})
        if kind == "over_limit":
            if rng.random() < 0.5:
                path, ct, limit = "/v1/streams", "application/json", MAX_JSON
                headers = f"Authorization: Bearer {API_TOKEN}\r\nContent-Type: {ct}\r\n"
            else:
                path, ct, limit = f"/whep/{sid}?token={key}", "application/sdp", MAX_SDP
                headers = f"Content-Type: {ct}\r\n"
            if rng.random() < 0.5:
                raw = self.framed("POST", path, headers, b"", length=limit + rng.randint(1, 10**9))
            else:
                size = limit + rng.randint(1, 1000)
                raw = self.framed("POST", path, headers + "Transfer-Encoding: chunked\r\n",
                                  f"{size:x}\r\n".encode() + b"a" * size + b"\r\n0\r\n\r\n", length=False)
            return Request(kind, raw, want={413})
        if kind == "slow_body":
            path, headers, body = rng.choice([
                ("/v1/streams", f"Authorization: Bearer {API_TOKEN}\r\nContent-Type: application/json\r\n", b'{"params":'),
                (f"/whip/{sid}?token={key}", "Content-Type: application/sdp\r\n", b"v=0\r\n"),
            ])
            raw = self.framed("POST", path, headers, body, length=len(body) + 100)
            return Request(kind, raw, want={408})
        if kind == "valid_offer":
            if rng.random() < 0.7:
                raw = self.framed("POST", f"/whep/{sid}?token={key}", "Content-Type: application/sdp\r\n", self.viewer_sdp.encode())
                return Request(kind, raw, want={201, 503})
            raw = self.framed("POST", f"/whip/{sid}?token={key}", "Content-Type: application/sdp\r\n", self.publisher_sdp.encode())
            return Request(kind, raw, want={201, 409})
        if kind == "scope":
            return self.scope_case()
        # model_path
        target = rng.choice(["/etc", "../../..", "org/../../x", "/", "~", "C:\\x", "tiny-taesd", "..",
                             os.path.join(self.fixtures, "tiny-sd-turbo"), os.path.join(self.fixtures, "nope"),
                             "../tests/fixtures/tiny-sd-turbo", "/proc/self", "/dev/zero"])
        where = rng.choice(["model_id", "controlnet"])
        params = {"model_id": target} if where == "model_id" else {"controlnets": [{"model_id": target}]}
        method, path = rng.choice([("POST", "/v1/streams"), ("PATCH", f"/v1/streams/{sid}")])
        raw = self.framed(method, path, f"Authorization: Bearer {API_TOKEN}\r\nContent-Type: application/json\r\n",
                          json.dumps({"params": params}).encode())
        return Request(kind, raw, want={422})

    def scope_case(self):
        """The Scope-style routes: offers in JSON (SDP mutated as above, parameters good and
        bad), trickled candidates, the pipeline and ICE-server routes."""
        rng, sid = self.rng, self.sid
        auth = self.auth() + "Content-Type: application/json\r\n"
        choice = rng.randrange(4)
        if choice == 0:
            body = {"sdp": self.sdp_body().decode("latin-1"), "type": rng.choice(["offer", "offer", "answer", 3, None])}
            if rng.random() < 0.7:
                body["initialParameters"] = rng.choice([
                    {}, {"prompts": [{"text": "a fox", "weight": 1}]}, {"noise_scale": 2}, {"prompts": "x"},
                    {"prompts": [{"text": "x", "weight": -1}]}, {"denoising_step_list": [5000]},
                    {"denoising_step_list": [700, 500]}, {"transition": {"target_prompts": []}}, [], None,
                    {"seed": -1}, {"pipeline_ids": ["longlive"]}, {"paused": "x"}, {"guidance_scale": 1e308},
                    {"prompts": [{"text": "a"}] * 100}, {"input_mode": "text"}, {"model_id": "/etc"},
                ])
            raw = json.dumps(body).encode()
            if rng.random() < 0.2:
                raw = self.mutate(raw)
            return Request("scope", self.framed("POST", "/api/v1/webrtc/offer", auth, raw))
        if choice == 1:
            # Hostile ids, percent-encoded: this kind is about the routes, not the request line.
            path = rng.choice([f"/api/v1/webrtc/offer/{sid}", "/api/v1/webrtc/offer/str_nope",
                               "/api/v1/webrtc/offer/" + urllib.parse.quote(self.text(10), safe="")])
            candidate = rng.choice(["candidate:1 1 udp 2130706431 127.0.0.1 9 typ host", "candidate:garbage", "",
                                    None, 7, "a=candidate:" + self.text(30)])
            body = rng.choice([
                {"candidates": [{"candidate": candidate, "sdpMid": rng.choice(["0", None, 1]),
                                 "sdpMLineIndex": rng.choice([0, None, -1, 70000])}]},
                {"candidates": [{"candidate": candidate, "sdpMid": "0"}] * rng.randint(0, 200)},
                {"candidates": "x"}, {}, [],
            ])
            return Request("scope", self.framed(rng.choice(["PATCH", "PATCH", "DELETE"]), path, auth,
                                                json.dumps(body).encode()))
        if choice == 2:
            body = rng.choice([{"pipeline_ids": ["streamdiffusion"], "load_params": {"base_seed": 7}},
                               {"pipeline_ids": ["longlive"]}, {"pipelines": [{"pipeline_id": "streamdiffusion"}]},
                               {"pipeline_ids": ["streamdiffusion"], "load_params": {"width": "x"}}, {}, []])
            return Request("scope", self.framed("POST", "/api/v1/pipeline/load", auth, json.dumps(body).encode()))
        path = rng.choice(["/api/v1/webrtc/ice-servers", "/api/v1/pipeline/status", "/health"])
        return Request("scope", self.framed("GET", path, self.auth(), b""))


async def send(host, port, req, timeout):
    """The status of the answer to `req` ('none' when the connection closed without one,
    'timeout' when nothing came back in time)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return "connect-failed", b""

    async def read_all():
        # Reading from the start: a server that answers before reading the whole body (401,
        # 413) closes with bytes unread, which resets the connection; the answer is read first.
        got = b""
        try:
            while chunk := await reader.read(65536):
                got += chunk
        except OSError:
            pass
        return got

    answer_task = asyncio.ensure_future(read_all())
    try:
        try:
            writer.write(req.raw)
            await writer.drain()
            if req.half_close:
                writer.write_eof()
        except OSError:
            pass
        try:
            answer = await asyncio.wait_for(answer_task, timeout)
        except asyncio.TimeoutError:
            return "timeout", b""
    finally:
        writer.close()
    # The final status: `Expect: 100-continue` gets an interim 100 first.
    status = "none"
    for line in answer.split(b"\r\n"):
        parts = line.split(b" ", 2)
        if len(parts) > 1 and parts[0].startswith(b"HTTP/1.") and parts[1].isdigit():
            status = int(parts[1])
            if status >= 200:
                break
    return status, answer


def final_answer(answer):
    """(headers, body) of the final response in `answer` (an interim 100 Continue skipped)."""
    rest = answer
    while rest.startswith(b"HTTP/1.1 1"):
        rest = rest.split(b"\r\n\r\n", 1)[-1]
    head, _, body = rest.partition(b"\r\n\r\n")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower().decode("latin-1")] = v.strip().decode("latin-1")
    return headers, body


def envelope_kind(status, answer):
    """'envelope' for Daydream's error envelope of `status`, 'bare' for an empty answer with no
    content type (the HTTP layer's own, for a request it could not parse), 'other' otherwise."""
    headers, body = final_answer(answer)
    if headers.get("content-type", "").startswith("application/json") and is_error_envelope(body, status):
        return "envelope"
    if not body and "content-type" not in headers:
        return "bare"
    return "other"


async def run(base, fuzzer, n, concurrency):
    host, port = base.split("//", 1)[1].rsplit(":", 1)
    port = int(port)
    cases = [fuzzer.case() for _ in range(n)]
    results = [None] * n
    sem = asyncio.Semaphore(concurrency)

    async def one(i):
        async with sem:
            results[i] = await send(host, port, cases[i], BODY_TIMEOUT * 3)

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(n)))
    return cases, results, time.monotonic() - started


def main():
    ap = arguments()
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=24)
    args = ap.parse_args()
    fixtures = os.path.abspath(args.fixtures)
    server = serve(args.server, API_TOKEN, fixtures,
                   flags=["--max-viewers", 8, "--max-pending-viewers", 4, "--connect-timeout", 3, "--max-streams", 4])
    base = server.base
    summary = {}
    try:
        status, stream = api(base, "POST", "/v1/streams", {"params": {"prompt": "a lighthouse"}})
        check(status == 201, f"POST /v1/streams: {status}")
        viewer_sdp = asyncio.run(sdp_offer("recvonly"))
        publisher_sdp = asyncio.run(sdp_offer("sendonly"))
        fuzzer = Fuzzer(random.Random(args.seed), stream, viewer_sdp, publisher_sdp, fixtures)
        cases, results, seconds = asyncio.run(run(base, fuzzer, args.requests, args.concurrency))

        histogram = collections.Counter(str(status) for status, _ in results)
        by_kind = collections.defaultdict(collections.Counter)
        for case, (status, _) in zip(cases, results):
            by_kind[case.kind][str(status)] += 1
        summary = {
            "requests": len(cases),
            "seconds": round(seconds, 1),
            "seed": args.seed,
            "statuses": dict(sorted(histogram.items())),
            "by_kind": {k: dict(sorted(v.items())) for k, v in sorted(by_kind.items())},
        }
        five = {s: c for s, c in histogram.items() if s.isdigit() and int(s) >= 500 and s != "503"}
        check(not five, f"no 5xx but 503: {five}")
        unanswered = collections.Counter(str(s) for c, (s, _) in zip(cases, results)
                                         if not str(s).isdigit() and not c.may_close)
        check(not unanswered, f"every complete request got an answer: {dict(unanswered)}")
        for case, (status, answer) in zip(cases, results):
            if not str(status).isdigit() and not case.may_close:
                print(f"     {case.kind}: {status}: {case.raw[:160]!r} ({len(case.raw)} bytes)")
        summary["closed_without_answer_on_junk"] = sum(1 for c, (s, _) in zip(cases, results)
                                                       if c.may_close and not str(s).isdigit())
        for case, (status, answer) in zip(cases, results):
            if case.want is not None and status not in case.want:
                check(False, f"{case.kind}: got {status}, want {sorted(case.want)}: {case.raw[:120]!r} -> {answer[:200]!r}")
        wrong = sum(1 for c, (s, _) in zip(cases, results) if c.want is not None and s not in c.want)
        check(wrong == 0, f"every case with a required status got it ({sum(1 for c in cases if c.want)} cases)")

        # Error answers: the envelope, but for what the HTTP layer could not parse.
        shapes = collections.Counter()
        for case, (status, answer) in zip(cases, results):
            if not isinstance(status, int) or status < 400:
                continue
            shape = envelope_kind(status, answer)
            shapes[shape] += 1
            allowed = {"envelope", "bare"} if case.kind in ("request_line", "headers") else {"envelope"}
            if shape not in allowed:
                check(False, f"{case.kind}: {status} not in the envelope: {case.raw[:120]!r} -> {answer[:300]!r}")
        bad_shapes = sum(1 for c, (s, a) in zip(cases, results) if isinstance(s, int) and s >= 400
                         and envelope_kind(s, a) not in ({"envelope", "bare"} if c.kind in ("request_line", "headers")
                                                         else {"envelope"}))
        check(bad_shapes == 0, f"every error answer is the envelope ({shapes['envelope']}), but for "
                               f"{shapes['bare']} unparsable requests answered bare by the HTTP layer")
        summary["error_answers"] = dict(shapes)
        summary["refused_429"] = sum(1 for _, (s, _) in zip(cases, results) if s == 429)

        # The server still serves, and its stream still runs.
        status, got = api(base, "GET", f"/v1/streams/{stream['id']}")
        check(status == 200 and got["id"] == stream["id"], f"GET the stream afterwards: {status}")
        status, got = api(base, "PATCH", f"/v1/streams/{stream['id']}", {"params": {"prompt": "a red fox"}})
        check(status == 200 and got.get("update") in ("hot", "unchanged", "reload"), f"a good PATCH afterwards: {status}")
        status, got = api(base, "GET", f"/v1/streams/{stream['id']}/status")
        got = got["data"] if status == 200 else {}
        check(status == 200 and got.get("state") not in (None, "ERROR"), f"the stream's status afterwards: {status} {got.get('state')}")
        summary["stream_after"] = {"state": got.get("state"),
                                   **{k: got["engine"].get(k) for k in ("params_version", "restart_count", "last_error")}}
        summary["transport_after"] = {k: got["transport"][k] for k in (
            "viewer_offers_answered", "viewer_offers_refused", "viewers_evicted", "viewers_connect_failed",
            "publisher_offers_answered", "publisher_offers_refused", "publishers_connect_failed")}
        st, _, body = http("POST", stream["whep_url"], viewer_sdp, {"Content-Type": "application/sdp"})
        check(st == 201, f"a good WHEP offer afterwards: {st} {body[:80]!r}")
        check(server.process.poll() is None, "the server is still running")
    finally:
        server.stop()
    finish(summary)


if __name__ == "__main__":
    main()
