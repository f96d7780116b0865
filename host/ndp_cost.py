"""Cycles of the NDP unit per descriptor: the one place the runtime's NDP cost comes from.

A MATMUL costs `overhead_cycles + cycles_per_word * beats` cycles with
`beats = once_words + (words - once_words) * passes` (contract.Descriptor's words, once_words,
passes and beats: the port words it reads, the passes the datapath makes over each code word, as
it multiplies tokens_parallel tokens per cycle, and the words that take one beat whatever the
passes, metadata and 3-bit hi-plane words; a caller passing once_words 0 counts every word once
per pass, an upper bound). A LOAD_ACT costs `load_overhead_cycles + cycles_per_word * words`
(`load_cycles`; the MATMUL overhead when None). `cycles` prices a Descriptor.

RTL_TARGET holds the RTL's DESIGN TARGETS (1 port word per cycle while streaming, at most 64
cycles of fixed overhead per descriptor), not measurements. RTL_COSIM is `fit_ndp_cost` over the
co-simulated descriptors of whole layers of the default model (sim/cost_calibration.py, `ndpmoe
cosim --calibrate`), with the error it reached on held-out layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, NamedTuple

import numpy as np

from ndpmoe.model.contract import Descriptor, NdpConfig, Opcode

# --- RTL design targets, to be replaced by the fit of measured cycles -------------------------
RTL_TARGET_CYCLES_PER_WORD = 1.0
RTL_TARGET_OVERHEAD_CYCLES = 64.0
RTL_TARGET_SOURCE = "RTL design target (1 word/cycle, 64 cycles/descriptor), not measured"


@dataclass(frozen=True)
class NdpCostModel:
    """Cycles of one descriptor from the words it reads and the passes over them."""
    cycles_per_word: float = RTL_TARGET_CYCLES_PER_WORD     # per word per pass
    overhead_cycles: float = RTL_TARGET_OVERHEAD_CYCLES     # per MATMUL (and LOAD_ACT, see below)
    source: str = RTL_TARGET_SOURCE
    load_overhead_cycles: float | None = None               # per LOAD_ACT; None: overhead_cycles

    def __post_init__(self):
        for name in ("cycles_per_word", "overhead_cycles", "load_overhead_cycles"):
            v = getattr(self, name)
            if v is None and name == "load_overhead_cycles":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite non-negative number, not {v!r}")

    def descriptor_cycles(self, words: int, passes: int = 1, once_words: int = 0) -> float:
        """A MATMUL (or, with the defaults, any descriptor streaming `words` once)."""
        return self.overhead_cycles + self.cycles_per_word * (once_words + (words - once_words) * passes)

    def load_cycles(self, words: int) -> float:
        """A LOAD_ACT of `words` port words."""
        overhead = self.overhead_cycles if self.load_overhead_cycles is None else self.load_overhead_cycles
        return overhead + self.cycles_per_word * words

    def cycles(self, d: Descriptor, cfg: NdpConfig, units: int = 1) -> float:
        """Cycles of an accepted descriptor on `units` units working together: a MATMUL's rows
        are split over them (each reads words / units), a LOAD_ACT is broadcast (each reads all)."""
        if d.opcode == Opcode.LOAD_ACT:
            return self.load_cycles(d.words(cfg))
        return self.descriptor_cycles(-(-d.words(cfg) // units), d.passes(cfg), -(-d.once_words(cfg) // units))

    @property
    def measured(self) -> bool:
        return self.source != RTL_TARGET_SOURCE


# The calibration protocol (`ndpmoe cosim --calibrate`): layers and token counts co-simulated.
CALIB_LAYERS = (3, 12, 24)
CALIB_TOKENS = (1, 4, 16, 32)

RTL_TARGET = NdpCostModel()

# `ndpmoe cosim --calibrate` (sim/cost_calibration.py): fitted on every descriptor of layer 3 of the
# default model at 1, 4, 16 and 32 tokens (NDP 'default', 128-bit port, tokens_parallel 2, memory
# always ready); that command prints its error on the held-out layers 12 and 24 (the README's
# co-simulation figures). The MATMUL overhead here is a fit's intercept over those small experts;
# the overhead of one long descriptor is what `ndpmoe sim --bench` measures (the README's NDP unit
# figures), and the one figure the docstrings refer to.
RTL_COSIM = NdpCostModel(cycles_per_word=1.0059, overhead_cycles=55.90, load_overhead_cycles=36.51,
                         source="fit to the co-simulated RTL ('default' configuration, default model, "
                                "sim/cost_calibration.py)")


class CycleSample(NamedTuple):
    """One co-simulated descriptor: what it read and how long it was busy."""
    words: int
    passes: int
    cycles: float
    once_words: int = 0
    load: bool = False          # a LOAD_ACT (its own overhead) rather than a MATMUL


def _samples(samples) -> list[CycleSample]:
    out = []
    for s in samples:
        if not 3 <= len(s) <= 5:
            raise ValueError(f"a sample is (words, passes, cycles[, once_words[, load]]), not {s!r}")
        out.append(CycleSample(*s))
    return out


def fit_ndp_cost(samples: Iterable[tuple], source: str = "measured") -> NdpCostModel:
    """Least-squares fit of per-descriptor samples (CycleSample or plain tuples
    (words, passes, cycles[, once_words[, load]])), e.g. from co-simulation: cycles per beat, the
    MATMUL overhead and, when LOAD_ACT samples are among them, the LOAD_ACT overhead. Negative
    coefficients are clipped to 0."""
    data = _samples(samples)
    if len(data) < 2:
        raise ValueError(f"need at least two (words, passes, cycles) samples, got {len(data)}")
    beats = np.array([s.once_words + (s.words - s.once_words) * s.passes for s in data], dtype=np.float64)
    load = np.array([s.load for s in data], dtype=np.float64)
    cycles = np.array([s.cycles for s in data], dtype=np.float64)
    both = 0 < load.sum() < len(data)
    cols = [1.0 - load, load, beats] if both else [np.ones_like(beats), beats]
    design = np.stack(cols, axis=1)
    if np.linalg.matrix_rank(design) < design.shape[1]:
        raise ValueError("samples must span at least two different words x passes (per descriptor kind) to fit a slope")
    coef, *_ = np.linalg.lstsq(design, cycles, rcond=None)
    coef = np.maximum(coef, 0.0)
    if both:
        return NdpCostModel(float(coef[2]), float(coef[0]), source, load_overhead_cycles=float(coef[1]))
    return NdpCostModel(float(coef[1]), float(coef[0]), source)


def sample_cycles(model: NdpCostModel, s: CycleSample) -> float:
    return model.load_cycles(s.words) if s.load else model.descriptor_cycles(s.words, s.passes, s.once_words)


def relative_error(model: NdpCostModel, samples: Iterable[tuple]) -> float:
    """Largest |modeled - measured| / measured over per-descriptor samples (the co-sim's 5 % goal)."""
    return max((abs(sample_cycles(model, s) - s.cycles) / max(s.cycles, 1e-12) for s in _samples(samples)),
               default=0.0)
