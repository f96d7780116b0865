"""`ndpmoe bench`: modeled decode throughput and bytes per token of a named MoE model on a named
system, for fp16 offloading with LRU, uniform low-bit, HOBBIT-style mixed precision at the bytes of
Top-1, Top-n restoration at each n, and the budgeted adaptive policy at the bytes of each Top-n.
Expert selection replays a routing trace (which one is printed); the planning cost of the runtime
itself is measured and printed per token per layer."""
from __future__ import annotations

import argparse

ROWS = ("fp16-lru", "uniform", "hobbit", "topn", "adaptive")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mixtral-8x7b",
                   help="mixtral-8x7b, qwen1.5-moe-a2.7b, deepseek-v2-lite, olmoe-1b-7b, or default (the offline "
                        "SmolLM2 MoE, replayed on its real routers)")
    p.add_argument("--system", default="gpu-only", help="gpu-only or gpu-ndp")
    p.add_argument("--gpu", help="GPU preset (rtx4090, a100-80gb, h100-sxm)")
    p.add_argument("--link", help="link preset (pcie4-x16, pcie5-x16, cxl-x16)")
    p.add_argument("--ndp", help="NDP preset (cxl-ndp, cxl-ndp-fpga)")
    p.add_argument("--cache-gb", type=float, default=8.0, help="GPU expert cache capacity in GB (1e9 bytes)")
    p.add_argument("--cache-policy", default="lfu", help="eviction of the low-bit rows: lru or lfu")
    p.add_argument("--factor-share", type=float, default=0.0,
                   help="share of the cache kept as a separate factor pool for restoring rows (0: one shared pool)")
    p.add_argument("--policy", default=",".join(ROWS), help=f"rows to run, comma separated from {ROWS}")
    p.add_argument("--topn", default="all", help="n values for Top-n and its equal-bytes rows ('all': 1..k-1)")
    p.add_argument("--bits", type=int, default=3, help="low-bit expert width")
    p.add_argument("--group", type=int, default=64, help="quantization group size")
    p.add_argument("--hi-bits", type=int, default=4, help="width of the higher-precision copies (HOBBIT)")
    p.add_argument("--rank", type=int, default=32, help="stored compensation rank")
    p.add_argument("--tokens", type=int, default=256, help="decode steps x batch replayed from the trace")
    p.add_argument("--batch", type=int, default=1, help="tokens per decode step")
    p.add_argument("--placement", default="auto", help="auto, all-gpu, all-ndp, ndp-gemm, ndp-comp")
    p.add_argument("--trace", default="auto", help="auto, text, synthetic, or a saved trace file")
    p.add_argument("--json", help="write the results here")


def run(args) -> int:
    from .bench import run as run_bench   # torch loads here, not for --help
    return run_bench(args)
