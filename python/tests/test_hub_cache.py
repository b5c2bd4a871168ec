"""The Hugging Face cache, shared with huggingface_hub (the hub's own Python client, from the
package index): what sdstream downloads, huggingface_hub finds and finds sound; what
huggingface_hub downloads, sdstream loads offline. Both from a stand-in hub on localhost
(hub_stand_in.py), serving the tiny fixture as a repository."""

import hashlib

import numpy as np
import pytest
from huggingface_hub import hf_hub_download, scan_cache_dir, snapshot_download

from sdstream import StreamDiffusion

from conftest import TINY_MODEL
from hub_stand_in import COMMIT, LFS_ENDINGS, StandInHub, git_blob_hash

REPO = "stand-in/tiny-sd-turbo"


@pytest.fixture()
def hub():
    stand_in = StandInHub({REPO: TINY_MODEL})
    yield stand_in
    stand_in.close()


@pytest.fixture()
def hub_env(monkeypatch, tmp_path, hub):
    """The environment a user sets: the hub's address and the cache; no token, online."""
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for name in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    return cache


def outputs(body, settings, frames):
    # A hub id outside the catalogue loads where the settings allow it. The safety checker's
    # weights are not among a stream's files from the checkpoint (they would come from
    # CompVis/stable-diffusion-safety-checker, which the stand-in does not serve): off.
    body = dict(body, use_safety_checker=False)
    with StreamDiffusion(body, **dict(settings, allowed_models=[REPO])) as stream:
        return [stream(frame) for frame in frames[:2]]


def test_what_sdstream_downloads_huggingface_hub_finds_sound(hub, hub_env, tiny_body, tiny_settings, frames):
    downloaded = outputs(dict(tiny_body, model_id=REPO), tiny_settings, frames)
    local = outputs(tiny_body, tiny_settings, frames)
    assert all(np.array_equal(a, b) for a, b in zip(downloaded, local))
    prefix = f"/{REPO}/resolve/{COMMIT}/"
    fetched = {path[len(prefix):] for method, path, _ in hub.file_requests()}
    assert {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"} <= fetched
    assert all(method == "GET" and path.startswith(prefix) for method, path, _ in hub.file_requests())

    info = scan_cache_dir(hub_env)
    assert list(info.warnings) == []
    (repo,) = info.repos
    assert repo.repo_id == REPO and repo.repo_type == "model"
    (revision,) = repo.revisions
    assert revision.commit_hash == COMMIT and set(revision.refs) == {"main"}
    files = {f.file_path.relative_to(revision.snapshot_path).as_posix(): f for f in revision.files}
    assert set(files) == fetched
    for name, f in files.items():
        data = (TINY_MODEL / name).read_bytes()
        assert f.size_on_disk == len(data), name
        expected = hashlib.sha256(data).hexdigest() if name.endswith(LFS_ENDINGS) else git_blob_hash(data)
        assert f.blob_path.name == expected, name
    # Offline, huggingface_hub hands out the file sdstream wrote.
    found = hf_hub_download(REPO, "unet/config.json", cache_dir=hub_env, local_files_only=True)
    assert found == str(revision.snapshot_path / "unet" / "config.json")


def test_what_huggingface_hub_downloads_sdstream_loads_offline(hub, hub_env, monkeypatch, tiny_body, tiny_settings, frames):
    snapshot = snapshot_download(REPO, cache_dir=hub_env, endpoint=hub.endpoint)
    assert snapshot.endswith(f"snapshots/{COMMIT}")
    asked = len(hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from_cache = outputs(dict(tiny_body, model_id=REPO), tiny_settings, frames)
    assert len(hub.requests) == asked, hub.requests[asked:]
    local = outputs(tiny_body, tiny_settings, frames)
    assert all(np.array_equal(a, b) for a, b in zip(from_cache, local))
    # Online too, the cache answers before the hub is asked.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    outputs(dict(tiny_body, model_id=REPO), tiny_settings, frames)
    assert len(hub.requests) == asked, hub.requests[asked:]
