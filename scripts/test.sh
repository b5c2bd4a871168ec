#!/usr/bin/env bash
# The test command named in README.md: everything a contributor runs before pushing.
#   1. the Rust workspace's tests (which also build the examples the Python tests compare with);
#   2. the Python module: a virtualenv (target/py-venv, or $SDSTREAM_PY_VENV) with the pinned
#      tools of python/requirements-test.txt, the module installed by pip through maturin
#      (dev profile, so the optimised dependencies of step 1 are reused), then pytest, which
#      also runs mypy's stubtest on the installed module against its .pyi stubs
#      (python/tests/test_stubs.py);
#   3. the `webrtc` feature: its Rust tests and the aiortc end-to-end test (tests/webrtc/).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace --exclude sdstream-python

target_dir="${CARGO_TARGET_DIR:-target}"
venv="${SDSTREAM_PY_VENV:-$target_dir/py-venv}"
python="${PYTHON:-python3}"
if [[ ! -x "$venv/bin/python" ]]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r python/requirements-test.txt
# The maturin build backend runs `maturin` from PATH: the venv's pinned one.
PATH="$(cd "$venv" && pwd)/bin:$PATH" MATURIN_PEP517_ARGS="--profile dev" \
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-build-isolation \
  --force-reinstall --no-deps ./python
# pytest exits 5 when it collects no tests: that fails this script too.
"$venv/bin/python" -m pytest python/tests -q

# 3. The optional WebRTC transport (feature `webrtc`, off in the steps above): its Rust tests, the
#    server example, then the end-to-end test with aiortc, a WebRTC implementation that is not
#    ours, from its own virtualenv (target/webrtc-venv, or $SDSTREAM_WEBRTC_VENV) with the pinned
#    wheels of tests/webrtc/requirements.txt.
cargo test -p sdstream --features webrtc --lib webrtc::
cargo test -p sdstream --features webrtc --test webrtc
cargo build -p sdstream --features webrtc --example server
webrtc_venv="${SDSTREAM_WEBRTC_VENV:-$target_dir/webrtc-venv}"
if [[ ! -x "$webrtc_venv/bin/python" ]]; then
  "$python" -m venv "$webrtc_venv"
fi
"$webrtc_venv/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/webrtc/requirements.txt
"$webrtc_venv/bin/python" tests/webrtc/e2e.py --server "$target_dir/debug/examples/server" \
  --fixtures tests/fixtures --work "$target_dir/webrtc-e2e"
