"""Shape-true random checkpoints: a Hugging Face folder with a real model's configuration, its
tensor names and sizes as they are on disk (per-expert tensors, sharded safetensors with an
index), random weights and a byte-level tokenizer, so the whole pipeline can be timed at real
sizes without downloading a model.

Names and shapes come from transformers itself: the model is built on the meta device (no
memory) and its fused in-memory experts are written per expert under the family's on-disk names
(tests/test_make_checkpoint.py holds the result against transformers' own save_pretrained).
The folder is written beside its destination and renamed into place: never half written.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .checkpoint import FAMILIES, INDEX_NAME
from .real_configs import config_object

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
INIT_STD = 0.02          # transformers' initializer_range for all four families


def disk_layout(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(on-disk key, shape) of every tensor of a model with config `cfg`, in layer order."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    fam = FAMILIES[cfg.model_type]
    w1, w3, w2 = fam.names
    out = []
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and getattr(cfg, "tie_word_embeddings", False):
            continue
        if key.endswith(".mlp.experts.gate_up_proj") or key.endswith(".mlp.experts.down_proj"):
            prefix = key.rsplit(".mlp.experts.", 1)[0] + f".{fam.block}.experts"
            e, rows, cols = t.shape
            for x in range(e):
                if key.endswith("gate_up_proj"):          # [E, 2I, D]: gate rows first, then up
                    out += [(f"{prefix}.{x}.{w1}.weight", (rows // 2, cols)), (f"{prefix}.{x}.{w3}.weight", (rows // 2, cols))]
                else:                                      # [E, D, I]
                    out.append((f"{prefix}.{x}.{w2}.weight", (rows, cols)))
            continue
        if fam.block != "mlp" and ".mlp." in key and _is_moe_tensor(key):
            key = key.replace(".mlp.", f".{fam.block}.")
        out.append((key, tuple(t.shape)))
    return out


def _is_moe_tensor(key: str) -> bool:
    return ".mlp.gate." in key or ".mlp.experts." in key


def _random(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Deterministic per key (the same tensor whatever the sharding): norms 1, biases 0, else N(0, 0.02)."""
    if "norm" in key and len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    if key.endswith(".bias") or key.endswith("e_score_correction_bias"):
        return torch.zeros(shape, dtype=dtype)
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * INIT_STD).to(dtype)


def byte_tokenizer(vocab_size: int, eos_id: int | None):
    """A byte-level tokenizer whose ids all lie inside the model's vocabulary (256 bytes + 2 specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < len(alphabet) + 2:
        raise ValueError(f"vocabulary of {vocab_size} is too small for the byte tokenizer ({len(alphabet) + 2} ids)")
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<s>"], vocab["</s>"] = len(alphabet), len(alphabet) + 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def checkpoint_bytes(layout, dtype: torch.dtype) -> int:
    item = torch.empty((), dtype=dtype).element_size()
    return sum(item * _numel(shape) for _, shape in layout)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def make_checkpoint(like: str, out: str | Path, *, layers: int, hidden: int | None = None,
                    intermediate: int | None = None, experts: int | None = None, vocab: int | None = None,
                    dtype: str = "bfloat16", shard_bytes: int = 2 << 30, log=print) -> dict:
    """Write the checkpoint folder `out` (which must not exist or be empty); returns a summary."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes <= 0:
        raise ValueError(f"shard size must be a positive number of bytes, not {shard_bytes!r}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder; choose a new --out")
    cfg = config_object(like, layers=layers, hidden=hidden, intermediate=intermediate, experts=experts, vocab=vocab)
    tdt = DTYPES[dtype]
    cfg.dtype = dtype
    layout = disk_layout(cfg)
    total = checkpoint_bytes(layout, tdt)
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if total + (64 << 20) > free:
        raise ValueError(f"the checkpoint needs {total / 1e9:.2f} GB but {parent} has {free / 1e9:.2f} GB free")
    shards = _plan_shards(layout, tdt, shard_bytes)
    log(f"{like}: {len(layout)} tensors, {total / 1e9:.3f} GB in {dtype}, {len(shards)} shard(s) -> {out}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        from safetensors.torch import save_file

        weight_map, t0, done = {}, time.time(), 0
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {k: _random(k, s, tdt) for k, s in shard}
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            done += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update({k: name for k in tensors})
            del tensors
            rate = done / max(time.time() - t0, 1e-9)
            log(f"  shard {i + 1}/{len(shards)}: {done / 1e9:.2f} of {total / 1e9:.2f} GB, "
                f"ETA {(total - done) / rate:.0f} s")
        (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        cfg.save_pretrained(tmp)
        byte_tokenizer(cfg.vocab_size, getattr(cfg, "eos_token_id", None)).save_pretrained(tmp)
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():            # mkdtemp and safetensors make them private; a checkpoint is not
            f.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"like": like, "folder": str(out), "tensors": len(layout), "bytes": total, "shards": len(shards),
            "seconds": round(time.time() - t0, 1)}


def _plan_shards(layout, dtype, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive tensors up to `shard_bytes` per shard (a larger tensor gets a shard of its own)."""
    item = torch.empty((), dtype=dtype).element_size()
    shards, cur, size = [], [], 0
    for key, shape in layout:
        n = item * _numel(shape)
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((key, shape))
        size += n
    if cur:
        shards.append(cur)
    return shards
