"""`ndpmoe quant-bench`: quantizer and compensator cost on one Mixtral-size expert matrix (CPU),
and the bytes per weight of every packed format, metadata included."""
from __future__ import annotations


from ndpmoe.model.cli_args import BITS, GROUP, int_in, int_list

SMOLLM2_LAYERS = 30


def add_arguments(p):
    p.add_argument("--rows", type=int_in(1), default=14336, help="output features (Mixtral w1/w3: 14336)")
    p.add_argument("--cols", type=int_in(1), default=4096, help="input features (Mixtral hidden: 4096)")
    p.add_argument("--bits", type=BITS, default=3)
    p.add_argument("--group", type=GROUP, default=64)
    p.add_argument("--rank", type=int_in(1), default=32)
    p.add_argument("--calib-tokens", type=int_in(1), default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real", action="store_true",
                   help="also report RTN / HQQ / optimized errors on SmolLM2's real MLP matrices and activations")
    p.add_argument("--real-layers", type=int_list(0, SMOLLM2_LAYERS - 1), default="1,15,28",
                   help="SmolLM2 layers for --real")


def check_arguments(args) -> None:
    from ndpmoe.model.contract import MAX_IN_FEATURES
    from ndpmoe.model.errors import NdpmoeError

    if args.cols % args.group or args.cols > MAX_IN_FEATURES:
        raise NdpmoeError(f"--cols {args.cols} must be a multiple of --group {args.group} and at most {MAX_IN_FEATURES}")
    if args.rank > min(args.rows, args.cols):
        raise NdpmoeError(f"--rank {args.rank} must be at most min(--rows, --cols) = {min(args.rows, args.cols)}")


def run(args) -> int:
    check_arguments(args)
    from .quant_bench import run as run_quant_bench   # torch loads here, not for --help
    return run_quant_bench(args)
