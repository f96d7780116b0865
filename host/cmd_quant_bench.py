"""`ndpmoe quant-bench`: quantizer and compensator-fit times on one Mixtral-size expert matrix,
throughput at the expert shapes of four real MoE models and the projected time of a full default
study of each on this machine, float32-against-float64 error changes on real weights, and the
bytes per weight of every packed format."""
from __future__ import annotations

from ndpmoe.model.cli_args import BITS, GROUP, int_in, int_list

MODELS = ("mixtral-8x7b", "olmoe-1b-7b", "deepseek-v2-lite", "qwen3-30b-a3b")   # model/real_configs.py
SMOLLM2_LAYERS = 30


def add_arguments(p):
    p.add_argument("--rows", type=int_in(1), default=14336, help="output features (Mixtral w1/w3: 14336)")
    p.add_argument("--cols", type=int_in(1), default=4096, help="input features (Mixtral hidden: 4096)")
    p.add_argument("--bits", type=BITS, default=3)
    p.add_argument("--group", type=GROUP, default=64)
    p.add_argument("--rank", type=int_in(1), default=32)
    p.add_argument("--calib-tokens", type=int_in(1), default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int_in(1), default=1,
                   help="time each headline quantizer and fit this many times and report the shortest (a shared machine)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where quantizers and fits run")
    p.add_argument("--precision", default="float32", choices=("float32", "float64"),
                   help="arithmetic of the timed quantizers and fits (float64: the reference the study's cache holds)")
    p.add_argument("--reference", action="store_true",
                   help="also time the float64 reference on the headline matrix (slow: about a minute per quantizer)")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"models whose expert shapes are timed and whose default study is projected ({', '.join(MODELS)}; "
                        "'none' to skip)")
    p.add_argument("--precision-check", action="store_true",
                   help="float32 against float64: held-out output error of every quantizer and fit on SmolLM2's real "
                        "MLP matrices, and the large fits against the exact SVD")
    p.add_argument("--real", action="store_true",
                   help="also report RTN / HQQ / optimized errors on SmolLM2's real MLP matrices and activations")
    p.add_argument("--real-layers", type=int_list(0, SMOLLM2_LAYERS - 1), default="1,15,28",
                   help="SmolLM2 layers for --real and --precision-check")


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
