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

from ndpmoe.model.cli_args import BITS_LIST, GROUP, as_text, int_in, int_list
from ndpmoe.model.contract import CONFIGS
from ndpmoe.model.errors import NdpmoeError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", choices=sorted(CONFIGS), default="default", help=f"one of {sorted(CONFIGS)}")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--count", type=int_in(1), default=1000, help="random descriptors to run")
    parser.add_argument("--python-count", type=int_in(0), default=60,
                        help="of which with the Python memory model and output consumer")
    parser.add_argument("--max-rows", type=int_in(1), default=12)
    parser.add_argument("--max-in", type=int_in(1), default=512)
    parser.add_argument("--tokens-parallel", type=int_in(0), default=0,
                        help="a variant of the configuration with this many tokens per beat")
    parser.add_argument("--waves", action="store_true", help="write a trace (dump.vcd)")
    parser.add_argument("--bench", action="store_true", help="run the throughput benchmark instead")
    bench = parser.add_argument_group("benchmark (--bench)")
    bench.add_argument("--rows", type=int_in(1), default=1024)
    bench.add_argument("--in", dest="in_features", type=int_in(1), default=4096)
    bench.add_argument("--bits", type=as_text(BITS_LIST), default="2,3,4")
    bench.add_argument("--group", type=GROUP, default=128)
    bench.add_argument("--tokens", type=as_text(int_list(lo=1, hi=255)), default="1")
    bench.add_argument("--stalls", type=as_text(int_list(lo=0)), default="0,4")
    bench.add_argument("--b2b", type=int_in(1), default=8, help="MATMULs queued back to back per case")
    bench.add_argument("--replay", type=replay_report, default=None,
                       help="a co-simulation's report.json (build/cosim/runs/...): replay its layer's "
                            "descriptors one at a time and queued")


def replay_report(text: str) -> str:
    """An existing report.json file."""
    from pathlib import Path

    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"--replay {text!r}: no such file (expected a co-simulation's report.json)")
    return text


def check_arguments(args) -> None:
    """Against the configuration, before the Verilator build."""
    from ndpmoe.model.contract import get_config

    cfg = get_config(args.config)
    if args.tokens_parallel > cfg.t_max:
        raise NdpmoeError(f"--tokens-parallel {args.tokens_parallel} must be in 0..t_max={cfg.t_max} of {cfg.name!r}")
    if not args.bench or args.replay:
        return
    bits = [int(b) for b in args.bits.split(",")]
    if any(b not in cfg.bits for b in bits):
        raise NdpmoeError(f"--bits {args.bits}: configuration {cfg.name!r} decodes {cfg.bits}")
    if args.in_features % args.group or args.in_features > cfg.max_in_features:
        raise NdpmoeError(f"--in {args.in_features} must be a multiple of --group {args.group} and at most "
                          f"{cfg.max_in_features} ({cfg.name!r})")
    tokens = [int(t) for t in args.tokens.split(",")]
    if max(tokens) > cfg.t_max:
        raise NdpmoeError(f"--tokens {args.tokens}: at most t_max={cfg.t_max} tokens for {cfg.name!r}")


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
    check_arguments(args)
    from . import bench_ndp   # amaranth and cocotb load here, not for --help
    from .runner import BenchOptions, build_dir, run as run_bench

    if args.bench:
        return bench_ndp.bench(args)
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
