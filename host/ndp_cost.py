"""Cycles of the NDP unit per descriptor: the one place the runtime's NDP cost comes from.

A descriptor costs `overhead_cycles + cycles_per_word * words * passes` cycles, where `words` is
the port words it reads (contract sizes) and `passes` is how often the datapath goes over each
word: NdpConfig.passes(tokens) for a MATMUL (it multiplies tokens_parallel tokens per cycle), 1
for a LOAD_ACT. The constants below are
the RTL's DESIGN TARGETS (1 port word per cycle while streaming, at most 64 cycles of fixed
overhead per descriptor), NOT measurements: replace them with `fit_ndp_cost(...)` over the
co-simulated (words, passes, cycles) of each descriptor once the RTL runs (issue 6).
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
    """Cycles of one descriptor from the words it reads and the passes over them."""
    cycles_per_word: float = RTL_TARGET_CYCLES_PER_WORD     # per word per pass
    overhead_cycles: float = RTL_TARGET_OVERHEAD_CYCLES
    source: str = RTL_TARGET_SOURCE

    def __post_init__(self):
        for name in ("cycles_per_word", "overhead_cycles"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite non-negative number, not {v!r}")

    def descriptor_cycles(self, words: int, passes: int = 1) -> float:
        return self.overhead_cycles + self.cycles_per_word * words * passes

    @property
    def measured(self) -> bool:
        return self.source != RTL_TARGET_SOURCE


RTL_TARGET = NdpCostModel()


def fit_ndp_cost(samples: Iterable[tuple[int, int, float]], source: str = "measured") -> NdpCostModel:
    """Least-squares fit of (words, passes, cycles) per descriptor, e.g. from co-simulation.
    Negative coefficients are clipped to 0."""
    data = np.asarray(list(samples), dtype=np.float64)
    if data.ndim != 2 or data.shape[1] != 3 or data.shape[0] < 2:
        raise ValueError(f"need at least two (words, passes, cycles) samples, got array of shape {data.shape}")
    words, passes, cycles = data.T
    design = np.stack([np.ones_like(words), words * passes], axis=1)
    if np.linalg.matrix_rank(design) < 2:
        raise ValueError("samples must span at least two different words x passes to fit a slope")
    (overhead, per_word), *_ = np.linalg.lstsq(design, cycles, rcond=None)
    return NdpCostModel(cycles_per_word=float(max(per_word, 0.0)), overhead_cycles=float(max(overhead, 0.0)),
                        source=source)


def relative_error(model: NdpCostModel, samples: Iterable[tuple[int, int, float]]) -> float:
    """Largest |modeled - measured| / measured over (words, passes, cycles) samples (the co-sim's
    5 % goal)."""
    worst = 0.0
    for words, passes, cycles in samples:
        worst = max(worst, abs(model.descriptor_cycles(words, passes) - cycles) / max(cycles, 1e-12))
    return worst
