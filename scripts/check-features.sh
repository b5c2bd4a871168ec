#!/usr/bin/env bash
# Fails when a cargo command CI runs would build a dependency the workspace test build also
# builds, but with other features: cargo would then build that dependency and everything above
# it (serde, candle, the library) a second time. workspace-hack/Cargo.toml asks for the union;
# when this fails, add the crate and features it names there.
#
# Compares `cargo tree`'s resolved features (no build; seconds). Crates only the command builds
# (pyo3 and numpy for the Python module) cost nothing twice and are not compared.
set -euo pipefail
cd "$(dirname "$0")/.."

features() {
  cargo tree --locked "$@" -f "{p} {f}" --prefix none |
    grep -v ' (\*)$' | grep -v '^sdstream' | sed 's/ (proc-macro)//' | sort -u
}

workspace="$(features --workspace --exclude sdstream-python)"
drift=0
check() {
  local what="$1"
  shift
  local line name_version
  while IFS= read -r line; do
    [[ -z "$line" ]] && continue
    name_version="$(cut -d' ' -f1,2 <<<"$line")"
    # Only a crate the workspace build has too, with features it lacks or adds.
    if grep -q -F -- "$name_version " <<<"$workspace"; then
      echo "features differ for $what: $line" >&2
      echo "  the workspace build has: $(grep -F -- "$name_version " <<<"$workspace" | tr '\n' ';')" >&2
      drift=1
    fi
  done < <(comm -23 <(features "$@") <(printf '%s\n' "$workspace"))
}

# The commands of scripts/test.sh and the tests that build alone (ffi/tests/c_api.rs,
# scripts/install-c.sh).
check "cargo build -p sdstream-ffi" -p sdstream-ffi -e normal,build
check "maturin build -m python/Cargo.toml" -p sdstream-python -e normal,build
check "cargo test -p sdstream-server" -p sdstream-server
check "cargo build -p sdstream-server" -p sdstream-server -e normal,build

if [[ "$drift" -ne 0 ]]; then
  echo "some commands would build the library again: see workspace-hack/Cargo.toml" >&2
  exit 1
fi
echo "one feature set for every command's shared dependencies"
