"""`ndpmoe make-checkpoint`: a random checkpoint with a real MoE model's configuration, tensor
names and sizes (sharded safetensors with an index), for timing the pipeline at real sizes."""
from __future__ import annotations

LIKE = ("mixtral-8x7b", "olmoe-1b-7b", "deepseek-v2-lite", "qwen3-30b-a3b")   # model/real_configs.py


def add_arguments(p):
    p.add_argument("--like", required=True, choices=LIKE, help="the model whose configuration is copied")
    p.add_argument("--layers", type=int, required=True, help="decoder layers to write (DeepSeek's first is dense)")
    p.add_argument("--out", required=True, help="folder to create (must not exist, or be empty)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--shard-gb", type=float, default=2.0, help="largest shard in GB (2^30 bytes)")
    small = p.add_argument_group("smaller than real (tests); default: the real size")
    small.add_argument("--hidden", type=int, help="hidden size (heads shrink in proportion)")
    small.add_argument("--intermediate", type=int, help="expert intermediate size")
    small.add_argument("--experts", type=int, help="routed experts per MoE layer")
    small.add_argument("--vocab", type=int, help="vocabulary size (at least 258 for the byte tokenizer)")


def run(args) -> int:
    from ndpmoe.model.make_checkpoint import make_checkpoint   # torch loads here, not for --help

    if not args.shard_gb > 0:
        raise ValueError(f"--shard-gb must be positive, not {args.shard_gb}")
    info = make_checkpoint(args.like, args.out, layers=args.layers, hidden=args.hidden,
                           intermediate=args.intermediate, experts=args.experts, vocab=args.vocab,
                           dtype=args.dtype, shard_bytes=int(args.shard_gb * (1 << 30)))
    print(f"wrote {info['folder']}: {info['tensors']} tensors, {info['bytes'] / 1e9:.3f} GB, "
          f"{info['shards']} shard(s) in {info['seconds']} s")
    return 0
