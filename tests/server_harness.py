"""What the scripts that drive `sdstream serve` share (tests/webrtc/e2e.py, tests/webrtc/fuzz_http.py,
tests/webrtc/figures.py, tests/server/daydream_sdk.py, tests/browser/page_e2e.py): the check log,
HTTP calls to the server and its error envelope, and the server itself over the tiny fixtures,
started on a loopback port and stopped with SIGTERM.

Each script runs from its own virtualenv with its own packages, so this module uses the standard
library only. A script imports it after putting this folder on sys.path:

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from server_harness import api, check, finish, serve
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

SIZE = 64  # the side of every picture the tiny fixtures serve by default
CHECKS = []  # every check made, in order
FAILURES = []  # the failed ones
LAST = {}  # {"body": bytes}: the body of the last answer `http` got (for the error envelope checks)


def check(ok, what):
    """Prints and records one check; returns `ok`."""
    CHECKS.append(what)
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        FAILURES.append(what)
    return ok


def arguments(work=False):
    """The command line every script that drives the server takes: --server BIN (`sdstream`),
    --fixtures DIR (tests/fixtures) and, with `work`, --work DIR (its own files); add the rest."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--fixtures", required=True)
    if work:
        ap.add_argument("--work", required=True)
    return ap


def finish(summary):
    """Prints the run's JSON summary and the count of checks; exits 1 if any failed."""
    print(json.dumps(summary, indent=1, default=float))
    print(f"{len(CHECKS)} check(s), {len(FAILURES)} failed", file=sys.stderr)
    sys.exit(1 if FAILURES else 0)


# --- HTTP --------------------------------------------------------------------------------------

def http(method, url, body=None, headers=None, timeout=30):
    """(status, headers with lower-case names, body bytes); never raises on HTTP errors."""
    data = body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            answer = r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        answer = e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()
    LAST["body"] = answer[2]
    return answer


SERVER_TOKEN = object()  # `api`'s default: the API token `serve` started the server at `base` with
_TOKENS = {}  # base URL -> API token, of the servers `serve` started


def api(base, method, path, payload=None, token=SERVER_TOKEN):
    """A JSON call to the server's API: (status, the parsed answer, or its bytes when it is no
    JSON). `token=None` sends no Authorization header."""
    if token is SERVER_TOKEN:
        token = _TOKENS[base]
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    body = json.dumps(payload) if payload is not None else None
    status, _, raw = http(method, base + path, body, headers)
    try:
        return status, json.loads(raw or b"null")
    except json.JSONDecodeError:
        return status, raw


def unwrap(value):
    """The object inside Daydream's envelope {success, data}, or `value` itself when it is bare."""
    if isinstance(value, dict) and isinstance(value.get("data"), (dict, list)):
        return value["data"]
    return value


def is_error_envelope(body, status):
    """`body` (bytes) is Daydream's error envelope {success: false, error, code, status} of
    `status`, its code a "KIND/NAME"."""
    try:
        v = json.loads(body)
    except (ValueError, TypeError):
        return False
    return (isinstance(v, dict) and v.get("success") is False and v.get("status") == status
            and isinstance(v.get("error"), str) and isinstance(v.get("code"), str) and "/" in v["code"])


# --- the server --------------------------------------------------------------------------------

def tiny_settings(model_root):
    """The engine settings (JSON) of every test server: the tiny autoencoder, `model_root` as the
    model root (the server serves models by id only), any resolution."""
    return json.dumps({"vae": "tiny-taesd", "model_root": model_root, "allow_any_resolution": True})


class Server:
    """A running `sdstream serve`: its `process` and the `base` URL it listens on."""

    def __init__(self, process, base, log):
        self.process, self.base, self._log = process, base, log

    def stop(self):
        """SIGTERM; checks that the server exits 0 within 10 s (killed otherwise)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(10)
            check(code == 0, f"SIGTERM: the server exits 0 ({code})")
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            check(False, "SIGTERM: the server did not exit within 10 s")
        finally:
            _TOKENS.pop(self.base, None)
            if self._log is not None:
                self._log.close()


def serve(binary, token, model_root, params=None, allow=("tiny-sd-turbo",), flags=(), log_path=None):
    """Starts `binary serve` on a loopback port and returns the Server once it listens.

    Engine settings: `tiny_settings(model_root)`. Default stream params: `tiny-sd-turbo` at SIZE x SIZE,
    updated with `params`. `allow` are the ids given to --allow-model, `flags` further flags. The
    server's log (stderr) goes to `log_path` in full (info), or, without it, to this script's stderr
    (warnings only). The hub is never asked (HF_HUB_OFFLINE)."""
    stream_params = {"model_id": "tiny-sd-turbo", "width": SIZE, "height": SIZE, **(params or {})}
    command = [binary, "serve", "--bind", "127.0.0.1:0", "--params", json.dumps(stream_params),
               "--settings", tiny_settings(model_root)]
    for model_id in allow:
        command += ["--allow-model", model_id]
    flags = [str(f) for f in flags]
    if "--rtmp-bind" not in flags:
        # An ephemeral port: several test servers may run at once (the stream objects give the URL).
        command += ["--rtmp-bind", "127.0.0.1:0"]
    command += flags
    log = open(log_path, "w") if log_path else None
    env = dict(os.environ, SDSTREAM_API_TOKEN=token, HF_HUB_OFFLINE="1",
               SDSTREAM_LOG="sdstream=info,warn" if log else "warn")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, env=env, text=True)
    # The server's first (and only) line on stdout.
    line = process.stdout.readline()
    if not line.startswith("listening on "):
        process.kill()
        process.wait()
        if log is not None:
            log.close()
        raise RuntimeError(f"server did not start: {line!r}" + (f" (its log: {log_path})" if log_path else ""))
    base = line.split()[-1].rstrip("/")
    _TOKENS[base] = token
    return Server(process, base, log)
