"""`ndpmoe cosim`: one MoE layer of a real model on real text, its NDP ops on the Verilator-simulated
RTL and everything else in PyTorch; prints bit-exactness, output errors, NDP cycles and times.

    ndpmoe cosim --model default --layer 3 --tokens 16 --topn 2 --bits 3 --placement all-ndp
    ndpmoe cosim --faults            also: memory stops answering, reset mid-layer, rerun
    ndpmoe cosim --calibrate         refit the NDP cost model over several layers and token counts
"""
from __future__ import annotations

import argparse
import json
import time

from ndpmoe.host.ndp_cost import CALIB_LAYERS, CALIB_TOKENS
from ndpmoe.host.placement import PLACEMENTS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default' (the offline MoEfied SmolLM2) or a checkpoint folder")
    p.add_argument("--layer", type=int, default=3, help="MoE layer to co-simulate")
    p.add_argument("--tokens", type=int, default=16, help="held-out text tokens through the layer")
    p.add_argument("--topn", type=int, default=2, help="restore the n highest-weighted of the top-k experts per token")
    p.add_argument("--bits", type=int, default=3, help="low-bit expert width (2, 3, 4, 8)")
    p.add_argument("--group", type=int, default=64, help="quantization group size")
    p.add_argument("--rank", type=int, default=16, help="stored compensation rank")
    p.add_argument("--quantizer", default="optimized", help="rtn, hqq or optimized")
    p.add_argument("--placement", default="all-ndp", help=f"one of {', '.join(PLACEMENTS)}")
    p.add_argument("--seed", type=int, default=1, help="token positions and per-descriptor stall rates")
    p.add_argument("--faults", action="store_true", help="also run the fault scenarios (hang, reset mid-layer)")
    p.add_argument("--waves", action="store_true",
                   help="write a VCD waveform (separate Verilator build; ~13 kB per cycle, so --tokens 2 at most)")
    p.add_argument("--json", help="write the results here")
    c = p.add_argument_group("cost-model calibration (--calibrate)")
    c.add_argument("--calibrate", action="store_true", help="fit the NDP cost model to co-simulated cycles")
    c.add_argument("--calib-layers", default=",".join(map(str, CALIB_LAYERS)))
    c.add_argument("--calib-tokens", default=",".join(map(str, CALIB_TOKENS)))


def _ints(name: str, spec: str) -> list[int]:
    try:
        return [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers, not {spec!r}") from None


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def cosim_passed(r: dict) -> bool:
    """Every NDP op bit-exact against the golden unit, the layer output identical to the golden
    backend's in every stall mode, and every fault scenario caught and recovered from."""
    runs = r["runs"].values()
    return (all(run["ndp"]["max_abs_diff"] == 0 and run["output"]["equal_to_golden_backend"] for run in runs)
            and all(f["caught"] and f["rerun_equal_to_golden"] for f in (r.get("faults") or {}).values()))


def format_cosim(r: dict) -> str:
    """The printout of a `run_cosim` result."""
    s, p = r["settings"], r["plan"]
    out = []
    q = s["quant"]
    out.append(f"co-simulation: {s['model_source']}, layer {s['layer']} (E={s['experts']}, top-{s['top_k']}, "
               f"D={s['hidden']}, I={s['intermediate']})")
    out.append(f"  {s['tokens']} tokens of {s['tokens_source']}; int{q['bits']}-g{q['group']} experts "
               f"({q['quantizer']}), rank-{q['rank']} compensators, Top-{s['topn']}, placement {s['placement']}, "
               f"NDP '{s['config']}' RTL")
    out.append(f"plan: {p['tasks']} expert tasks (GEMM: {p['gemm_ndp']} NDP, {p['gemm_gpu']} GPU; compensation: "
               f"{p['comp_ndp']} NDP, {p['comp_gpu']} GPU), {p['restored_slots']} restored slots, "
               f"{p['modeled']['ndp_descriptors']} NDP descriptors")
    if not p["modeled"]["ndp_descriptors"]:
        out.append(f"note: the planner put no work on the NDP (on system {p['system']}, fetching these experts is "
                   f"cheaper); --placement all-ndp runs it all there")
    runs = r["runs"]
    diffs = [run["ndp"]["max_abs_diff"] for run in runs.values()]
    worst = "results misaligned" if any(d is None for d in diffs) else max(diffs, default=0)
    n_desc = sum(run["ndp"]["descriptors"] for run in runs.values())
    out.append(f"largest |RTL - golden| over every NDP op ({n_desc} descriptors, {len(runs)} runs): {worst}")
    same = all(run["output"]["equal_to_golden_backend"] for run in runs.values())
    out.append(f"layer output, RTL backend vs golden backend: {'identical' if same else 'DIFFERENT'}")
    o = next(iter(runs.values()))["output"]
    out.append(f"layer output error: vs float reference rel-L2 {o['vs_float']['rel_l2']:.4f} "
               f"(max |err| {o['vs_float']['max_abs']:.4f}, output RMS {o['vs_float']['ref_rms']:.4f}); "
               f"vs quantized+compensated reference rel-L2 {o['vs_quant']['rel_l2']:.4f} (int8 activations on the NDP)")
    labels = list(runs)
    out.append(f"{'':28}" + "".join(f"{('stalls ' + ('off' if runs[k]['stalls'] is None else 'on')):>16}" for k in labels))
    for name, key, fmt in (("NDP busy cycles", "ndp_cycles", "{:,}"), ("port utilization (words/cycle)", "port_utilization", "{:.3f}"),
                           ("datapath beats per cycle", "beats_per_cycle", "{:.3f}"),
                           ("memory stall cycles", "mem_stall_cycles", "{:,}"), ("output stall cycles", "out_stall_cycles", "{:,}"),
                           ("words read", "words_read", "{:,}"), ("results", "results", "{:,}")):
        out.append(f"{name:28}" + "".join(f"{fmt.format(runs[k]['ndp'][key]):>16}" for k in labels))
    link = next(iter(runs.values()))["link_bytes"]
    modeled_link = {k: v for k, v in p["modeled"]["link_bytes"].items() if v}
    out.append("bytes per link (executed): " + ", ".join(f"{k} {v:,}" for k, v in link.items() if v)
               + f"   (planned: {', '.join(f'{k} {v:,}' for k, v in modeled_link.items()) or 'none'})")
    t = p["modeled"]["time_s"]
    out.append(f"layer time, modeled ({p['modeled']['ndp_cycles']:,.0f} NDP cycles from the cost model, "
               f"{p['ndp_clock_mhz']:.0f} MHz): {_ms(t['total_s'])} (NDP {_ms(t['ndp_s'])}, link {_ms(t['link_s'])}, "
               f"GPU {_ms(t['gpu_s'])}, latency {_ms(t['latency_s'])})")
    for k in labels:
        m = runs[k]["measured_time_s"]
        out.append(f"layer time with measured NDP cycles, stalls {'off' if runs[k]['stalls'] is None else 'on '}: "
                   f"{_ms(m['total_s'])} (NDP {_ms(m['ndp_s'])})")
    out.append(f"cost model: {p['cost_model']['source']}")
    for kind, f in (r.get("faults") or {}).items():
        ok = f["caught"] and f["rerun_equal_to_golden"]
        out.append(f"fault '{kind}' at descriptor {f['descriptor']} of the layer: {f['raised']} ({f['message']}); "
                   f"after reset, rerun == golden: {f['rerun_equal_to_golden']} -> {'ok' if ok else 'FAILED'}")
    tm = r["timing_s"]
    out.append(f"time: prepare {tm['prepare']:.1f} s, Verilator build check {tm['build']:.1f} s, simulator process "
               f"{tm['simulator_process']:.1f} s ({tm['sim_cycles']:,} cycles); log in {r['run_dir']}")
    if r.get("waves"):
        out.append(f"waveform: {r['waves']}")
    return "\n".join(out)


def format_calibration(r: dict) -> str:
    """The printout of a `calibrate` result."""
    f = r["fit"]
    out = []
    out.append(f"NDP cost model fitted: {f['cycles_per_word']:.4f} cycles/beat, MATMUL overhead "
               f"{f['overhead_cycles']:.2f} cycles, LOAD_ACT overhead {f['load_overhead_cycles']:.2f} cycles")
    out.append(f"  ({f['source']})")
    out.append(f"{'case':>10} {'held out':>8} {'descriptors':>11} {'measured':>10} {'modeled':>10} {'layer err':>9} {'worst desc':>10}")
    for row in r["rows"]:
        out.append(f"{row['case']:>10} {'yes' if row['held_out'] else 'no':>8} {row['descriptors']:>11} "
                   f"{row['measured_cycles']:>10,.0f} {row['modeled_cycles']:>10,.0f} {row['layer_error']:>+9.3%} "
                   f"{row['worst_descriptor_error']:>10.2%}")
    out.append(f"worst layer error {r['worst_layer_error']:.3%}, worst single descriptor {r['worst_descriptor_error']:.2%} "
               f"(goal: within 5 %)")
    for name, err in r["baselines"].items():
        out.append(f"  before (cost model form with {name}): worst layer error {err:.1%}")
    return "\n".join(out)


def run(args) -> int:
    import torch   # torch, amaranth and cocotb load here, not for --help

    from .cost_calibration import calibrate
    from .cosim import run_cosim

    torch.set_num_threads(1)           # shared 2-core machines: oversubscribed torch is far slower
    t0 = time.perf_counter()
    if args.calibrate:
        result = calibrate(args.model, _ints("--calib-layers", args.calib_layers), _ints("--calib-tokens", args.calib_tokens),
                           args.topn, args.bits, args.placement, group=args.group, rank=args.rank,
                           quantizer=args.quantizer, seed=args.seed)
        print(format_calibration(result))
        ok = result["worst_layer_error"] <= 0.05
    else:
        result = run_cosim(args.model, args.layer, args.tokens, args.topn, args.bits, args.placement, group=args.group,
                           rank=args.rank, quantizer=args.quantizer, seed=args.seed, faults=args.faults,
                           waves=args.waves)
        print(format_cosim(result))
        ok = cosim_passed(result)
    print(f"total {time.perf_counter() - t0:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"results: {args.json}")
    return 0 if ok else 1

