"""Daydream's official Python SDK (`daydream-sdk`, pinned in requirements.txt) against
`sdstream serve`, unchanged: only its server URL and token point at the local server.

1. Starts `sdstream serve` on a loopback port over the tiny fixture, served under the id
   `stabilityai/sd-turbo` (a model root whose `stabilityai/sd-turbo` is the fixture): the SDK's
   response models tell the parameter schema apart by `params.model_id`, which must be one of
   Daydream's four base models.
2. With the SDK: create (new form), get, list, update (PATCH), delete; the answers parse into
   the SDK's models (every required field, the right types) and carry the values sent.
3. Without the SDK (Daydream's other documented forms): the older create form
   (`pipeline_id` + `pipeline_params`) keeps its prompt; the legacy
   `POST /beta/streams/{id}/prompts`; the status envelope `{success, error, data}` in both
   vocabularies. The prompt sent is the prompt the engine holds (`last_params`), under a new
   params version each time.
4. Errors through the SDK's own error models: an unknown id (404), a wrong token (401), the
   stream limit (429), a preprocessor the engine cannot run (422 naming the field) - each the
   envelope `{success: false, error, code, status}` - and the server keeps serving.

usage: daydream_sdk.py --server BIN --fixtures DIR
Exits non-zero on any failed check; prints a JSON summary.
"""

import json
import os
import sys
import tempfile
import time

from daydream import Daydream, errors

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from server_harness import api, arguments, check, finish, serve  # noqa: E402

TOKEN = "sdk-test-token"
MODEL = "stabilityai/sd-turbo"


def status(base, sid):
    code, body = api(base, "GET", f"/v1/streams/{sid}/status")
    check(code == 200, f"GET status: {code}")
    return body


def expect_error(call, error_type, status_code, what):
    """`call` raises the SDK's `error_type`, whose parsed envelope has `status_code`."""
    try:
        call()
    except error_type as e:
        data = getattr(e, "data", None)
        got = (e.status_code, getattr(data, "status", None), getattr(data, "success", None))
        check(got == (status_code, status_code, False) and bool(getattr(data, "code", "")),
              f"{what}: {type(e).__name__} {got} code={getattr(data, 'code', None)!r}")
        return e
    except Exception as e:  # noqa: BLE001 - any other outcome is the failure reported
        check(False, f"{what}: {type(e).__name__}: {e}")
        return None
    check(False, f"{what}: no error raised")
    return None


def run(base, summary):
    dd = Daydream(bearer=TOKEN, server_url=base)

    # --- the SDK's five calls ------------------------------------------------------------------
    created = dd.streams.create_stream(request={
        "pipeline": "streamdiffusion",
        "params": {"model_id": MODEL, "prompt": "a watercolor lighthouse", "seed": 42, "width": 64, "height": 64},
        "name": "sdk stream",
    })
    sid = created.id
    check(created.params.model_id == MODEL, f"create: params.model_id {created.params.model_id}")
    check(created.params.prompt == "a watercolor lighthouse", "create: the prompt sent")
    check(created.params.seed == 42, "create: the seed sent")
    check(created.name == "sdk stream" and created.pipeline == "streamdiffusion", "create: name and pipeline")
    check(created.whip_url.startswith(f"{base}/whip/{sid}?token=") and created.stream_key in created.whip_url,
          "create: whip_url carries the stream key")
    check(created.output_stream_url and "/whep/" in created.output_stream_url, "create: output_stream_url is WHEP")
    check((created.from_playground, created.is_smoke_test) == (False, False), "create: booleans")

    got = dd.streams.get_stream_by_id(id=sid)
    check(got.id == sid and got.params.prompt == "a watercolor lighthouse", "get: the same stream and prompt")
    check(got.created_at == created.created_at and got.stream_key == created.stream_key, "get: created_at, stream_key")

    listed = dd.streams.get_all_streams()
    check(listed.success is True and [s["id"] for s in listed.data] == [sid], f"list: {len(listed.data)} stream(s)")

    version0 = status(base, sid)["data"]["engine"]["params_version"]
    updated = dd.streams.update_stream(id=sid, body={
        "pipeline": "streamdiffusion",
        "params": {"model_id": MODEL, "prompt": "an oil painting of a red fox", "guidance_scale": 1.4},
    })
    check(updated.params.prompt == "an oil painting of a red fox", "update: the new prompt")
    check(updated.params.guidance_scale == 1.4, "update: guidance_scale")
    check(updated.params.seed == 42 and updated.params.width == 64, "update: merged, the rest kept")
    st = status(base, sid)
    inference = st["data"]["inference_status"]
    check(inference["last_params"]["prompt"] == "an oil painting of a red fox",
          "status: the engine holds the prompt the SDK sent")
    check(st["data"]["engine"]["params_version"] == version0 + 1,
          f"status: params version {version0} -> {st['data']['engine']['params_version']}")
    summary["update"] = {"params_version": st["data"]["engine"]["params_version"],
                         "last_params_hash": inference["last_params_hash"]}

    # --- the status envelope -------------------------------------------------------------------
    check(st["success"] is True and st["error"] is None, "status: {success: true, error: null}")
    data = st["data"]
    check(data["stream_id"] == sid and data["pipeline"] == "streamdiffusion", "status: stream_id, pipeline")
    check(data["state"] in ("LOADING", "ONLINE"), f"status: state {data['state']}")
    for key in ("fps", "last_input_time"):
        check(key in data["input_status"], f"status: input_status.{key}")
    for key in ("fps", "input_fps", "output_fps", "last_error", "last_error_time", "last_output_time", "last_params",
                "last_params_hash", "last_params_update_time", "restart_count", "last_restart_time",
                "last_restart_logs"):
        check(key in inference, f"status: inference_status.{key}")
    check(isinstance(data["start_time"], int) and isinstance(inference["last_params_update_time"], int),
          "status: times are integer milliseconds")
    stats = data["gateway_status"]["ingest_metrics"]["stats"]
    check(data["gateway_status"]["whep_url"] == created.output_stream_url, "status: gateway_status.whep_url")
    check({"peer_conn_stats", "track_stats", "conn_quality"} <= set(stats), "status: ingest_metrics.stats")
    summary["status_keys"] = sorted(data)

    # --- the older create form and the beta prompts route ----------------------------------------
    code, old = api(base, "POST", "/v1/streams", {"pipeline_id": "pip_SD-turbo",
                                                  "pipeline_params": {"model_id": MODEL, "prompt": "a paper crane"}})
    check(code == 201, f"older create form: {code}")
    old_id = old["id"]
    check(old["pipeline_id"] == "pip_SD-turbo" and old["pipeline_params"]["prompt"] == "a paper crane",
          "older create form: pipeline_id and pipeline_params echoed")
    check(status(base, old_id)["data"]["inference_status"]["last_params"]["prompt"] == "a paper crane",
          "older create form: the engine holds its prompt")
    check(dd.streams.get_stream_by_id(id=old_id).params.prompt == "a paper crane", "older form stream through the SDK")

    before = status(base, old_id)["data"]["engine"]["params_version"]
    code, beta = api(base, "POST", f"/beta/streams/{old_id}/prompts",
                     {"pipeline": "live-video-to-video", "model_id": "streamdiffusion",
                      "params": {"model_id": MODEL, "prompt": "a paper crane in the rain"}})
    check(code == 200 and beta["success"] is True and beta["was_censored"] is False, f"beta prompts: {code} {beta}")
    after = status(base, old_id)["data"]
    check(after["inference_status"]["last_params"]["prompt"] == "a paper crane in the rain",
          "beta prompts: the engine holds the new prompt")
    check(after["engine"]["params_version"] == before + 1, "beta prompts: a new params version")

    # --- errors through the SDK's error models ---------------------------------------------------
    e = expect_error(lambda: dd.streams.get_stream_by_id(id="str_nope"), errors.GetStreamByIDNotFoundError, 404,
                     "get of an unknown id")
    if e is not None:
        check(e.data.code == "STREAMS/NOT_FOUND", f"404 code {e.data.code}")
    expect_error(lambda: dd.streams.delete_stream(id="str_nope"), errors.DeleteStreamNotFoundError, 404,
                 "delete of an unknown id")
    wrong = Daydream(bearer="wrong-token", server_url=base)
    expect_error(lambda: wrong.streams.get_all_streams(), errors.GetAllStreamsUnauthorizedError, 401,
                 "list with a wrong token")
    expect_error(lambda: wrong.streams.update_stream(id=sid, body={"pipeline": "streamdiffusion",
                                                                   "params": {"model_id": MODEL, "prompt": "x"}}),
                 errors.UpdateStreamUnauthorizedError, 401, "update with a wrong token")
    check(status(base, sid)["data"]["inference_status"]["last_params"]["prompt"] == "an oil painting of a red fox",
          "the refused update changed nothing")
    # The server runs at most two streams: a third is 429.
    e = expect_error(lambda: dd.streams.create_stream(request={"pipeline": "streamdiffusion",
                                                               "params": {"model_id": MODEL}}),
                     errors.CreateStreamTooManyRequestsError, 429, "a third stream over --max-streams 2")
    if e is not None:
        check(e.data.code == "STREAMS/LIMIT_REACHED", f"429 code {e.data.code}")
    # A preprocessor the SDK allows but this engine cannot run: refused at creation, naming it.
    dd.streams.delete_stream(id=old_id)
    try:
        dd.streams.create_stream(request={"pipeline": "streamdiffusion", "params": {
            "model_id": MODEL, "controlnets": [{"model_id": "thibaud/controlnet-sd21-depth-diffusers",
                                                "conditioning_scale": 0.5, "preprocessor": "mediapipe_pose",
                                                "enabled": True}]}})
        check(False, "an unsupported preprocessor was accepted")
    except errors.DaydreamDefaultError as e:
        body = json.loads(e.body)
        check(e.status_code == 422 and body["status"] == 422 and "controlnets[0].preprocessor" in body["error"],
              f"unsupported preprocessor: {e.status_code} {body['error']}")
    code, listed = api(base, "GET", "/v1/streams")
    check([s["id"] for s in listed["data"]] == [sid], "nothing left behind by the refusals")

    # --- delete -------------------------------------------------------------------------------
    deleted = dd.streams.delete_stream(id=sid)
    check(deleted.success is True, "delete: success")
    expect_error(lambda: dd.streams.get_stream_by_id(id=sid), errors.GetStreamByIDNotFoundError, 404,
                 "get after delete")
    check(dd.streams.get_all_streams().data == [], "list after delete: empty")


def main():
    args = arguments().parse_args()
    fixtures = os.path.abspath(args.fixtures)
    summary = {}
    with tempfile.TemporaryDirectory() as root:
        # Daydream's id for the tiny fixture, and its autoencoder, under a model root.
        os.makedirs(os.path.join(root, "stabilityai"))
        os.symlink(os.path.join(fixtures, "tiny-sd-turbo"), os.path.join(root, MODEL))
        os.symlink(os.path.join(fixtures, "tiny-taesd"), os.path.join(root, "tiny-taesd"))
        started = time.monotonic()
        server = serve(args.server, TOKEN, root, params={"model_id": MODEL}, allow=(), flags=["--max-streams", 2])
        try:
            run(server.base, summary)
            check(server.process.poll() is None, "the server is still running")
        finally:
            server.stop()
        summary["seconds"] = round(time.monotonic() - started, 2)
    finish(summary)


if __name__ == "__main__":
    main()
