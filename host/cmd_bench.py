"""`ndpmoe bench`: modeled decode throughput and bytes per token of a named MoE model on a named
system, for fp16 offloading with LRU, uniform low-bit, HOBBIT-style mixed precision at the bytes of
Top-1, Top-n restoration at each n, and the budgeted adaptive policy at the bytes of each Top-n.
Expert selection replays a routing trace (which one is printed); the planning cost of the runtime
itself is measured and printed per token per layer."""
from __future__ import annotations

import argparse

ROWS = ("fp16-lru", "uniform", "hobbit", "topn", "adaptive")
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
    p.add_argument("--policy", default=",".join(ROWS), help=f"rows to run, comma separated from {ROWS}")
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


def run(args) -> int:
    check_arguments(args)
    from .bench import run as run_bench   # torch loads here, not for --help
    return run_bench(args)
