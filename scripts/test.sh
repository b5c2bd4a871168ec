#!/usr/bin/env bash
# The test command named in README.md: everything a contributor runs before pushing.
#   1. the Rust workspace's tests (which also build the examples the Python tests compare with);
#   2. the Python module: a virtualenv (target/py-venv, or $SDSTREAM_PY_VENV) with the pinned
#      tools of python/requirements-test.txt, the module installed by pip through maturin
#      (dev profile, so the optimised dependencies of step 1 are reused), then pytest, which
#      also runs mypy's stubtest on the installed module against its .pyi stubs
#      (python/tests/test_stubs.py);
#   3. the `webrtc` feature: its Rust tests and the aiortc end-to-end test (tests/webrtc/);
#   4. the control page at `/` in a real browser (tests/browser/): the system's Chromium
#      ($CHROMIUM, default /usr/bin/chromium; .ci/run installs Debian's) driven by Playwright.
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
#    server example (and its own HTTP tests), then the end-to-end test with aiortc, a WebRTC
#    implementation that is not ours, from its own virtualenv (target/webrtc-venv, or
#    $SDSTREAM_WEBRTC_VENV) with the pinned wheels of tests/webrtc/requirements.txt, and a bounded
#    HTTP fuzz run (3,000 hostile requests from a fixed seed, about 25 s).
cargo test -p sdstream --features webrtc --lib webrtc::
cargo test -p sdstream --features webrtc --test webrtc
cargo test -p sdstream --features webrtc --example server
cargo build -p sdstream --features webrtc --example server
webrtc_venv="${SDSTREAM_WEBRTC_VENV:-$target_dir/webrtc-venv}"
if [[ ! -x "$webrtc_venv/bin/python" ]]; then
  "$python" -m venv "$webrtc_venv"
fi
"$webrtc_venv/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/webrtc/requirements.txt
"$webrtc_venv/bin/python" tests/webrtc/e2e.py --server "$target_dir/debug/examples/server" \
  --fixtures tests/fixtures --work "$target_dir/webrtc-e2e"
"$webrtc_venv/bin/python" tests/webrtc/fuzz_http.py --server "$target_dir/debug/examples/server" \
  --fixtures tests/fixtures

# 4. The control page in headless Chromium with its fake camera, driven by Playwright for Python
#    from its own virtualenv (target/browser-venv, or $SDSTREAM_BROWSER_VENV) with the pinned
#    wheels of tests/browser/requirements.txt; screenshots go to target/browser-e2e/screens.
#    Playwright never downloads a browser here: it runs the system's Chromium.
chromium="${CHROMIUM:-/usr/bin/chromium}"
browser_venv="${SDSTREAM_BROWSER_VENV:-$target_dir/browser-venv}"
if [[ -x "$chromium" ]]; then
  if [[ ! -x "$browser_venv/bin/python" ]]; then
    "$python" -m venv "$browser_venv"
  fi
  "$browser_venv/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/browser/requirements.txt
  "$browser_venv/bin/python" tests/browser/page_e2e.py --server "$target_dir/debug/examples/server" \
    --fixtures tests/fixtures --work "$target_dir/browser-e2e" --chromium "$chromium"
elif [[ "${SDSTREAM_SKIP_BROWSER:-0}" == 1 ]]; then
  echo "SDSTREAM_SKIP_BROWSER=1: the browser test of the control page is skipped" >&2
else
  echo "no Chromium at $chromium: install Debian's (apt-get install chromium), set CHROMIUM," >&2
  echo "or set SDSTREAM_SKIP_BROWSER=1 to skip the browser test" >&2
  exit 1
fi
