"""On-disk cache of the study's quantized experts and compensators, one file per layer and part.

Quantizing and fitting 30 layers takes minutes and every study run needs the same ones, so a part
(the low-bit matrices of one (bits, quantizer, format), or the compensators of one fit and rank on
top of them) is stored under a key that changes with anything it depends on: the layer's weights,
the calibration the quantizer and fit saw, the part's parameters, and the code that computes it.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from ndpmoe.model.compensate import LowRank
from ndpmoe.model.moe_quant import MATRICES
from ndpmoe.model.qtensor import QuantizedMatrix

# The code a cached part is computed by: an edit to any of these invalidates every entry.
_CODE = ("model/quantize.py", "model/compensate.py", "model/moe_quant.py", "model/qtensor.py",
         "model/packing.py", "model/contract.py", "host/study_cache.py")


def _code_hash() -> str:
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for rel in _CODE:
        h.update((root / rel).read_bytes())
    return h.hexdigest()[:16]


def tensor_hash(h, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        flat = t.new_empty(t.numel()).copy_(t.reshape(-1))      # packed, whatever the view's strides
        h.update(flat.view(torch.uint8).numpy().tobytes())


class StudyCache:
    """Parts of quantized layers under `root`; `context` is what every entry depends on (the
    model and the calibration), `None` as root turns caching off."""

    def __init__(self, root: Path | None, context: str):
        self.root = None if root is None else Path(root)
        self._context = f"{context}|{_code_hash()}"
        self.hits = 0
        self.misses = 0

    def key(self, layer: int, part: str) -> str:
        return hashlib.sha256(f"{self._context}|{layer}|{part}".encode()).hexdigest()[:32]

    # -- low-bit matrices ------------------------------------------------------------------------
    def quantized(self, key: str, fmt, make) -> list[dict[str, QuantizedMatrix]]:
        """Per expert {matrix: QuantizedMatrix} in `fmt`, loaded or made by `make()` and stored."""
        raw = self._load(key)
        if raw is not None:
            return [{m: QuantizedMatrix(fmt, raw[f"{e}.{m}.codes"], raw[f"{e}.{m}.scale"], raw[f"{e}.{m}.zero"],
                                        int(raw[f"{e}.{m}.exp"])) for m in MATRICES} for e in range(int(raw["experts"]))]
        qs = make()
        flat = {"experts": torch.tensor(len(qs))}
        for e, q in enumerate(qs):
            for m in MATRICES:
                flat.update({f"{e}.{m}.codes": q[m].codes, f"{e}.{m}.scale": q[m].scale, f"{e}.{m}.zero": q[m].zero,
                             f"{e}.{m}.exp": torch.tensor(q[m].scale_exp)})
        self._store(key, flat)
        return qs

    # -- compensators ----------------------------------------------------------------------------
    def compensators(self, key: str, make) -> list[dict[str, LowRank]]:
        """Per expert {matrix: LowRank} (matrices without one are absent)."""
        raw = self._load(key)
        if raw is not None:
            return [{m: LowRank(raw[f"{e}.{m}.A"], raw[f"{e}.{m}.B"], raw[f"{e}.{m}.spectrum"])
                     for m in MATRICES if f"{e}.{m}.A" in raw} for e in range(int(raw["experts"]))]
        comps = make()
        flat = {"experts": torch.tensor(len(comps))}
        for e, comp in enumerate(comps):
            for m, f in comp.items():
                flat.update({f"{e}.{m}.A": f.A, f"{e}.{m}.B": f.B, f"{e}.{m}.spectrum": f.spectrum})
        self._store(key, flat)
        return comps

    # -- files -------------------------------------------------------------------------------------
    def _path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def _load(self, key: str) -> dict | None:
        if self.root is None or not self._path(key).exists():
            self.misses += 1
            return None
        try:
            raw = torch.load(self._path(key), weights_only=True)
        except Exception:            # a torn or foreign file is recomputed, never trusted
            self.misses += 1
            return None
        self.hits += 1
        return raw

    def _store(self, key: str, flat: dict) -> None:
        if self.root is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        os.close(fd)
        try:
            torch.save(flat, tmp)
            os.replace(tmp, self._path(key))      # atomic: a reader sees the old file or the new one
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


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
