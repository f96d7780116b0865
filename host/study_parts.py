"""One layer's study parts computed on stacks of experts: its low-bit matrices for one (bits,
quantizer, format), or its compensators for one fit and rank. The study computes its parts with
them (host/study.py), in this process or as Ray tasks. In float64 these are, bit for bit, what the
one-expert-at-a-time reference computes (model.moe_quant.quantize_moe and compensate_moe:
tests/test_study_workers.py holds it), so cached parts do not depend on which path made them.

Gram matrices are stacked a chunk of experts at a time, and each whitening factor is computed
once per Gram matrix (w1 and w3 share theirs), so memory stays near one chunk of one layer; in
float32 the large activation-aware fits work from the Gram matrices and need no whitening.
"""
from __future__ import annotations

import torch

from ndpmoe.model.compensate import LowRank, _krylov_is_cheaper, fit_activation_aware_stack, fit_svd_stack, whitening_factor
from ndpmoe.model.contract import QuantFormat
from ndpmoe.model.moe import MoEWeights
from ndpmoe.model.moe_quant import MATRICES
from ndpmoe.model.qtensor import QuantizedMatrix
from ndpmoe.model.quantize import CPU_CHUNK_ELEMENTS, quantize_stack


def _chunks(n: int, rows: int, cols: int):
    step = max(1, CPU_CHUNK_ELEMENTS // (rows * cols))
    return [range(i, min(n, i + step)) for i in range(0, n, step)]


def quantized_part(w: MoEWeights, grams: list[dict] | None, fmt: QuantFormat, quantizer: str,
                   precision: str = "float64", device=None) -> list[dict[str, QuantizedMatrix]]:
    """Per expert {matrix: QuantizedMatrix}, as Study._quantized stores them."""
    out = [{} for _ in range(w.num_experts)]
    for m in MATRICES:
        ws = getattr(w, m)
        for part in _chunks(ws.shape[0], ws.shape[1], ws.shape[2]):
            h = None
            if quantizer == "optimized":
                if grams is None:
                    raise ValueError("the activation-aware quantizer needs calibration statistics (grams)")
                # float32 reads the Gram matrices in float32 only: stack them so (half the copy)
                h = torch.stack([grams[e][m].float() if precision == "float32" else grams[e][m] for e in part])
            qs = quantize_stack(ws[part.start:part.stop].float(), fmt, quantizer, h, precision=precision, device=device)
            for e, q in zip(part, qs):
                out[e][m] = q
    return out


def compensator_part(w: MoEWeights, quantized: list[dict[str, QuantizedMatrix]], grams: list[dict] | None,
                     fit: str, rank: int, precision: str = "float64", device=None) -> list[dict[str, LowRank]]:
    """Per expert {matrix: LowRank} of `rank` fitted to the quantization error, as Study._compensated stores them."""
    if fit not in ("aware", "svd"):
        raise ValueError(f"fit must be 'aware' or 'svd', not {fit!r}")
    if fit == "aware" and grams is None:
        raise ValueError("activation-aware compensation needs calibration statistics (grams)")
    out = [{} for _ in range(w.num_experts)]
    for group in (("w1", "w3"), ("w2",)):
        first = getattr(w, group[0])
        for part in _chunks(first.shape[0], first.shape[1], first.shape[2]):
            whiten = {}                          # matrix -> whitening factors of this chunk
            for m in group:
                err = torch.stack([getattr(w, m)[e].float() - quantized[e][m].dequantize() for e in part])
                if fit == "svd":
                    fits = fit_svd_stack(err, rank, precision=precision, device=device)
                elif precision == "float32" and _krylov_is_cheaper(*err.shape[1:], rank):   # no whitening needed
                    h = torch.stack([grams[e][m] for e in part])
                    fits = fit_activation_aware_stack(err, h, rank, precision=precision, device=device)
                else:
                    shared = m != group[0] and all(grams[e][m] is grams[e][group[0]] for e in part)
                    whiten[m] = whiten[group[0]] if shared else torch.stack(
                        [whitening_factor(grams[e][m].to(device) if device is not None else grams[e][m]) for e in part])
                    fits = fit_activation_aware_stack(err, None, rank, whiten=whiten[m], precision=precision,
                                                      device=device)
                for e, f in zip(part, fits):
                    out[e][m] = f
    return out
