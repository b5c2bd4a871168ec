#!/usr/bin/env python3
"""Time sdstream and the reference side by side, alternating them case by case, for several rounds.

A shared or virtual machine's speed can wander by tens of per cent within minutes (on the 2-core
AMD machine of issue #18 diffusers' own UNet took 12.3 s and then 8.2 s in consecutive calls). Two
benchmark runs taken one after the other then compare the machine's two moods, not the two engines.
This script runs each case (size x t_index_list x VAE) as a pair: examples/bench for that case
alone, then bench_reference.py for that case alone, and repeats the whole list `--rounds` times.
It prints, per case, the range over rounds of each stage beside the reference's, and the ratio of
the totals in each round (each pair ran within a minute or two of itself).

Both sides run a warm-up frame, then `--frames` timed frames; each side loads its models once per
case (the loading is not timed). Our side is the already-built binary
(`cargo build --release -p sdstream --example bench` first), the reference runs under the
interpreter given by `--python` (the environment with streamdiffusion 0.1.1; see README.md here,
"Benchmarks"). Model folders come from $SDSTREAM_BENCH_MODEL and $SDSTREAM_BENCH_TAESD, as for
both benchmarks.

Usage:
  "$REFENV/bin/python" tests/reference/bench_alternating.py --sizes 256,512 --rounds 2 --frames 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1].parent
STAGES = ("encode", "unet", "decode", "total")
# Our table's column for each stage (examples/bench's header).
OUR_COLUMNS = {"encode": "encode ms", "unet": "UNet ms", "decode": "decode ms", "total": "total ms"}


def parse_our_table(stdout: str) -> dict[str, float]:
    """The stages of the one case in examples/bench's markdown table."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    if len(lines) < 3:
        raise ValueError(f"examples/bench printed no table:\n{stdout}")
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    if len(rows) != 1:
        raise ValueError(f"expected one case in examples/bench's table, got {len(rows)}")
    missing = [c for c in OUR_COLUMNS.values() if c not in header]
    if missing:
        raise ValueError(f"examples/bench's table lacks {missing}: {header}")
    return {stage: float(rows[0][header.index(column)]) for stage, column in OUR_COLUMNS.items()}


def parse_reference(results: dict) -> dict[str, float]:
    """The stages of the one case in bench_reference.py's JSON."""
    cases = results["results"]
    if len(cases) != 1:
        raise ValueError(f"expected one case in the reference's results, got {len(cases)}")
    return {stage: float(cases[0]["mean_ms"][stage]) for stage in STAGES}


def span(values: list[float]) -> str:
    """`1,234` for one value or equal values, `1,234–1,456` for a range."""
    low, high = min(values), max(values)
    return f"{low:,.0f}" if round(low) == round(high) else f"{low:,.0f}–{high:,.0f}"


def table(cases: list[tuple[int, str, str]], ours: dict, ref: dict) -> str:
    lines = [
        "| size | steps | VAE | encode ours / ref | UNet ours / ref | decode ours / ref "
        "| total ours / ref | ratio per round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        size, t_index, vae = case
        cells = [f"{span([r[s] for r in ours[case]])} / {span([r[s] for r in ref[case]])}" for s in STAGES]
        ratios = ", ".join(f"{o['total'] / r['total']:.2f}" for o, r in zip(ours[case], ref[case]))
        steps = len(t_index.split(","))
        lines.append(f"| {size}² | {steps} ({t_index}) | {vae} | {' | '.join(cells)} | {ratios} |")
    return "\n".join(lines)


def run(command: list[str]) -> str:
    print("  $ " + " ".join(command), flush=True)
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{command[0]} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ours", type=Path, default=REPO / "target" / "release" / "examples" / "bench",
                        help="the built examples/bench binary (default: %(default)s)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter with the reference installed (default: this one)")
    parser.add_argument("--sizes", default="256,512", help="square resolutions, comma-separated")
    parser.add_argument("--t-index-lists", default="32;12,20,32",
                        help="t_index_lists separated by ';', each comma-separated (default: %(default)s)")
    parser.add_argument("--vaes", default="taesd,full", help="taesd and/or full, comma-separated")
    parser.add_argument("--frames", type=int, default=2, help="timed frames per case and side")
    parser.add_argument("--rounds", type=int, default=2, help="passes over every case")
    parser.add_argument("--dtype", default="f32",
                        help="sdstream's dtype (f32 or bf16); the reference always runs float32, "
                             "so bf16 rows read as bf16 against torch's f32 (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="write every round's figures as JSON here")
    args = parser.parse_args()
    if not args.ours.is_file():
        sys.exit(f"--ours: {args.ours} does not exist (cargo build --release -p sdstream --example bench)")
    if args.rounds < 1 or args.frames < 1:
        sys.exit("--rounds and --frames must be at least 1")
    for var in ("SDSTREAM_BENCH_MODEL", "SDSTREAM_BENCH_TAESD"):
        if not os.environ.get(var):
            sys.exit(f"${var} is not set: the folder make_full_size.py wrote (README.md here, 'Benchmarks')")

    cases = [(int(size), t_index, vae)
             for size in args.sizes.split(",") if size
             for t_index in args.t_index_lists.split(";") if t_index
             for vae in args.vaes.split(",") if vae]
    ours: dict = {case: [] for case in cases}
    ref: dict = {case: [] for case in cases}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            for case in cases:
                size, t_index, vae = case
                print(f"round {round_index + 1}/{args.rounds}: {size}² [{t_index}] {vae}", flush=True)
                flags = ["--sizes", str(size), "--t-index-lists", t_index, "--vaes", vae,
                         "--frames", str(args.frames)]
                ours[case].append(parse_our_table(run([str(args.ours), *flags, "--dtype", args.dtype])))
                out = Path(scratch) / "reference.json"
                run([args.python, str(REPO / "tests" / "reference" / "bench_reference.py"), *flags,
                     "--out", str(out)])
                ref[case].append(parse_reference(json.loads(out.read_text(encoding="utf-8"))))
                print(f"    ours {ours[case][-1]['total']:,.0f} ms, reference {ref[case][-1]['total']:,.0f} ms",
                      flush=True)
    print()
    print(f"{args.rounds} rounds, {args.frames} timed frames per case and side; sdstream in {args.dtype}, "
          "the reference in float32; ms per frame, ranges over rounds")
    print(table(cases, ours, ref))
    if args.out:
        args.out.write_text(json.dumps({
            "rounds": args.rounds, "frames": args.frames, "dtype": args.dtype,
            "cases": [{"size": s, "t_index_list": t, "vae": v, "ours": ours[(s, t, v)], "reference": ref[(s, t, v)]}
                      for (s, t, v) in cases],
        }, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
