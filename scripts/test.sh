#!/usr/bin/env bash
# The test command named in README.md: everything a contributor runs before pushing.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --exclude sdstream-python
