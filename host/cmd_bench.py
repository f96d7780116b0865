"""`ndpmoe bench`: modeled decode throughput and bytes per token of a named MoE model on a named
system, for fp16 offloading with LRU, uniform low-bit, HOBBIT-style mixed precision at the bytes of
Top-1, Top-n restoration at each n, and the budgeted adaptive policy at the bytes of each Top-n.
Expert selection replays a routing trace (which one is printed); the planning cost of the runtime
itself is measured and printed per token per layer.

The benchmark is the library in host/bench.py; this module turns the options into `BenchOptions`
and prints the rows as they come (`format_bench` prints a finished `BenchResult` the same way)."""
from __future__ import annotations

import argparse
import json

# bench.ROWS, spelled out here so that --help imports no torch (a test holds them equal)
ALL_ROWS = "fp16-lru,uniform,hobbit,topn,adaptive"
# Routing traces are recorded as one sequence through SmolLM2 (or the default model): its context.
MAX_TOKENS = 8192


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ndpmoe.model.cli_args import BITS, GROUP, float_in, int_in, output_file

    p.add_argument("--model", default="mixtral-8x7b",
                   help="mixtral-8x7b, qwen1.5-moe-a2.7b, deepseek-v2-lite, olmoe-1b-7b, or default (the offline "
                        "SmolLM2 MoE, replayed on its real routers)")
    p.add_argument("--system", default="gpu-only", help="gpu-only or gpu-ndp")
    p.add_argument("--gpu", help="GPU preset (rtx4090, a100-80gb, h100-sxm)")
    p.add_argument("--link", help="link preset (pcie4-x16, pcie5-x16, cxl-x16)")
    p.add_argument("--ndp", help="NDP preset (cxl-ndp, cxl-ndp-fpga)")
    p.add_argument("--cache-gb", type=float_in(0, lo_open=True), default=8.0, help="GPU expert cache capacity in GB (1e9 bytes)")
    p.add_argument("--cache-policy", default="lfu", help="eviction of the low-bit rows: lru or lfu")
    p.add_argument("--factor-share", type=float_in(0, 0.5, hi_open=True), default=0.0,
                   help="share of the cache kept as a separate factor pool for restoring rows (0: one shared pool)")
    p.add_argument("--policy", default=ALL_ROWS, help=f"rows to run, comma separated from {ALL_ROWS}")
    p.add_argument("--topn", default="all", help="n values for Top-n and its equal-bytes rows ('all': 1..k-1)")
    p.add_argument("--bits", type=BITS, default=3, help="low-bit expert width")
    p.add_argument("--group", type=GROUP, default=64, help="quantization group size")
    p.add_argument("--hi-bits", type=BITS, default=4, help="width of the higher-precision copies (HOBBIT)")
    p.add_argument("--rank", type=int_in(1), default=32, help="stored compensation rank")
    p.add_argument("--tokens", type=int_in(1, MAX_TOKENS), default=256,
                   help=f"decode steps x batch replayed from the trace (at most {MAX_TOKENS})")
    p.add_argument("--batch", type=int_in(1), default=1, help="tokens per decode step")
    p.add_argument("--placement", default="auto", help="auto, all-gpu, all-ndp, ndp-gemm, ndp-comp")
    p.add_argument("--trace", default="auto", help="auto, text, synthetic, or a saved trace file")
    p.add_argument("--json", type=output_file, help="write the results here")


def check_arguments(args) -> None:
    """What argparse cannot check alone, before the routing trace is recorded."""
    from ndpmoe.model.cli_args import input_file, prepare_output_file
    from ndpmoe.model.errors import NdpmoeError

    from .models import get_model
    from .placement import PLACEMENTS

    if args.placement not in PLACEMENTS:
        raise NdpmoeError(f"--placement {args.placement!r}: expected one of {', '.join(PLACEMENTS)}")
    if args.batch > args.tokens:
        raise NdpmoeError(f"--batch {args.batch} is more than --tokens {args.tokens}")
    if args.trace not in ("auto", "text", "synthetic"):
        try:
            input_file(args.trace)
        except argparse.ArgumentTypeError as exc:
            raise NdpmoeError(f"--trace: expected auto, text, synthetic or a saved trace file; {exc}") from None
        from .routing_trace import RoutingTrace   # a file that is no trace fails here, in a second
        RoutingTrace.load(args.trace)
    spec = get_model(args.model)
    top = min(spec.hidden, spec.intermediate)
    if args.rank > top:
        raise NdpmoeError(f"--rank {args.rank}: a compensator rank must be at most min(hidden, expert "
                          f"intermediate) = {top} for {spec.name}")
    prepare_output_file(args.json, "--json")


def parse_topn(spec: str) -> tuple[int, ...] | None:
    """'all' -> None (every n in 1..k-1), '1,4' -> (1, 4)."""
    if spec == "all":
        return None
    parts = [p.strip() for p in spec.split(",")]
    if not parts or not all(p.isdigit() for p in parts):
        raise ValueError(f"--topn must be 'all' or comma-separated integers, not {spec!r}")
    return tuple(int(p) for p in parts)


def options_from_args(args: argparse.Namespace):
    from .bench import BenchOptions
    return BenchOptions(model=args.model, system=args.system, gpu=args.gpu, link=args.link, ndp=args.ndp,
                        cache_gb=args.cache_gb, cache_policy=args.cache_policy, factor_share=args.factor_share,
                        rows=tuple(r.strip() for r in args.policy.split(",") if r.strip()),
                        topn=parse_topn(args.topn), bits=args.bits, group=args.group, hi_bits=args.hi_bits,
                        rank=args.rank, tokens=args.tokens, batch=args.batch, placement=args.placement,
                        trace=args.trace)


_COLUMNS = (f"{'configuration':<52} {'moved':>8} {'link':>8} {'weights':>8} {'factors':>7} {'hi':>7} "
            f"{'ndp io':>7} {'NDP read':>8} {'GPU hit':>7} {'tok/s':>7} {'plan us':>7} {'of all':>6}")


def format_header(setup) -> str:
    """What the rows share (model, system, trace, cache) and the table's column heads."""
    opt, spec, system, sizes = setup.options, setup.spec, setup.system, setup.sizes
    ndp = system.ndp
    lines = [f"model {spec.name}: {spec.moe_layers} MoE layers, {spec.experts} experts, top-{spec.top_k}, "
             f"D {spec.hidden}, I {spec.intermediate}; {sizes.fmt} expert {sizes.weight_bytes('lo') / 1e6:.1f} MB, "
             f"fp16 {setup.fp16_sizes.weight_bytes('fp16') / 1e6:.1f} MB, int{opt.hi_bits} copy "
             f"{sizes.weight_bytes('hi') / 1e6:.1f} MB, rank-{opt.rank} fp16 factors "
             f"{sizes.factor_bytes_fp16(opt.rank) / 1e6:.2f} MB",
             f"system {system.name}: GPU {system.gpu.name}, link {system.link.name} {system.link.gbps} GB/s, "
             f"memory {system.memory.name} {system.memory.gbps} GB/s"
             + (f", NDP {ndp.name}: {ndp.units} x {ndp.ndp_config.word_bits}-bit units at {ndp.clock_mhz:.0f} MHz = "
                f"{ndp.peak_gbps:.1f} GB/s" if ndp else "")]
    if ndp:
        lines.append(f"NDP cycles: {ndp.cost.source}")
    lines += [f"trace: {setup.trace.source}",
              f"sensitivity (adaptive choices only): {setup.sensitivity.source}",
              f"cache {opt.cache_gb} GB"
              + (f" ({opt.factor_share:.0%} of it a separate factor pool for restoring rows)" if opt.factor_share
                 else " (experts and factors share it)")
              + f", {opt.tokens} tokens, batch {opt.batch}, placement {opt.placement}",
              "MB/tok: 'moved' = over the link + read by the NDP units; then the link's share by kind "
              "('weights' includes prefetches, 'ndp io' activations and results), then the NDP's reads.",
              "Equal-bytes rows (adaptive, hobbit) are calibrated to the measured bytes of the Top-n row they name.",
              "tok/s: the system's modeled time plus the host planning it does not hide ('plan us', measured CPU us "
              "per token per layer; 'of all': all planning, hidden or not).",
              _COLUMNS, "-" * len(_COLUMNS)]
    return "\n".join(lines)


def format_row(r) -> str:
    lb = r.link_bytes_per_token
    return (f"{r.label:<52} {r.moved_bytes_per_token / 1e6:>8.2f} {r.total_link_bytes_per_token / 1e6:>8.2f} "
            f"{r.weight_bytes_per_token / 1e6:>8.2f} {lb.get('factors', 0) / 1e6:>7.2f} "
            f"{lb.get('hi_weights', 0) / 1e6:>7.2f} {r.ndp_io_bytes_per_token / 1e6:>7.2f} "
            f"{r.ndp_read_bytes_per_token / 1e6:>8.2f} {r.gpu_hit_rate:>7.1%} {r.tokens_per_s:>7.2f} "
            f"{r.planning_us_per_token_per_layer:>7.1f} {r.planning_total_us_per_token_per_layer:>6.1f}")


def format_footer(result) -> str:
    from .bench import PLANNING_GOAL_US
    return (f"planning cost: at most {result.worst_planning_us:.1f} us per token per layer exposed (goal < "
            f"{PLANNING_GOAL_US:.0f} us), of {result.worst_planning_total_us:.1f} us in all ('plan us' of 'of all'), "
            f"CPU time, median over decode steps; for scale, sum(range(10**7)) takes {result.cpu_reference_s:.3f} s "
            f"of CPU here.\nExposed = deciding (policy, tasks, placement: the layer's launch waits for it) + the "
            f"cache bookkeeping beyond the layer's modeled time (it runs while the layer executes); tok/s includes "
            f"the exposed planning.")


def format_bench(result) -> str:
    """The whole printout of a finished benchmark (what `ndpmoe bench` prints)."""
    return "\n".join([format_header(result.setup), *map(format_row, result.rows), format_footer(result)])


def run(args) -> int:
    check_arguments(args)
    from .bench import bench_rows, finish_bench, prepare_bench   # torch loads here, not for --help

    setup = prepare_bench(options_from_args(args))
    print(format_header(setup))
    rows = []
    for row in bench_rows(setup):
        print(format_row(row), flush=True)
        rows.append(row)
    result = finish_bench(setup, rows)
    print(format_footer(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_json(), f, indent=1)
    return 0
