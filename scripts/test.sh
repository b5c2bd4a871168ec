#!/usr/bin/env bash
# The test command named in README.md: everything a contributor runs before pushing.
#   1. the Rust workspace's tests (which also build the examples the Python tests compare with;
#      `sdstream run`'s tests compare its files with FFmpeg's reading of them, as step 3 does:
#      $FFMPEG/$FFPROBE or from PATH, SDSTREAM_SKIP_FFMPEG=1 skips those checks);
#   2. the Python module: a virtualenv (target/py-venv, or $SDSTREAM_PY_VENV) with the pinned
#      tools of python/requirements-test.txt, the module built by maturin as an abi3 wheel (dev
#      profile, so step 1's build of everything below the module is reused) and installed by pip, then
#      pytest, which also runs mypy's stubtest on the installed module against its .pyi stubs
#      (python/tests/test_stubs.py); then the wheel alone in a fresh virtualenv with no Rust
#      toolchain on PATH, running the quickstart;
#   3. the server crate (WebRTC, RTMP, HLS, the HTTP API; its Rust tests run in step 1): the aiortc
#      end-to-end tests (WHIP/WHEP, the Scope-style session), the HTTP fuzz run, RTMP and HLS
#      with ffmpeg (tests/webrtc/), Daydream's Python SDK against the server (tests/server/);
#   4. the control page at `/` in a real browser (tests/browser/): the system's Chromium
#      ($CHROMIUM, default /usr/bin/chromium; .ci/run installs Debian's) driven by Playwright;
#      Medooze's WHIP and WHEP clients from npm (fetched from the registry, $NPM_CONFIG_REGISTRY)
#      in Chromium against the server; Chromium's MediaRecorder recording of its fake camera (a
#      fragmented MP4) through `sdstream run`.
set -euo pipefail
cd "$(dirname "$0")/.."

target_dir="${CARGO_TARGET_DIR:-target}"
# Single-file checkpoints the tests load are converted into this cache, not the user's.
mkdir -p "$target_dir"
export SDSTREAM_CACHE_DIR="${SDSTREAM_CACHE_DIR:-$(cd "$target_dir" && pwd)/sdstream-cache}"

# Where the time goes: each part says when it starts.
part() { printf '\n--- %s (%d s into the tests)\n' "$1" "$SECONDS"; }

part "1. the Rust workspace's tests"
cargo test --workspace --exclude sdstream-python

part "2. the Python module"

venv="${SDSTREAM_PY_VENV:-$target_dir/py-venv}"
python="${PYTHON:-python3}"
if [[ ! -x "$venv/bin/python" ]]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r python/requirements-test.txt
# The module as users get it: an abi3 wheel (one wheel for CPython 3.9 and later), built by the
# venv's pinned maturin in the dev profile, installed into the test venv. Step 1's build of every
# crate below the module is reused: cargo's test profile has the dev profile's settings, and a
# profile's name is not part of what makes two builds differ. (Not `--profile test`: maturin
# builds through `cargo rustc`, for which that name still means a test harness.)
wheels="$target_dir/wheels"
rm -rf "$wheels"
PATH="$(cd "$venv" && pwd)/bin:$PATH" "$venv/bin/maturin" build --quiet -m python/Cargo.toml \
  --profile dev -o "$wheels"
wheel="$(ls "$wheels"/sdstream-*-abi3-*.whl)"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps \
  "$wheel"
# pytest exits 5 when it collects no tests: that fails this script too.
"$venv/bin/python" -m pytest python/tests -q
# The wheel in a fresh venv with no Rust toolchain on PATH (only the venv and the system's
# /usr/bin and /bin), numpy and Pillow from the package index: the quickstart runs on the tiny
# fixtures and says what it must.
wheel_venv="$target_dir/wheel-venv"
rm -rf "$wheel_venv"
"$python" -m venv "$wheel_venv"
wheel_venv="$(cd "$wheel_venv" && pwd)"
# (The rest of the environment stays: a proxy's certificates for pip, say.)
quickstart="$(PATH="$wheel_venv/bin:/usr/bin:/bin" bash -c '
  set -euo pipefail
  if command -v cargo || command -v rustc; then echo "a Rust toolchain is on PATH" >&2; exit 1; fi
  python -m pip install --quiet --disable-pip-version-check "$1" numpy==2.4.6 pillow==13.0.0
  python examples/python/quickstart.py tests/fixtures/tiny-sd-turbo tests/fixtures/tiny-taesd "$2"
' quickstart "$wheel" "$wheel_venv/quickstart.png")"
for expected in "rejected: invalid parameter \`t_index_list[1]\`" "prompt change: hot" \
  "size change: reload" "after reload: (96, 96, 3)"; do
  if [[ "$quickstart" != *"$expected"* ]]; then
    echo "the quickstart from the wheel did not say: $expected" >&2
    echo "$quickstart" >&2
    exit 1
  fi
done
[[ -s "$wheel_venv/quickstart.png" ]] || { echo "the quickstart from the wheel wrote no picture" >&2; exit 1; }
echo "the abi3 wheel $(basename "$wheel") ran the quickstart in a venv without Rust"

# 3. The server crate (sdstream-server; its Rust tests ran in step 1): the `sdstream` binary,
#    then, each from its own virtualenv under the target dir with pinned wheels:
#    - the end-to-end test with aiortc, a WebRTC implementation that is not ours
#      (target/webrtc-venv or $SDSTREAM_WEBRTC_VENV, tests/webrtc/requirements.txt), and a
#      bounded HTTP fuzz run (3,000 hostile requests from a fixed seed, about 25 s), and the OpenAPI
#      document checked and fuzzed by Schemathesis against the live server;
#    - Daydream's official Python SDK against the server (target/sdk-venv or
#      $SDSTREAM_SDK_VENV, tests/server/requirements.txt; a few seconds).
#    RTMP from an attacker (issue #41's findings and 3,000 mutated connections from a fixed seed)
#    ran in step 1 too; here again with its figures printed.
part "3. the server against real peers"
# Both commands select the packages step 1 did, so they resolve the same features and compile
# nothing again (scripts/check-build-reuse.py checks it).
cargo test --workspace --exclude sdstream-python --test rtmp_fuzz -- --nocapture
cargo build --workspace --exclude sdstream-python --bin sdstream
server_bin="$target_dir/debug/sdstream"
webrtc_venv="${SDSTREAM_WEBRTC_VENV:-$target_dir/webrtc-venv}"
if [[ ! -x "$webrtc_venv/bin/python" ]]; then
  "$python" -m venv "$webrtc_venv"
fi
"$webrtc_venv/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/webrtc/requirements.txt
"$webrtc_venv/bin/python" tests/webrtc/e2e.py --server "$server_bin" \
  --fixtures tests/fixtures --work "$target_dir/webrtc-e2e"
"$webrtc_venv/bin/python" tests/webrtc/fuzz_http.py --server "$server_bin" \
  --fixtures tests/fixtures
#    - the OpenAPI document served at /openapi.json: valid OpenAPI 3.1 (openapi-spec-validator),
#      then Schemathesis runs every documented operation against the live server from a fixed
#      seed (about 5,000 cases, under 30 s): no 5xx, every status, content type, header and body
#      as documented, 401 without the token.
"$webrtc_venv/bin/python" tests/webrtc/openapi_check.py --server "$server_bin" \
  --fixtures tests/fixtures
#    - the Scope-style session (one connection both ways, the parameters data channel, trickle
#      ICE) with aiortc;
#    - RTMP ingest, HLS output and the RTMP push with Debian's ffmpeg ($FFMPEG, default
#      ffmpeg; .ci/run installs it; SDSTREAM_SKIP_FFMPEG=1 skips this step).
"$webrtc_venv/bin/python" tests/webrtc/scope.py --server "$server_bin" \
  --fixtures tests/fixtures --work "$target_dir/scope-e2e"
#    - the DJ visualiser's body (five ControlNets fed by pose, soft-edge, canny, depth and colour
#      processors) on the tiny stand-ins of tests/fixtures/published-root (the layouts the
#      repositories publish: .bin nets with diffusers 0.15 configs, a legacy-format .pth), with aiortc.
"$webrtc_venv/bin/python" tests/webrtc/dj_body.py --server "$server_bin" --fixtures tests/fixtures
ffmpeg="${FFMPEG:-ffmpeg}"
if command -v "$ffmpeg" >/dev/null 2>&1; then
  "$webrtc_venv/bin/python" tests/webrtc/rtmp_hls.py --server "$server_bin" \
    --fixtures tests/fixtures --work "$target_dir/rtmp-hls-e2e" --ffmpeg "$ffmpeg"
elif [[ "${SDSTREAM_SKIP_FFMPEG:-0}" == 1 ]]; then
  echo "SDSTREAM_SKIP_FFMPEG=1: the RTMP/HLS test with ffmpeg is skipped" >&2
else
  echo "no ffmpeg ($ffmpeg): install Debian's (apt-get install ffmpeg), set FFMPEG," >&2
  echo "or set SDSTREAM_SKIP_FFMPEG=1 to skip the RTMP/HLS test" >&2
  exit 1
fi
sdk_venv="${SDSTREAM_SDK_VENV:-$target_dir/sdk-venv}"
if [[ ! -x "$sdk_venv/bin/python" ]]; then
  "$python" -m venv "$sdk_venv"
fi
"$sdk_venv/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/server/requirements.txt
"$sdk_venv/bin/python" tests/server/daydream_sdk.py --server "$server_bin" --fixtures tests/fixtures

# 4. The control page in headless Chromium with its fake camera, driven by Playwright for Python
#    from its own virtualenv (target/browser-venv, or $SDSTREAM_BROWSER_VENV) with the pinned
#    wheels of tests/browser/requirements.txt; screenshots go to target/browser-e2e/screens.
#    Playwright never downloads a browser here: it runs the system's Chromium.
part "4. the control page in Chromium"
chromium="${CHROMIUM:-/usr/bin/chromium}"
browser_venv="${SDSTREAM_BROWSER_VENV:-$target_dir/browser-venv}"
if [[ -x "$chromium" ]]; then
  if [[ ! -x "$browser_venv/bin/python" ]]; then
    "$python" -m venv "$browser_venv"
  fi
  "$browser_venv/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/browser/requirements.txt
  "$browser_venv/bin/python" tests/browser/page_e2e.py --server "$server_bin" \
    --fixtures tests/fixtures --work "$target_dir/browser-e2e" --chromium "$chromium"
  # The WHIP and WHEP clients on npm (whip-whep, pinned and checked against its SHA-512) in
  # Chromium against the server.
  "$browser_venv/bin/python" tests/browser/npm_whip_whep.py --server "$server_bin" \
    --fixtures tests/fixtures --work "$target_dir/npm-whip-whep" --chromium "$chromium"
  # Chromium's MediaRecorder recording (a fragmented MP4) through `sdstream run`, checked with
  # ffprobe (step 3 required it, unless SDSTREAM_SKIP_FFMPEG=1).
  if [[ "${SDSTREAM_SKIP_FFMPEG:-0}" != 1 ]]; then
    "$browser_venv/bin/python" tests/browser/media_recorder.py --server "$server_bin" \
      --fixtures tests/fixtures --work "$target_dir/media-recorder" --chromium "$chromium" \
      --ffprobe "${FFPROBE:-ffprobe}"
  fi
elif [[ "${SDSTREAM_SKIP_BROWSER:-0}" == 1 ]]; then
  echo "SDSTREAM_SKIP_BROWSER=1: the browser test of the control page is skipped" >&2
else
  echo "no Chromium at $chromium: install Debian's (apt-get install chromium), set CHROMIUM," >&2
  echo "or set SDSTREAM_SKIP_BROWSER=1 to skip the browser test" >&2
  exit 1
fi
part "done"
