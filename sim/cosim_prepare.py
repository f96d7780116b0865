"""What a co-simulated layer is made of, built outside the simulator: the model's float MoE block,
the hidden states that enter it on real text, and an expert store of its quantized experts with
activation-aware compensators.

Models: "default" is the offline MoEfied SmolLM2 (model/default_moe.py); a path is a local
Hugging Face MoE checkpoint (model/checkpoint.py). Stores are cached under build/cosim/stores,
keyed by the block's weights and the quantization settings, so only the first run of a layer
pays for the calibration pass and the fits.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ndpmoe.host.store import MANIFEST, StoreError, open_store, write_store
from ndpmoe.model.contract import QuantFormat
from ndpmoe.model.integrity import notice
from ndpmoe.model.paths import build_root
from ndpmoe.model.moe import MoEWeights, RouterConfig
from ndpmoe.model.moe_quant import expert_grams, quantize_moe
from ndpmoe.model.perplexity import collect_mlp_inputs
from ndpmoe.model.quantize import get_quantizer
from ndpmoe.model.text import load_text, token_windows, tokenize

SEQ_LEN = 512
CALIB_ROWS = 2048            # calibration rows per layer for the compensator fits
CALIB_TOKENS = 4 * SEQ_LEN


@dataclass(frozen=True)
class QuantSettings:
    bits: int = 3
    group: int = 64
    rank: int = 16
    quantizer: str = "optimized"
    word_bits: int = 128     # the simulated NDP's port

    def fmt(self) -> QuantFormat:
        return QuantFormat(self.bits, self.group, self.word_bits)

    def check(self, cfg) -> None:
        if self.bits not in cfg.bits:
            raise ValueError(f"bits must be one of {cfg.bits} (NDP configuration {cfg.name!r}), not {self.bits!r}")
        self.fmt()
        get_quantizer(self.quantizer)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"rank must be a non-negative integer, not {self.rank!r}")

    def tag(self) -> str:
        return f"int{self.bits}-g{self.group}-p{self.word_bits}-r{self.rank}-{self.quantizer}"


@dataclass
class LoadedModel:
    """A causal LM whose MoE blocks we can read, its token stream and where it came from."""
    model: torch.nn.Module
    blocks: dict[int, tuple[MoEWeights, RouterConfig]]
    calib_ids: torch.Tensor          # 1-D token ids of the calibration text
    eval_ids: torch.Tensor           # 1-D token ids of the held-out text
    source: str
    tokens_note: str


def load_default(layers: list[int]) -> LoadedModel:
    """The default MoE: the whole model (all layers MoEfied) when it is cached, else a reduced
    build that MoEfies only `layers` (earlier layers stay dense; built once, then cached)."""
    from ndpmoe.model.default_moe import DEFAULT_CONFIG, cache_path, load_default_moe

    text = load_text(None)
    whole = cache_path(DEFAULT_CONFIG, text, None).is_file()
    dm = load_default_moe(text=text, layers=None if whole else sorted(set(layers)), progress=False)
    missing = [l for l in layers if l not in dm.blocks]
    if missing:
        raise ValueError(f"layers {missing} are not MoE layers of the default model (it has {sorted(dm.blocks)})")
    which = "all layers MoEfied" if whole else f"MoEfied layers {sorted(dm.blocks)} only"
    return LoadedModel(dm.model, dm.blocks, tokenize(dm.text.calib, dm.tokenizer), tokenize(dm.text.eval, dm.tokenizer),
                       f"default MoE (SmolLM2-135M, {dm.info.get('tag', '?')}, {which})",
                       f"{dm.text.source}, evaluation half, SmolLM2 tokenizer")


def load_checkpoint(path: str, layers: list[int]) -> LoadedModel:
    from ndpmoe.model.checkpoint import load_model, load_tokenizer

    model, ckpt = load_model(path)
    blocks = {}
    for l in layers:
        if l not in ckpt.moe_layers:
            raise ValueError(f"layer {l} is not an MoE layer of {path} (MoE layers: {list(ckpt.moe_layers)})")
        blocks[l] = ckpt.moe_layer(l)
    text = load_text(None)
    vocab = model.config.vocab_size
    try:
        tok = load_tokenizer(path)
        calib, ev, note = tokenize(text.calib, tok), tokenize(text.eval, tok), f"{text.source}, the checkpoint's tokenizer"
    except (OSError, ValueError):
        # A checkpoint without a tokenizer (e.g. a tiny random test model): UTF-8 bytes as ids.
        calib, ev = (torch.tensor(list(t.encode()), dtype=torch.long) % vocab for t in (text.calib, text.eval))
        note = f"{text.source}, UTF-8 bytes mod vocab {vocab} (no tokenizer in {path})"
    return LoadedModel(model, blocks, calib, ev, f"checkpoint {path}", note)


def load(model: str, layers: list[int]) -> LoadedModel:
    if model == "default":
        return load_default(layers)
    if not (Path(model).is_dir() or (model.endswith(".gguf") and Path(model).is_file())):
        raise ValueError(f"--model must be 'default', a checkpoint folder or a .gguf file, not {model!r}")
    return load_checkpoint(model, layers)


def block_digest(w: MoEWeights, cfg: RouterConfig, q: QuantSettings) -> str:
    h = hashlib.sha256(q.tag().encode() + repr(sorted(cfg.__dict__.items())).encode())
    for name in ("router", "w1", "w3", "w2"):
        h.update(getattr(w, name).detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _seq_len(m: LoadedModel) -> int:
    """Context per window: SEQ_LEN, or less for a model with a shorter context (tiny test models)."""
    return min(SEQ_LEN, getattr(m.model.config, "max_position_embeddings", SEQ_LEN) or SEQ_LEN)


def layer_inputs(m: LoadedModel, layers: list[int], tokens: int, seed: int) -> dict[int, torch.Tensor]:
    """Hidden states entering each layer's MoE block at `tokens` positions of the held-out text:
    [tokens, D] per layer (the same positions for every layer)."""
    seq = _seq_len(m)
    windows = token_windows(m.eval_ids, seq)
    need = -(-tokens // seq) + 1
    return collect_mlp_inputs(m.model, windows[:need], max_rows=tokens, seed=seed, layers=layers, progress=False)


def _store_folder(m: LoadedModel, layer: int, q: QuantSettings) -> Path:
    w, rc = m.blocks[layer]
    return build_root("cosim", "stores") / f"L{layer}-{q.tag()}-{block_digest(w, rc, q)}"


def _usable_store(m: LoadedModel, layer: int, q: QuantSettings) -> bool:
    """Whether the cached store of `layer` is exactly what `q` asks for: its source, format, rank
    and shapes, a manifest and tensors that pass their hashes. A store that exists but fails is
    rebuilt, with one line saying why."""
    w, _ = m.blocks[layer]
    folder = _store_folder(m, layer, q)
    try:
        open_store(folder, expect_source=f"{m.source} layer {layer} {q.tag()}", expect_fmt=q.fmt(),
                   expect_rank=q.rank, expect_shape=(w.num_experts, w.hidden, w.intermediate))
        return True
    except StoreError as exc:
        if (folder / MANIFEST).exists():
            notice(f"the cached store of layer {layer} failed its check, rebuilding it: {exc}")
        return False


def layer_store(m: LoadedModel, layer: int, q: QuantSettings, calib: dict[int, torch.Tensor] | None = None) -> Path:
    """The store of `layer`'s quantized experts (built and cached on first use)."""
    return _store_folder(m, layer, q) if _usable_store(m, layer, q) else _build_store(m, layer, q, calib)


def _build_store(m: LoadedModel, layer: int, q: QuantSettings, calib: dict[int, torch.Tensor] | None) -> Path:
    w, rc = m.blocks[layer]
    folder = _store_folder(m, layer, q)
    if calib is None or layer not in calib:
        calib = calibration_inputs(m, [layer])
    grams = expert_grams(w, rc, calib[layer])
    qm = quantize_moe(w, rc, q.fmt(), quantizer=get_quantizer(q.quantizer), rank=q.rank, fit="aware", grams=grams)
    write_store(folder, [qm], source=f"{m.source} layer {layer} {q.tag()}", grams=[grams])
    return folder


def calibration_inputs(m: LoadedModel, layers: list[int]) -> dict[int, torch.Tensor]:
    seq = _seq_len(m)
    windows = token_windows(m.calib_ids, seq, max(CALIB_TOKENS // seq, 1) * seq)
    return collect_mlp_inputs(m.model, windows, max_rows=CALIB_ROWS, layers=layers, progress=False)


def stores(m: LoadedModel, layers: list[int], q: QuantSettings) -> dict[int, Path]:
    """Stores of several layers, sharing one calibration pass for those not cached yet."""
    todo = [l for l in layers if not _usable_store(m, l, q)]
    calib = calibration_inputs(m, todo) if todo else None
    built = {l: _build_store(m, l, q, calib) for l in todo}
    return {l: built.get(l) or _store_folder(m, l, q) for l in layers}
