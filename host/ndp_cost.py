"""Cycles of the NDP unit per descriptor: the one place the runtime's NDP cost comes from.

A descriptor costs `overhead_cycles + cycles_per_word * words + cycles_per_token_word * words *
tokens` cycles, where `words` is the port words it reads (contract sizes). The constants below are
the RTL's DESIGN TARGETS (1 port word per cycle while streaming, at most 64 cycles of fixed
overhead per descriptor), NOT measurements: replace them with `fit_ndp_cost(...)` over the
co-simulated (words, tokens, cycles) of each descriptor once the RTL runs (issue 6).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

# --- RTL design targets, to be replaced by the fit of measured cycles -------------------------
RTL_TARGET_CYCLES_PER_WORD = 1.0
RTL_TARGET_OVERHEAD_CYCLES = 64.0
RTL_TARGET_SOURCE = "RTL design target (1 word/cycle, 64 cycles/descriptor), not measured"


@dataclass(frozen=True)
class NdpCostModel:
    """Cycles of one descriptor from the words it reads (and, optionally, its token count)."""
    cycles_per_word: float = RTL_TARGET_CYCLES_PER_WORD
    overhead_cycles: float = RTL_TARGET_OVERHEAD_CYCLES
    cycles_per_token_word: float = 0.0
    source: str = RTL_TARGET_SOURCE

    def __post_init__(self):
        for name in ("cycles_per_word", "overhead_cycles", "cycles_per_token_word"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite non-negative number, not {v!r}")

    def descriptor_cycles(self, words: int, tokens: int = 1) -> float:
        return self.overhead_cycles + words * (self.cycles_per_word + self.cycles_per_token_word * tokens)

    @property
    def measured(self) -> bool:
        return self.source != RTL_TARGET_SOURCE


RTL_TARGET = NdpCostModel()


def fit_ndp_cost(samples: Iterable[tuple[int, int, float]], source: str = "measured") -> NdpCostModel:
    """Least-squares fit of (words, tokens, cycles) per descriptor, e.g. from co-simulation.

    The token term is fitted only when the samples vary in tokens*words independently of words
    (otherwise it is not identifiable and stays 0). Negative coefficients are clipped to 0.
    """
    data = np.asarray(list(samples), dtype=np.float64)
    if data.ndim != 2 or data.shape[1] != 3 or data.shape[0] < 2:
        raise ValueError(f"need at least two (words, tokens, cycles) samples, got array of shape {data.shape}")
    words, tokens, cycles = data.T
    cols = [np.ones_like(words), words, words * tokens]
    design = np.stack(cols, axis=1)
    if np.linalg.matrix_rank(design) < 3:
        design = design[:, :2]
    coef, *_ = np.linalg.lstsq(design, cycles, rcond=None)
    coef = np.clip(coef, 0.0, None)
    token_term = float(coef[2]) if len(coef) == 3 else 0.0
    return NdpCostModel(cycles_per_word=float(coef[1]), overhead_cycles=float(coef[0]),
                        cycles_per_token_word=token_term, source=source)


def relative_error(model: NdpCostModel, samples: Iterable[tuple[int, int, float]]) -> float:
    """Largest |modeled - measured| / measured over the samples (the co-sim's 5 % goal)."""
    worst = 0.0
    for words, tokens, cycles in samples:
        worst = max(worst, abs(model.descriptor_cycles(words, tokens) - cycles) / max(cycles, 1e-12))
    return worst
