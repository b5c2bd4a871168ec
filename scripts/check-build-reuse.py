#!/usr/bin/env python3
"""Checks that the cargo commands the tests run after `cargo test --workspace` compile nothing
that command already compiled.

A crate that a later command resolves with other features, another profile or other
dependencies is another crate to cargo: it compiles it again, and everything above it (serde,
candle, the library: minutes each on CI's two cores). This compares cargo's unit graphs (what
each command would compile; nothing is built) and names every unit that would be compiled a
second time and why. Units only a later command needs (pyo3 for the Python module) are fine.

When it fails: add the crate and the features it names to workspace-hack/Cargo.toml, or make
the command select what the tests do (the workspace; the dev profile's settings).

The unit graph is an unstable cargo option: RUSTC_BOOTSTRAP lets the stable toolchain print it.

Not in the unit graph: the environment. A build script that asks to run again when a variable
changes (ring's watches CARGO_MANIFEST_DIR and CARGO_PKG_*) reruns where a later command runs
with that variable changed, and its crate and everything above it are compiled again; a cargo
started by a test must drop what cargo set for the test (ffi/tests/c_api.rs does).
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# scripts/test.sh's first command: everything below is compared with its units.
TESTS = ["test", "--workspace", "--exclude", "sdstream-python", "--no-run"]

# What runs after it: ffi/tests/c_api.rs (the static library, scripts/install-c.sh --debug),
# maturin's build of the module, the Rust examples the Python tests compare with
# (python/tests/conftest.py), and scripts/test.sh's server steps.
LATER = {
    "c_api.rs: the static library": ["build", "-p", "sdstream-ffi", "--lib"],
    "install-c.sh --debug": ["build", "-p", "sdstream-ffi"],
    "maturin build --profile dev": ["build", "-p", "sdstream-python", "--lib"],
    "python/tests: a Rust example": [
        "build", "--workspace", "--exclude", "sdstream-python", "--example", "validate_bodies",
    ],
    "test.sh: rtmp_fuzz": TESTS[:-1] + ["--test", "rtmp_fuzz", "--no-run"],
    "test.sh: the server binary": [
        "build", "--workspace", "--exclude", "sdstream-python", "--bin", "sdstream",
    ],
}


def settings(profile):
    """A profile as cargo tells builds apart: its settings, not its name (`cargo test`'s test
    profile has the dev profile's settings, and their builds are shared)."""
    return json.dumps({k: v for k, v in profile.items() if k != "name"}, sort_keys=True)


def unit_graph(args):
    env = dict(os.environ, RUSTC_BOOTSTRAP="1")
    command = ["cargo", *args, "--locked", "--unit-graph", "-Z", "unstable-options"]
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{out.stderr}")
    return json.loads(out.stdout)["units"]


def short(unit):
    return f"{unit['pkg_id'].rsplit('#', 1)[-1]} ({unit['target']['name']}, {unit['mode']})"


def place(unit):
    """Where cargo would put the unit's output, less what makes it one build or another."""
    return (unit["pkg_id"], unit["target"]["name"], unit["mode"], unit["platform"])


def identities(units):
    """Each unit's identity: itself and, recursively, its dependencies."""
    memo = {}

    def identity(i):
        if i not in memo:
            unit = units[i]
            deps = tuple(sorted(identity(d["index"]) for d in unit["dependencies"]))
            memo[i] = hash((
                place(unit), tuple(unit["target"]["crate_types"]), tuple(unit["features"]),
                settings(unit["profile"]), deps,
            ))
        return memo[i]

    return [identity(i) for i in range(len(units))]


def why(unit, same_place):
    """How the unit differs from the tests' units in its place ("" where only a dependency
    does)."""
    reasons = []
    for other in same_place:
        if other["features"] != unit["features"]:
            reasons.append(f"features {unit['features']} against {other['features']}")
        if settings(other["profile"]) != settings(unit["profile"]):
            reasons.append(f"profile {settings(unit['profile'])} against {settings(other['profile'])}")
    return "; ".join(reasons)


def main():
    tests_units = unit_graph(TESTS)
    tests_ids = set(identities(tests_units))
    tests_by_place = {}
    for unit in tests_units:
        tests_by_place.setdefault(place(unit), []).append(unit)
    failed = False
    for what, args in LATER.items():
        units = unit_graph(args)
        again = [
            (u, why(u, tests_by_place[place(u)]))
            for u, i in zip(units, identities(units))
            if i not in tests_ids and place(u) in tests_by_place and u["mode"] != "run-custom-build"
        ]
        # The units whose own settings differ, not those that differ only through them.
        shown = [(u, reason) for u, reason in again if reason] or again
        if shown:
            failed = True
            print(f"{what} (cargo {' '.join(args)}) would compile {len(again)} units again:",
                  file=sys.stderr)
            for unit, reason in shown[:20]:
                print(f"  {short(unit)}: {reason or 'a dependency differs'}", file=sys.stderr)
        else:
            new = len([u for u in units if place(u) not in tests_by_place])
            print(f"{what}: reuses the tests' build ({len(units)} units, {new} of its own)")
    if failed:
        print("see workspace-hack/Cargo.toml and this script's docstring", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
