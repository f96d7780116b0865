"""`ndpmoe quant-bench`: quantizer and compensator cost on one Mixtral-size expert matrix (CPU),
and the bytes per weight of every packed format, metadata included."""
from __future__ import annotations


def add_arguments(p):
    p.add_argument("--rows", type=int, default=14336, help="output features (Mixtral w1/w3: 14336)")
    p.add_argument("--cols", type=int, default=4096, help="input features (Mixtral hidden: 4096)")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--calib-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real", action="store_true",
                   help="also report RTN / HQQ / optimized errors on SmolLM2's real MLP matrices and activations")
    p.add_argument("--real-layers", default="1,15,28", help="SmolLM2 layers for --real")


def run(args) -> int:
    from .quant_bench import run as run_quant_bench   # torch loads here, not for --help
    return run_quant_bench(args)
