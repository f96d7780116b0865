"""`ndpmoe factor-bench`: what packed low-bit compensators (int8, int4, int3) keep of the fp16
factors' error reduction through the runtime, on the GPU path and on the NDP (golden model), and
their exact bytes, on the default model."""
from __future__ import annotations

from ndpmoe.model.cli_args import int_in, int_list


def add_arguments(p):
    p.add_argument("--layers", type=int_list(0, 29), default="3,15,27", help="MoE layers of the default model")
    p.add_argument("--rank", type=int_in(1), default=16, help="stored compensator rank")
    p.add_argument("--configs", default="8x16,8x4,8x1,2x16",
                   help="restoration configurations NxR: Top-N slots at rank R (comma separated)")
    p.add_argument("--tokens", type=int_in(1), default=128, help="held-out tokens per layer (evaluation text)")
    p.add_argument("--json", help="also write the figures to this JSON file")


def _configs(text: str, rank: int) -> list[tuple[int, int]]:
    from ndpmoe.model.errors import NdpmoeError

    out = []
    for part in text.split(","):
        try:
            n, r = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise NdpmoeError(f"--configs entry {part!r} is not N x R like 8x16") from None
        if not 1 <= r <= rank or n < 1:
            raise NdpmoeError(f"--configs entry {part!r}: N must be >= 1 and R in [1, --rank {rank}]")
        out.append((n, r))
    return out


def run(args) -> int:
    configs = _configs(args.configs, args.rank)
    import json

    from .factor_bench import main
    out = main(sorted(args.layers), args.rank, configs, args.tokens)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0
