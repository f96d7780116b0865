"""`ndpmoe fpga-sweep`: synthesize and place-and-route NDP configurations around a base one
(port width, bit widths, T_max, tokens per cycle) and write a table, a plot and JSON.

Each point's result is kept in its build folder and reused while its Verilog, target, clock and
seed are unchanged, so an interrupted sweep resumes where it stopped (--fresh to redo all).
"""
from __future__ import annotations

import argparse
import json

from ndpmoe.model.cli_args import float_in, int_in, output_dir, prepare_output_dir
from ndpmoe.model.contract import CONFIGS, get_config
from ndpmoe.model.paths import build_root
from ndpmoe.rtl.synth.sweep import (SweepAxes, markdown_table, parse_bits_sets, parse_ints, plot,
                             sweep_points)
from ndpmoe.rtl.synth.targets import TARGETS, get_target
from ndpmoe.rtl.synth.throughput import RTL_TARGET_WORDS_PER_CYCLE, attach_throughput, check_words_per_cycle


def add_arguments(p: argparse.ArgumentParser) -> None:
    axes = SweepAxes()
    p.add_argument("--base", choices=sorted(CONFIGS), default="default",
                   help=f"base configuration, one of {sorted(CONFIGS)}")
    p.add_argument("--target", choices=sorted(TARGETS), default="ecp5-85k", help=f"FPGA, one of {sorted(TARGETS)}")
    p.add_argument("--freq", type=float_in(0, 1000, lo_open=True), default=150.0, help="target clock in MHz (default 150)")
    p.add_argument("--speed", type=int, default=None, help="ECP5 speed grade 6/7/8 (default 6)")
    p.add_argument("--seed", type=int, default=1, help="nextpnr placer seed")
    p.add_argument("--dsp-min-width", type=int_in(1), default=None,
                   help="ECP5: put only multiplies whose narrower operand has >= N bits in DSPs "
                        "(default: synth_ecp5's choice, which maps even 2x8-bit products)")
    p.add_argument("--word-bits", default=",".join(map(str, axes.word_bits)), help="port widths")
    p.add_argument("--bits", default=",".join("".join(map(str, b)) for b in axes.bits),
                   help="bit-width sets, one digit per width, e.g. 2348,248,48")
    p.add_argument("--t-max", default=",".join(map(str, axes.t_max)), help="activation buffer tokens")
    p.add_argument("--tokens-parallel", default="",
                   help="tokens multiplied per cycle (default: the base configuration's)")
    p.add_argument("--grid", action="store_true",
                   help="full product of the axes (default: the base plus one axis varied at a time)")
    p.add_argument("--words-per-cycle", type=float_in(0, 1, lo_open=True), default=RTL_TARGET_WORDS_PER_CYCLE,
                   help="port utilization for the bandwidth columns (default 1.0 = the RTL's design "
                        "target, not a measurement)")
    p.add_argument("--dsp-fallback", type=int_in(0), default=9,
                   help="rerun a point whose multiplies overflow the DSP blocks with --dsp-min-width N "
                        "(default 9: low-bit lane products in LUTs); 0 to keep the failure")
    p.add_argument("--out", type=output_dir, default=None, help="output folder (default build/fpga/sweep-<target>)")
    p.add_argument("--fresh", action="store_true", help="rerun points that have a stored result")
    p.add_argument("--dry-run", action="store_true", help="only list the points")
    p.add_argument("--workers", type=int, default=0, help="run the points as Ray tasks on N local workers (0: one after another)")
    p.add_argument("--ray-address", default=None, help="run them on an existing Ray cluster at HOST:PORT")


def run(args: argparse.Namespace) -> int:
    from ndpmoe.model.ray_runtime import check_spread
    from ndpmoe.rtl.synth.sweep_workers import PointJob, run_points

    check_spread(args.workers, args.ray_address)          # before any work

    base, target = get_config(args.base), get_target(args.target)
    speed = target.check_speed(args.speed)
    check_words_per_cycle(args.words_per_cycle)
    axes = SweepAxes(word_bits=parse_ints(args.word_bits, "--word-bits"), bits=parse_bits_sets(args.bits),
                     t_max=parse_ints(args.t_max, "--t-max"),
                     tokens_parallel=parse_ints(args.tokens_parallel, "--tokens-parallel")
                     if args.tokens_parallel else ())
    points = sweep_points(base, axes, grid=args.grid)
    out = args.out or build_root("fpga") / f"sweep-{target.name}"
    if not args.dry_run:
        prepare_output_dir(out, "--out")
    print(f"{len(points)} points on {target.name}"
          + (f" speed grade {speed}" if speed is not None else "") + f" at {args.freq:g} MHz: "
          + ", ".join(c.name for c in points))
    if args.dry_run:
        return 0

    job = PointJob(target.name, args.freq, speed, out, args.seed, args.fresh, args.dsp_min_width, args.dsp_fallback,
                   args.words_per_cycle)
    results = run_points(points, job, args.workers, args.ray_address)

    table = markdown_table(results)
    title = (f"NDP unit sweep on {target.name}" + (f" (speed {speed})" if speed is not None else "")
             + f", target {args.freq:g} MHz")
    (out / "table.md").write_text(f"{title}\n\n{table}\n")
    (out / "sweep.json").write_text(json.dumps(
        [dict(r.to_json(), point=cfg.name, ndp_config=vars(cfg)) for cfg, r in results], indent=1, default=list) + "\n")
    plot(results, out / "sweep.png", title, args.freq)
    print(f"\n{title}\n\n{table}\n\nwrote {out / 'table.md'}, {out / 'sweep.json'}, {out / 'sweep.png'}")
    return 0 if all(r.fits for _, r in results) else 1
