#!/usr/bin/env python3
"""Measures the `mp4` and `mp4parse` crates on an MP4 and on mutated copies of it (see
src/main.rs), restarting the reader after each copy that runs past 2 s, and prints one summary
line per library: how many copies were read, refused, panicked or ran past 2 s, the largest
allocation request and peak of live bytes one copy caused, the slowest copy, the panics by
message.

    python3 tests/reference/mp4_readers/measure.py examples/clip.mp4 20000

The figures in docs/VIDEO_FILES.md ("Why our own MP4 reader") are this script's on
examples/clip.mp4 (Rust 1.95, dev profile with overflow checks)."""
import collections
import os
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
clip, n = os.path.abspath(sys.argv[1]), int(sys.argv[2])
target = os.path.join(here, "target")
subprocess.run(["cargo", "build", "-q", "--manifest-path", os.path.join(here, "Cargo.toml"),
                "--target-dir", target], check=True)
binary = os.path.join(target, "debug", "mp4-readers")

for library in ["mp4", "mp4parse"]:
    start, kinds, panics = 0, collections.Counter(), collections.Counter()
    largest, peak, slowest = (0, None), (0, None), (0, None)
    while start < n:
        out = subprocess.run([binary, clip, str(n), library, str(start)],
                             capture_output=True, text=True).stdout
        hang = None
        for line in out.splitlines():
            f = line.split()
            if line.startswith("#"):
                print(library, line)
            elif len(f) >= 6 and f[0] == "R":
                i = int(f[1])
                kinds[f[2]] += 1
                if int(f[3]) > largest[0]: largest = (int(f[3]), i)
                if int(f[4]) > peak[0]: peak = (int(f[4]), i)
                if int(f[5]) > slowest[0]: slowest = (int(f[5]), i)
                if f[2] == "panic": panics[f[6] if len(f) > 6 else "?"] += 1
            elif len(f) == 2 and f[0] == "HANG":
                hang = int(f[1])
        if hang is None:
            break
        kinds["past 2 s"] += 1
        start = hang + 1
    print(f"{library}: {n} mutated copies: {dict(kinds)}; largest allocation request "
          f"{largest[0]} bytes (copy {largest[1]}), peak live {peak[0]} bytes (copy {peak[1]}), "
          f"slowest {slowest[0] / 1000:.1f} ms (copy {slowest[1]})")
    for message, count in panics.most_common():
        print(f"    {count:5} panics: {message.replace('_', ' ')}")
