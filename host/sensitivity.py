"""Measured sensitivity of each expert: how much of its quantization error a rank-r compensator
or a higher-precision copy removes. Budgeted restoration policies buy gain per byte from it.

Gains are in the compensator's own objective: ||(W - Q(W)) L||_F^2 with L the whitening factor of
the calibration Gram matrix (activation-aware fits), or the plain Frobenius norm without
calibration (SVD fits). `LowRank.spectrum` is exactly the reduction per component in that
objective, so rank_gain is its prefix sum; the three matrices' gains are summed (an
approximation: w1/w3 and w2 errors reach the output through different paths).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from ndpmoe.model.compensate import whitening_factor
from ndpmoe.model.moe_quant import MATRICES, QuantizedMoE


@dataclass(frozen=True, eq=False)
class LayerSensitivity:
    """rank_gain [E, R + 1]: objective reduction at rank r = 0..R (non-decreasing, concave);
    hi_gain [E]: reduction from using the higher-precision copy instead (0 when there is none)."""
    rank_gain: torch.Tensor
    hi_gain: torch.Tensor
    source: str

    def __post_init__(self):
        if self.rank_gain.dim() != 2 or self.hi_gain.shape != (self.rank_gain.shape[0],):
            raise ValueError(f"rank_gain must be [E, R + 1] and hi_gain [E], not "
                             f"{tuple(self.rank_gain.shape)} and {tuple(self.hi_gain.shape)}")

    @property
    def num_experts(self) -> int:
        return self.rank_gain.shape[0]

    @property
    def max_rank(self) -> int:
        return self.rank_gain.shape[1] - 1

    @cached_property
    def rank_gain_rows(self) -> list[list[float]]:
        """rank_gain as Python lists: the planner reads a few entries per expert per layer."""
        return self.rank_gain.double().tolist()

    @cached_property
    def hi_gain_list(self) -> list[float]:
        return self.hi_gain.double().tolist()


def _objective(err: torch.Tensor, whiten: torch.Tensor | None) -> float:
    e = err.double()
    return float((e @ whiten).square().sum()) if whiten is not None else float(e.square().sum())


def measure_sensitivity(qm: QuantizedMoE, grams: list[dict[str, torch.Tensor]] | None = None,
                        source: str = "measured") -> LayerSensitivity:
    """Gains of every expert of a quantized block (pass the calibration `grams` the compensators
    were fitted with, so gains and spectra are in the same units)."""
    ranks = [ex.stored_rank(m) for ex in qm.experts for m in MATRICES]
    r_max = max(ranks, default=0)
    rank_gain = torch.zeros(qm.num_experts, r_max + 1, dtype=torch.float64)
    hi_gain = torch.zeros(qm.num_experts, dtype=torch.float64)
    for e, ex in enumerate(qm.experts):
        for m in MATRICES:
            if m in ex.comp:
                spec = ex.comp[m].spectrum.double()
                curve = torch.cat([torch.zeros(1, dtype=torch.float64), spec.cumsum(0)])
                rank_gain[e, :curve.numel()] += curve
                rank_gain[e, curve.numel():] += curve[-1]
            if qm.hi_experts is not None:
                w = getattr(qm.float_weights, m)[e].float()
                whiten = whitening_factor(grams[e][m]) if grams is not None else None
                lo = _objective(w - ex.weight(m), whiten)
                hi = _objective(w - qm.hi_experts[e].weight(m), whiten)
                hi_gain[e] += max(lo - hi, 0.0)
    return LayerSensitivity(rank_gain, hi_gain, source)


def assumed_sensitivity(num_experts: int, rank: int, decay: float = 0.5, rank_share: float = 0.5,
                        hi_share: float = 0.9) -> LayerSensitivity:
    """A stand-in where no weights are loaded (the bench's large models): spectrum ~ (i+1)^-decay,
    scaled so rank R removes `rank_share` and the higher-precision copy `hi_share` of each expert's
    error. Only the *choices* of a budgeted policy depend on it, never its bytes."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be a non-negative integer, not {rank!r}")
    spec = (torch.arange(rank, dtype=torch.float64) + 1) ** -decay
    curve = torch.cat([torch.zeros(1, dtype=torch.float64), spec.cumsum(0)])
    curve = curve / curve[-1].clamp_min(1e-30) * rank_share
    return LayerSensitivity(curve.expand(num_experts, -1).clone(),
                            torch.full((num_experts,), hi_share, dtype=torch.float64),
                            f"assumed profile (spectrum ~ (i+1)^-{decay}, rank {rank} removes "
                            f"{rank_share:.0%}, hi copy {hi_share:.0%} of the error)")
