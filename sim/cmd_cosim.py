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

from ndpmoe.model.cli_args import BITS, GROUP, int_in, int_list, output_file
from ndpmoe.host.ndp_cost import CALIB_LAYERS, CALIB_TOKENS
from ndpmoe.host.placement import PLACEMENTS
from ndpmoe.model.errors import NdpmoeError

# Each token is ~1e5 simulated cycles of the default model's layer (both stall modes): the bound
# keeps one run to minutes; more tokens: several runs with other --seed values.
MAX_TOKENS = 256

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default' (the offline MoEfied SmolLM2) or a checkpoint folder")
    p.add_argument("--layer", type=int_in(0), default=3, help="MoE layer to co-simulate")
    p.add_argument("--tokens", type=int_in(1, MAX_TOKENS), default=16,
                   help=f"held-out text tokens through the layer (at most {MAX_TOKENS})")
    p.add_argument("--topn", type=int_in(1), default=2, help="restore the n highest-weighted of the top-k experts per token")
    p.add_argument("--bits", type=BITS, default=3, help="low-bit expert width (2, 3, 4, 8)")
    p.add_argument("--group", type=GROUP, default=64, help="quantization group size")
    p.add_argument("--rank", type=int_in(0), default=16, help="stored compensation rank")
    p.add_argument("--quantizer", choices=("rtn", "hqq", "optimized"), default="optimized", help="rtn, hqq or optimized")
    p.add_argument("--placement", choices=PLACEMENTS, default="all-ndp", help=f"one of {', '.join(PLACEMENTS)}")
    p.add_argument("--seed", type=int, default=1, help="token positions and per-descriptor stall rates")
    p.add_argument("--faults", action="store_true", help="also run the fault scenarios (hang, reset mid-layer)")
    p.add_argument("--waves", action="store_true",
                   help="write a VCD waveform (separate Verilator build; ~13 kB per cycle, so --tokens 2 at most)")
    p.add_argument("--json", type=output_file, help="write the results here")
    c = p.add_argument_group("cost-model calibration (--calibrate)")
    c.add_argument("--calibrate", action="store_true", help="fit the NDP cost model to co-simulated cycles")
    c.add_argument("--calib-layers", type=int_list(lo=0), default=",".join(map(str, CALIB_LAYERS)))
    c.add_argument("--calib-tokens", type=int_list(lo=1, hi=MAX_TOKENS), default=",".join(map(str, CALIB_TOKENS)))


def check_arguments(args) -> None:
    """The values that depend on the model, checked on its configuration before it loads."""
    from ndpmoe.model.cli_args import prepare_output_file
    from ndpmoe.host.outline import layer_list, model_outline

    o = model_outline(args.model)
    for layer in list(args.calib_layers if args.calibrate else ()) + [args.layer]:
        if layer not in o.moe_layers:
            raise NdpmoeError(f"layer {layer} is not an MoE layer of {args.model} (MoE layers: "
                              f"{layer_list(o.moe_layers)})")
    if not args.topn < o.top_k:
        raise NdpmoeError(f"--topn {args.topn}: n must be in 1..{o.top_k - 1} (the model routes top-{o.top_k})")
    top = min(o.hidden, o.intermediate)
    if args.rank > top:
        raise NdpmoeError(f"--rank {args.rank}: a compensator rank must be at most min(hidden, expert "
                          f"intermediate) = {top}")
    prepare_output_file(args.json, "--json")


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
    check_arguments(args)
    import torch   # torch, amaranth and cocotb load here, not for --help

    from .cost_calibration import calibrate
    from .cosim import run_cosim

    torch.set_num_threads(1)           # shared 2-core machines: oversubscribed torch is far slower
    t0 = time.perf_counter()
    if args.calibrate:
        result = calibrate(args.model, list(args.calib_layers), list(args.calib_tokens),
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

