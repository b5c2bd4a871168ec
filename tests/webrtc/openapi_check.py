"""The OpenAPI document of `sdstream serve` (server/src/api/openapi.json, served at
GET /openapi.json) against a live server: the document is valid OpenAPI 3.1
(openapi-spec-validator), then Schemathesis, a schema-driven API fuzzer, runs every operation
of the Daydream and Scope routes (and the open ones: health, readiness, the page, the document,
the media routes with made-up ids) from a fixed seed with a bounded number of cases.

Checks, on every answer: no 5xx (`not_a_server_error`); the status is one the operation
documents (`status_code_conformance`); the content type too (`content_type_conformance`); the
body matches the documented schema (`response_schema_conformance`) and so do the documented
headers (`response_headers_conformance`); a request without the bearer token is refused with
401 where the document says the token is needed (`ignored_auth`). The server runs on the tiny
fixture, served under Daydream's id `stabilityai/sd-turbo` (the document's default model, so
that the examples and the generated bodies that leave `model_id` out make real streams), with an
API token, as tests/webrtc/fuzz_http.py and tests/server/daydream_sdk.py run it. Prints the counts
(operations, cases, failures) as JSON; exits non-zero on any failure.

usage: openapi_check.py --server BIN --fixtures DIR [--seed S] [--max-examples N]
                        [--document FILE]
--document checks that file instead of the served document (for editing it without a rebuild).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from openapi_spec_validator import validate
from openapi_spec_validator.readers import read_from_filename

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from server_harness import arguments, check, finish, http, serve  # noqa: E402

API_TOKEN = "openapi-api-token"
MODEL = "stabilityai/sd-turbo"
HERE = os.path.dirname(os.path.abspath(__file__))
CHECKS = ",".join([
    "not_a_server_error", "status_code_conformance", "content_type_conformance",
    "response_schema_conformance", "response_headers_conformance", "ignored_auth",
])


def main():
    ap = arguments()
    ap.add_argument("--seed", type=int, default=45)
    ap.add_argument("--max-examples", type=int, default=12)
    ap.add_argument("--document")
    args = ap.parse_args()
    fixtures = os.path.abspath(args.fixtures)
    started = time.monotonic()
    work = tempfile.mkdtemp(prefix="openapi-check-")
    # Daydream's id for the tiny fixture, and its autoencoder, under a model root.
    os.makedirs(os.path.join(work, "models", "stabilityai"))
    os.symlink(os.path.join(fixtures, "tiny-sd-turbo"), os.path.join(work, "models", MODEL))
    os.symlink(os.path.join(fixtures, "tiny-taesd"), os.path.join(work, "models", "tiny-taesd"))
    server = serve(args.server, API_TOKEN, os.path.join(work, "models"), params={"model_id": MODEL}, allow=(),
                   flags=["--max-streams", 3, "--idle-timeout", 20, "--connect-timeout", 3])
    summary = {}
    try:
        status, headers, raw = http("GET", server.base + "/openapi.json")
        check(status == 200 and headers.get("content-type", "").startswith("application/json"),
              f"GET /openapi.json: {status} {headers.get('content-type')}")
        document = os.path.join(work, "openapi.json")
        if args.document:
            with open(args.document, "rb") as f:
                raw = f.read()
        with open(document, "wb") as f:
            f.write(raw)
        spec, _ = read_from_filename(document)
        try:
            validate(spec)
            check(spec.get("openapi") == "3.1.0", f"openapi-spec-validator: valid OpenAPI {spec.get('openapi')}")
        except Exception as e:  # noqa: BLE001 - the validator's error is the failure reported
            check(False, f"openapi-spec-validator: {str(e)[:2000]}")
        operations = sorted(f"{m.upper()} {p}" for p, item in spec["paths"].items() for m in item
                            if m in ("get", "post", "put", "patch", "delete"))
        report = os.path.join(work, "report.json")
        command = [
            os.path.join(os.path.dirname(sys.executable), "st"), "run", document, "--url", server.base,
            "--checks", CHECKS, "--mode", "all", "--seed", str(args.seed),
            "--max-examples", str(args.max_examples),
            "--generation-database", "none", "--workers", "1", "--request-timeout", "20",
            "--no-color", "--output-truncate", "true", "--suppress-health-check", "all",
            "-H", f"Authorization: Bearer {API_TOKEN}",
            "--report", "json", "--report-json-path", report,
        ]
        st_started = time.monotonic()
        env = dict(os.environ, SCHEMATHESIS_HOOKS="openapi_hooks",
                   PYTHONPATH=os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")])))
        run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=work)  # its files stay in work
        st_seconds = time.monotonic() - st_started
        print(run.stdout if len(run.stdout) < 60000 else run.stdout[:30000] + "\n[...]\n" + run.stdout[-30000:])
        if run.stderr.strip():
            print(run.stderr[-4000:], file=sys.stderr)
        counts = {}
        if os.path.exists(report):
            with open(report) as f:
                counts = json.load(f)
        tested = counts.get("operations", {}).get("tested", 0)
        cases = counts.get("test_cases", {})
        failures = sum(f.get("count", 0) for f in counts.get("failures", []))
        errors = sum(e.get("count", 0) for e in counts.get("errors", []))
        summary = {"operations_documented": len(operations), "operations_tested": tested,
                   "cases": cases.get("generated", 0), "cases_with_failures": cases.get("with_failures", 0),
                   "failures": counts.get("failures", []), "errors": counts.get("errors", []),
                   "phases": {k: v.get("status") for k, v in counts.get("phases", {}).items()},
                   "schemathesis_exit": run.returncode, "schemathesis_seconds": round(st_seconds, 1),
                   "seed": args.seed, "max_examples": args.max_examples}
        print(f"openapi: {len(operations)} operations documented, {tested} tested, {cases.get('generated', 0)} cases, "
              f"{failures} failure(s), {errors} error(s) in {st_seconds:.1f} s", flush=True)
        check(tested == len(operations), f"schemathesis tested every documented operation ({tested}/{len(operations)})")
        check(failures == 0 and errors == 0, f"schemathesis: {failures} failure(s), {errors} error(s)")
        check(run.returncode == 0, f"schemathesis: exit {run.returncode}")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    summary["seconds"] = round(time.monotonic() - started, 1)
    finish(summary)


if __name__ == "__main__":
    main()
