"""Throughput benchmark of the NDP unit in cocotb + Verilator (prints figures; not a test).

    ndpmoe sim --bench [--config default] [--rows 1024] [--in 4096] [--bits 2,3,4]
                            [--tokens 1] [--group 128] [--stalls 0,4] [--b2b 4]

For each bit width and token count: port utilization (memory words per busy cycle; metadata
words count as useful) and fixed overhead per descriptor (busy cycles beyond words x passes) of
the MATMUL alone, and of --b2b copies of it queued back to back (the next descriptor's check,
reads and start overlap the one before; the overhead there is what each copy after the first
adds beyond its beats, the cost of a descriptor in a long stream); the cycles a LOAD_ACT ahead of those copies adds (its
words are the least it can cost); MACs per cycle; the same with random memory stalls (rate n/16
on the response handshake and the read latency); and the simulation speed in cycles per second
while Python only waits for `done` (per wall-clock second and per CPU second of the simulator
process, which a loaded machine does not distort). Beats: a metadata or 3-bit hi-plane word
takes one cycle, a code word one per pass (ceil(T / tokens_parallel)); overhead = busy cycles -
beats.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ndpmoe.model.contract import get_config
from ndpmoe.model.errors import NdpmoeError

from .runner import BenchOptions, build_dir, run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="default")
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--in", dest="in_features", type=int, default=4096)
    parser.add_argument("--bits", default="2,3,4")
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--tokens", default="1", help="comma-separated token counts")
    parser.add_argument("--stalls", default="0,4", help="memory stall rates n/16, comma-separated")
    parser.add_argument("--b2b", type=int, default=8, help="MATMULs queued back to back per case")
    parser.add_argument("--replay", default=None,
                        help="a co-simulation's report.json (build/cosim/runs/...): replay its layer's "
                             "descriptors one at a time and queued instead")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tokens-parallel", type=int, default=0,
                        help="a variant of the configuration with this many tokens per beat")


def mem_words_for(cfg, rows: int, in_features: int) -> int:
    need = (rows * in_features + rows * in_features // 4 + 8 * in_features) // cfg.word_bytes + 1024
    return 1 << max(16, (need - 1).bit_length())


def replay(args) -> int:
    """The descriptor shapes of a co-simulated layer over fresh data, one at a time and queued."""
    cfg = get_config(args.config)
    try:
        report = json.loads(Path(args.replay).read_text())
        records = [dict(zip(report["record_fields"], r)) for r in report["cases"][0]["runs"]["no_stalls"]["records"]]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise NdpmoeError(f"--replay {args.replay}: not a co-simulation's report.json with a stall-free run "
                          f"({type(exc).__name__}: {exc})") from None
    words = sum(r["words"] for r in records)
    results = sum(r["results"] for r in records)
    opts = BenchOptions(config=args.config, seed=args.seed, mem_words=1 << max(16, (2 * words).bit_length()),
                        result_words=1 << max(14, results.bit_length()), tokens_parallel=args.tokens_parallel)
    cfg = opts.ndp_config()
    os.environ["NDP_REPLAY"] = str(Path(args.replay).resolve())
    t0 = time.perf_counter()
    log = build_dir(opts) / "replay.log"
    print(f"building and simulating; log in {log}")
    out = run(opts, test_module="ndpmoe.sim.cocotb_bench", testcase="layer_replay", log_file=log)
    print(f"{out['case']}: {out['descriptors']} descriptors of a co-simulated layer, memory always ready; NDP unit "
          f"'{args.config}' (P={cfg.word_bits}, tokens_parallel={cfg.tokens_parallel}); "
          f"{time.perf_counter() - t0:.0f} s incl. build")
    print(f"  co-simulation (tokens_parallel {report.get('tokens_parallel', 'of its build')}): "
          f"{out['cosim_busy_cycles']} busy cycles")
    for mode in ("one_at_a_time", "queued"):
        r = out[mode]
        print(f"  {mode.replace('_', ' '):<14} {r['busy_cycles']:>8} busy cycles, {r['words_read']} words: "
              f"{r['words_per_cycle']:.3f} port words per cycle, results {'ok' if r['results_ok'] else 'WRONG'}")
    return 0 if out["one_at_a_time"]["results_ok"] and out["queued"]["results_ok"] else 1


def bench(args) -> int:
    if args.replay:
        return replay(args)
    cfg = get_config(args.config)
    opts = BenchOptions(config=args.config, seed=args.seed, mem_words=mem_words_for(cfg, args.rows, args.in_features),
                        result_words=1 << max(14, (args.rows * cfg.t_max - 1).bit_length()),
                        tokens_parallel=args.tokens_parallel)
    cfg = opts.ndp_config()
    env = {"NDP_BENCH_ROWS": str(args.rows), "NDP_BENCH_IN": str(args.in_features), "NDP_BENCH_BITS": args.bits,
           "NDP_BENCH_GROUP": str(args.group), "NDP_BENCH_TOKENS": args.tokens, "NDP_BENCH_STALLS": args.stalls,
           "NDP_BENCH_B2B": str(args.b2b)}
    if args.b2b < 2:
        raise ValueError(f"--b2b must be at least 2, not {args.b2b}")
    os.environ.update(env)
    t0 = time.perf_counter()
    log = build_dir(opts) / "bench.log"
    print(f"building and simulating; log in {log}")
    report = run(opts, test_module="ndpmoe.sim.cocotb_bench", log_file=log)
    print(f"NDP unit '{args.config}' (P={cfg.word_bits}, tokens_parallel={cfg.tokens_parallel}), "
          f"{args.rows} x {args.in_features}, G={args.group}; {time.perf_counter() - t0:.0f} s incl. build")
    print(f"{'':>14} {'':>8} {'alone':-^23} {f'{args.b2b} back to back':-^23} {'LOAD_ACT':-^15}")
    print(f"{'bits':>4} {'T':>3} {'stall':>5} {'words':>8} {'busy':>8} {'util':>6} {'overhead':>7} "
          f"{'busy':>8} {'util':>6} {'ovh/desc':>8} {'words':>7} {'cycles':>7} "
          f"{'MAC/cyc':>8} {'mem stall':>9} {'results':>8} {'sim cyc/s':>10} {'cyc/cpu-s':>10}")
    for r in report["cases"]:
        print(f"{r['bits']:>4} {r['tokens']:>3} {r['stall']:>3}/16 {r['words']:>8} {r['busy_cycles']:>8} "
              f"{r['utilization']:>6.3f} {r['overhead_cycles']:>7} "
              f"{r['b2b_busy_cycles']:>8} {r['b2b_utilization']:>6.3f} {r['b2b_overhead_cycles']:>8.1f} "
              f"{r['load_words']:>7} {r['load_cycles']:>7} "
              f"{r['macs_per_cycle']:>8.1f} {r['mem_stall_cycles']:>9} {'ok' if r['results_ok'] else 'WRONG':>8} "
              f"{r['sim_cycles_per_s']:>10.0f} {r['sim_cycles_per_cpu_s']:>10.0f}")
    return 0 if all(r["results_ok"] for r in report["cases"]) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
