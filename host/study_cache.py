"""On-disk cache of the study's quantized experts and compensators, one file per layer and part.

Quantizing and fitting 30 layers takes minutes and every study run needs the same ones, so a part
(the low-bit matrices of one (bits, quantizer, format), or the compensators of one fit and rank on
top of them) is stored under a key that changes with anything it depends on: the layer's weights,
the calibration the quantizer and fit saw, the part's parameters, and the code that computes it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ndpmoe.model.compensate import LowRank
from ndpmoe.model.errors import CacheEntryError
from ndpmoe.model.integrity import (clean_stale_temps, code_digest, notice, read_sealed, tensor_hash,
                                    writable_folder, write_sealed)
from ndpmoe.model.moe_quant import MATRICES
from ndpmoe.model.qtensor import QuantizedMatrix

__all__ = ["StudyCache", "model_fingerprint", "tensor_hash"]

KIND = "ndpmoe-study-part"
# The code a cached part is computed by: an edit to any of these invalidates every entry.
_CODE = ("model/quantize.py", "model/compensate.py", "model/factor_quant.py", "model/moe_quant.py", "model/qtensor.py",
         "model/packing.py", "model/contract.py", "model/integrity.py", "host/study_cache.py")


def _code_hash() -> str:
    return code_digest(_CODE)


def _fmt_meta(fmt) -> dict:
    return {"bits": fmt.bits, "group_size": fmt.group_size, "word_bits": fmt.word_bits}


class StudyCache:
    """Parts of quantized layers under `root`; `context` is what every entry depends on (the
    model and the calibration), `None` as root turns caching off.

    Each entry is a sealed file (model/integrity.py) that records its key and format: one that
    fails its content hash or holds another key or format is recomputed and rewritten, with one
    line saying so. A cache folder that cannot be written is read, and new parts are not stored."""

    def __init__(self, root: Path | None, context: str):
        self.root = None if root is None else Path(root)
        self._context = f"{context}|{_code_hash()}"
        self.hits = 0
        self.misses = 0
        self.rebuilt = 0
        self._writable = self.root is not None and writable_folder(self.root)
        if self.root is not None:
            clean_stale_temps(self.root)
            if not self._writable:
                notice(f"study cache {self.root} is not writable: existing entries are read, new ones are not stored")

    def key(self, layer: int, part: str) -> str:
        return hashlib.sha256(f"{self._context}|{layer}|{part}".encode()).hexdigest()[:32]

    # -- low-bit matrices ------------------------------------------------------------------------
    def quantized(self, key: str, fmt, make) -> list[dict[str, QuantizedMatrix]]:
        """Per expert {matrix: QuantizedMatrix} in `fmt`, loaded or made by `make()` and stored."""
        raw = self._load(key, {"part": "quantized", "format": _fmt_meta(fmt)})
        if raw is not None:
            return [{m: QuantizedMatrix(fmt, raw[f"{e}.{m}.codes"], raw[f"{e}.{m}.scale"], raw[f"{e}.{m}.zero"],
                                        int(raw[f"{e}.{m}.exp"])) for m in MATRICES} for e in range(int(raw["experts"]))]
        qs = make()
        flat = {"experts": torch.tensor(len(qs))}
        for e, q in enumerate(qs):
            for m in MATRICES:
                flat.update({f"{e}.{m}.codes": q[m].codes, f"{e}.{m}.scale": q[m].scale, f"{e}.{m}.zero": q[m].zero,
                             f"{e}.{m}.exp": torch.tensor(q[m].scale_exp)})
        self._store(key, flat, {"part": "quantized", "format": _fmt_meta(fmt)})
        return qs

    # -- compensators ----------------------------------------------------------------------------
    def compensators(self, key: str, make) -> list[dict[str, LowRank]]:
        """Per expert {matrix: LowRank} (matrices without one are absent)."""
        raw = self._load(key, {"part": "compensators"})
        if raw is not None:
            return [{m: LowRank(raw[f"{e}.{m}.A"], raw[f"{e}.{m}.B"], raw[f"{e}.{m}.spectrum"])
                     for m in MATRICES if f"{e}.{m}.A" in raw} for e in range(int(raw["experts"]))]
        comps = make()
        flat = {"experts": torch.tensor(len(comps))}
        for e, comp in enumerate(comps):
            for m, f in comp.items():
                flat.update({f"{e}.{m}.A": f.A, f"{e}.{m}.B": f.B, f"{e}.{m}.spectrum": f.spectrum})
        self._store(key, flat, {"part": "compensators"})
        return comps

    # -- files -------------------------------------------------------------------------------------
    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def _load(self, key: str, expect: dict) -> dict | None:
        if self.root is None or not self.path(key).exists():
            self.misses += 1
            return None
        try:
            raw, _ = read_sealed(self.path(key), KIND, {"key": key, **expect})
            self._check_consistent(self.path(key), raw)
        except CacheEntryError as exc:       # recomputed and rewritten, never used
            notice(f"study cache entry failed its check, recomputing it: {exc}")
            self.misses += 1
            self.rebuilt += 1
            return None
        self.hits += 1
        return raw

    @staticmethod
    def _check_consistent(path: Path, raw: dict) -> None:
        if "experts" not in raw or raw["experts"].numel() != 1:
            raise CacheEntryError(f"{path}: no expert count")
        for e in range(int(raw["experts"])):
            if not any(k.startswith(f"{e}.") for k in raw):
                raise CacheEntryError(f"{path}: expert {e} is missing")

    def _store(self, key: str, flat: dict, meta: dict) -> None:
        if self.root is None or not self._writable:
            return
        try:
            write_sealed(self.path(key), flat, KIND, {"key": key, **meta})
        except OSError as exc:               # full or read-only: the study goes on without storing
            self._writable = False
            notice(f"study cache {self.root}: could not store an entry ({exc}); new entries are not stored")


def model_fingerprint(model, blocks: dict, extra: str = "") -> str:
    """What a layer's calibration inputs depend on: every MoE block's weights in full, the rest of
    the model's parameters by name, shape and a strided sample (cheap, and any real edit shows)."""
    h = hashlib.sha256(extra.encode())
    for layer in sorted(blocks):
        w, cfg = blocks[layer]
        h.update(f"{layer}|{cfg}".encode())
        tensor_hash(h, w.router, w.w1, w.w3, w.w2, w.shared_w1, w.shared_w3, w.shared_w2, w.shared_gate)
    for name, p in model.named_parameters():
        if ".mlp." in name:
            continue
        h.update(name.encode())
        tensor_hash(h, p.detach().flatten()[::997])
    return h.hexdigest()[:32]
