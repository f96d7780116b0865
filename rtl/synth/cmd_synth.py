"""`ndpmoe synth`: synthesize and place-and-route one NDP configuration on one FPGA target. The
run is the library's `run_synth` (rtl/synth/run.py) plus `attach_throughput`; this module parses
the options and prints the result (`format_result`, which the demo uses too).

With --seeds (e.g. 1-5 or 1,3,7) the same netlist is placed and routed at each placer seed in
turn (or, with --workers N / --ray-address, the seeds after the first as Ray tasks side by side),
and the summary gives Fmax min / median / max with the failing endpoints of the worst seed: a
timing result that one seed makes or breaks is not yet a design that closes timing."""
from __future__ import annotations

import argparse
import json
import statistics

from ndpmoe.model.cli_args import float_in, int_in, output_dir, output_file, prepare_output_dir, prepare_output_file
from ndpmoe.model.contract import CONFIGS
from ndpmoe.rtl.platforms import PRIMITIVES
from ndpmoe.rtl.synth.report import SynthResult
from ndpmoe.rtl.synth.targets import TARGETS, get_target
from ndpmoe.rtl.synth.throughput import RTL_TARGET_WORDS_PER_CYCLE, attach_throughput, check_words_per_cycle

# router2's timing-driven rip-up for every run of `ndpmoe synth`: on main's unit at seeds 1-5 it met
# 150 MHz at 3 seeds (0 without) and lowered none (README, FPGA); fpga-sweep and the library keep it off
TMG_RIPUP_DEFAULT = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", choices=sorted(CONFIGS), default="default",
                   help=f"NDP configuration, one of {sorted(CONFIGS)}")
    p.add_argument("--target", choices=sorted(TARGETS), default="ecp5-85k", help=f"FPGA, one of {sorted(TARGETS)}")
    p.add_argument("--freq", type=float_in(0, 1000, lo_open=True), default=150.0, help="target clock in MHz (default 150)")
    p.add_argument("--speed", type=int, default=None,
                   help="ECP5 speed grade 6/7/8 (default 6, nextpnr's default and the slowest)")
    p.add_argument("--seed", type=int, default=1, help="nextpnr placer seed")
    p.add_argument("--seeds", type=parse_seeds, default=None,
                   help="place and route the same netlist at several seeds, one after the other: "
                        "a range 1-5 or a list 1,3,7 (replaces --seed)")
    p.add_argument("--workers", type=int, default=0,
                   help="with --seeds: the seeds after the first as Ray tasks on N local workers, side by side "
                        "(0: one after another)")
    p.add_argument("--ray-address", default=None,
                   help="with --seeds: run those seeds on an existing Ray cluster at HOST:PORT")
    p.add_argument("--dsp-min-width", type=int_in(1), default=None,
                   help="ECP5: put only multiplies whose narrower operand has >= N bits in DSPs "
                        "(default: synth_ecp5's choice, which maps even 2x8-bit products)")
    p.add_argument("--tmg-ripup", action=argparse.BooleanOptionalAction, default=TMG_RIPUP_DEFAULT,
                   help="nextpnr's timing-driven rip-up in router2: nets that miss the target are routed "
                        "again, up to 1,500 router iterations (minutes more where the placement cannot meet it; "
                        f"default {'on' if TMG_RIPUP_DEFAULT else 'off'}, see README, FPGA)")
    p.add_argument("--primitives", choices=PRIMITIVES, default=None,
                   help="block RAMs and multipliers: 'ecp5' instantiates DP16KD / MULT18X18D with their "
                        "registers on (the default on ECP5), 'inferred' leaves them to Yosys")
    p.add_argument("--words-per-cycle", type=float_in(0, 1, lo_open=True), default=RTL_TARGET_WORDS_PER_CYCLE,
                   help="memory port utilization while streaming (default 1.0 = the RTL's design "
                        "target, not a measurement)")
    p.add_argument("--out", type=output_dir, default=None, help="build folder (default build/fpga/<run>)")
    p.add_argument("--json", type=output_file, default=None, help="also write the result as JSON here")
    p.add_argument("--reuse", action="store_true",
                   help="return the stored result of an identical earlier run (same Verilog, target, speed, clock, "
                        "seed) from the build folder instead of running the tools again")


def parse_seeds(text: str) -> list[int]:
    """'1-5' -> [1, 2, 3, 4, 5]; '1,3,7' -> [1, 3, 7]."""
    try:
        if "-" in text:
            lo, hi = (int(v) for v in text.split("-"))
            seeds = list(range(lo, hi + 1))
        else:
            seeds = [int(v) for v in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be a range like 1-5 or a list like 1,3,7 of distinct "
                                         f"non-negative integers, not {text!r}")
    return seeds


def format_seeds(results: list[SynthResult], seeds: list[int]) -> str:
    """One line per seed, then Fmax min / median / max and how many seeds meet the target."""
    first = results[0]
    lines = [f"config {first.config} on {first.target}, speed grade {first.speed}, target "
             f"{first.freq_target_mhz:g} MHz, {len(seeds)} placer seeds"
             + (", router2 timing-driven rip-up" if first.extra.get("tmg_ripup") else "")]
    for seed, r in zip(seeds, results):
        failing = (r.extra.get("failing") or {}).get("endpoints")
        fmax = f"{r.fmax_mhz:6.1f} MHz" if r.fmax_mhz is not None else "   -      "
        lines.append(f"  seed {seed:>3}  {fmax}  {'meets' if r.meets_target else 'fails'}"
                     + (f"  ({failing} register inputs late)" if failing else "")
                     + (f"  nextpnr {r.seconds.get('nextpnr', 0):.0f} s" if r.seconds else "")
                     + (f"  error: {r.error.splitlines()[0]}" if r.error else ""))
    fmaxes = sorted(r.fmax_mhz for r in results if r.fmax_mhz is not None)
    if fmaxes:
        lines.append(f"  Fmax         min {fmaxes[0]:.1f} / median {statistics.median(fmaxes):.1f} / max "
                     f"{fmaxes[-1]:.1f} MHz; {sum(r.meets_target for r in results)} of {len(results)} seeds meet "
                     f"{first.freq_target_mhz:g} MHz")
    return "\n".join(lines)


def _pct(used: int | None, avail: int | None) -> str:
    return f" / {avail} ({100 * used / avail:.0f} %)" if used is not None and avail else ""


def format_result(r: SynthResult) -> str:
    target = get_target(r.target)
    util = r.utilization
    avail = lambda bel: util.get(bel, {}).get("available") if bel else None  # noqa: E731
    grade = f", speed grade {r.speed}" if r.speed is not None else ""
    lines = [f"config {r.config} on {r.target}{grade}, target {r.freq_target_mhz:g} MHz",
             f"  fits         {'yes' if r.fits else 'NO'}",
             f"  LUTs         {r.luts}{_pct(r.luts, avail(target.lut_bel))}",
             f"  FFs          {r.ffs}{_pct(r.ffs, avail(target.ff_bel or target.lut_bel))}",
             f"  DSPs         {r.dsps}{_pct(r.dsps, avail(target.dsp_bel))}"
             f"{'  (' + target.dsp_bel + ')' if target.dsp_bel else '  (no DSP tiles)'}",
             f"  block RAMs   {r.brams}  ({' + '.join(target.bram_bels)})"]
    if target.ff_bel is None and target.lut_bel in util:
        lines.append(f"  logic cells  {util[target.lut_bel]['used']}"
                     f"{_pct(util[target.lut_bel]['used'], util[target.lut_bel]['available'])}")
    if r.fmax_mhz is not None:
        verdict = "meets" if r.meets_target else "FAILS"
        lines.append(f"  Fmax         {r.fmax_mhz:.1f} MHz after routing ({verdict} {r.freq_target_mhz:g} MHz)")
    if r.critical_path:
        cp = r.critical_path
        lines.append(f"  critical     {cp.describe()}")
        lines.append(f"  path through {' -> '.join(cp.signals())}")
        if cp.hdl_lines():
            lines.append(f"  RTL lines    {', '.join(cp.hdl_lines())}")
    failing = r.extra.get("failing")
    if failing and failing["endpoints"]:
        lines.append(f"  failing      {failing['endpoints']} register inputs in {failing['signals']} signals arrive after "
                     f"{failing['period_ns']:g} ns; latest: "
                     + ", ".join(f"{w['signal']} {w['arrival_ns']:.2f} ns ({w['endpoints']})" for w in failing["worst"][:6]))
    tp = r.extra.get("throughput")
    if tp:
        lines.append(f"  weight BW    {tp['sustained_gbps']:.2f} GB/s sustained of {tp['peak_gbps']:.2f} GB/s "
                     f"port peak at {tp['words_per_cycle']:g} words/cycle ({tp['words_per_cycle_source']}); "
                     f"{tp['full_buffer_gbps']:.2f} GB/s with t_max tokens loaded")
        lines.append("  GEMM         " + ", ".join(f"int{b} {g:.1f} GMAC/s ({tp['macs_per_cycle'][b]:.0f} MAC/cycle)"
                                                for b, g in tp["gmacs"].items()))
    lines.append("  tool time    " + ", ".join(f"{k} {v:.0f} s" for k, v in r.seconds.items()))
    lines.append(f"  build        {r.extra.get('build')} (rtl {r.extra.get('rtl', '?')}, "
                 f"primitives {r.extra.get('primitives', 'inferred')}"
                 f"{', nextpnr --tmg-ripup' if r.extra.get('tmg_ripup') else ''})")
    for note in r.extra.get("notes", []):
        lines.append(f"  note         {note}")
    if r.error:
        lines.append(f"  error        {r.error}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ndpmoe.model.contract import get_config
    from ndpmoe.model.ray_runtime import check_spread
    from ndpmoe.rtl.synth.run import run_seeds, run_synth   # amaranth loads here, not for --help
    ndp_config = get_config(args.config)
    target = get_target(args.target)
    check_words_per_cycle(args.words_per_cycle)   # before minutes of place and route
    target.check_speed(args.speed)
    if (args.workers or args.ray_address) and not args.seeds:
        raise ValueError("--workers / --ray-address spread the seeds of --seeds: give --seeds (e.g. 1-5) too")
    check_spread(args.workers, args.ray_address)          # before any work
    prepare_output_dir(args.out, "--out")
    prepare_output_file(args.json, "--json")
    options = dict(freq_mhz=args.freq, speed=args.speed, dsp_min_width=args.dsp_min_width, reuse=args.reuse,
                   primitives=args.primitives, tmg_ripup=args.tmg_ripup)
    if args.seeds:
        results = run_seeds(ndp_config, target, args.seeds, build=args.out, workers=args.workers,
                            address=args.ray_address, **options)
        for r in results:
            attach_throughput(r, ndp_config, args.words_per_cycle)
        placed = [r for r in results if r.fmax_mhz is not None]
        worst = min(placed, key=lambda r: r.fmax_mhz) if placed else results[0]
        print(format_seeds(results, args.seeds))
        print(f"worst seed ({worst.extra.get('build')}):")
        print(format_result(worst))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps([dict(r.to_json(), seed=s) for s, r in zip(args.seeds, results)],
                                            indent=1) + "\n")
        return 0 if all(r.fits for r in results) else 1
    r = run_synth(ndp_config, target, build=args.out, seed=args.seed, **options)
    attach_throughput(r, ndp_config, args.words_per_cycle)
    print(format_result(r))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r.to_json(), indent=1) + "\n")
    return 0 if r.fits else 1
