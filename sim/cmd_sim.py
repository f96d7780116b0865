"""`ndpmoe sim`: the cocotb + Verilator bench of the NDP unit against the golden model.

    ndpmoe sim --config default --seed 1 --count 1000 [--waves]   random descriptors, checked
    ndpmoe sim --bench [--rows 1024 --in 4096 --bits 2,3,4 --b2b 8 ...]   throughput figures
    ndpmoe sim --bench --replay build/cosim/runs/<run>/report.json       a co-simulated layer's descriptors

--waves builds with traces and writes dump.vcd in the build folder (open it in GTKWave or
Surfer); keep --count small with it.
"""
from __future__ import annotations

import argparse
import time

from ndpmoe.model.contract import CONFIGS



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="default", help=f"one of {sorted(CONFIGS)}")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--count", type=int, default=1000, help="random descriptors to run")
    parser.add_argument("--python-count", type=int, default=60,
                        help="of which with the Python memory model and output consumer")
    parser.add_argument("--max-rows", type=int, default=12)
    parser.add_argument("--max-in", type=int, default=512)
    parser.add_argument("--tokens-parallel", type=int, default=0,
                        help="a variant of the configuration with this many tokens per beat")
    parser.add_argument("--waves", action="store_true", help="write a trace (dump.vcd)")
    parser.add_argument("--bench", action="store_true", help="run the throughput benchmark instead")
    bench = parser.add_argument_group("benchmark (--bench)")
    bench.add_argument("--rows", type=int, default=1024)
    bench.add_argument("--in", dest="in_features", type=int, default=4096)
    bench.add_argument("--bits", default="2,3,4")
    bench.add_argument("--group", type=int, default=128)
    bench.add_argument("--tokens", default="1")
    bench.add_argument("--stalls", default="0,4")
    bench.add_argument("--b2b", type=int, default=8, help="MATMULs queued back to back per case")
    bench.add_argument("--replay", default=None,
                       help="a co-simulation's report.json (build/cosim/runs/...): replay its layer's "
                            "descriptors one at a time and queued")


def format_coverage(tally: dict) -> str:
    """Functional coverage: per cover point, bins hit by the random descriptors, by all (with the
    directed ones for what the random ones missed), and the bins still missed."""
    lines = [f"functional coverage ({tally['closure_steps']} directed descriptors after the random ones):"]
    for name, final in tally["coverage"].items():
        random_hit = tally["coverage_random"][name]["hit"]
        lines.append(f"  {name:<18} {random_hit:>4} random, {final['hit']:>4} in all of {final['bins']:>4} bins"
                     + (f"; missed: {', '.join(final['missed'])}" if final["missed"] else ""))
    missed = sum(len(g["missed"]) for g in tally["coverage"].values())
    lines.append(f"  {missed} bins missed")
    return "\n".join(lines)


def run(args) -> int:
    from . import bench_ndp   # amaranth and cocotb load here, not for --help
    from .runner import BenchOptions, build_dir, run as run_bench

    if args.bench:
        return bench_ndp.bench(args)
    if args.count <= 0:
        raise ValueError(f"--count must be positive, not {args.count}")
    opts = BenchOptions(config=args.config, seed=args.seed, count=args.count,
                        python_count=min(args.python_count, args.count), max_rows=args.max_rows,
                        max_in=args.max_in, tokens_parallel=args.tokens_parallel, waves=args.waves)
    t0 = time.perf_counter()
    log = build_dir(opts) / "sim.log"
    print(f"building and simulating; log in {log}")
    tally = run_bench(opts, log_file=log)
    print(f"{tally['steps']} descriptors ({tally['errors_checked']} refused, {tally['resets']} reset mid-run, "
          f"{tally['closure_steps']} directed), "
          f"{tally['results']} results, {tally['sim_cycles']} cycles: {tally['mismatch_count']} mismatches "
          f"[{time.perf_counter() - t0:.0f} s incl. build, {tally['wall_s']:.0f} s simulating]")
    for message in tally["mismatches"]:
        print("  " + message)
    print(format_coverage(tally))
    if args.waves:
        print(f"trace: {tally['build_dir']}/dump.vcd")
    missed = sum(len(g["missed"]) for g in tally["coverage"].values())
    return 0 if tally["mismatch_count"] == 0 and missed == 0 else 1
