"""Paired confidence intervals for perplexity comparisons on the same evaluation tokens.

Two configurations evaluated on the same text make the same predictions' NLLs comparable token by
token, so the noise that matters is the spread of their *difference*, far smaller than either
perplexity's own spread. Method (a paired moving-block bootstrap, Künsch 1989):
- the evaluation's per-prediction NLLs, in text order, are cut into `units` contiguous blocks of
  equal length (the tail that does not fill a block is dropped from the resampling, never from the
  point estimate); contiguous blocks keep the dependence between neighbouring tokens inside a unit;
- each resample draws `units` blocks with replacement, the SAME blocks for both configurations,
  and computes ppl_a* - ppl_b* = exp(mean NLL_a*) - exp(mean NLL_b*);
- the interval is the percentile interval of those differences (2.5 % and 97.5 % for 95 %).
A verdict is "wins" (a lower perplexity) or "loses" only when the interval excludes zero, else
"tie". A configuration against itself gives exactly [0, 0]: a tie.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

MIN_UNITS = 30             # fewer resampling units than this make percentile intervals unreliable
DEFAULT_UNITS = 64
DEFAULT_RESAMPLES = 2000
VERDICTS = ("wins", "loses", "tie")


@dataclass(frozen=True)
class PairedInterval:
    """ppl_a - ppl_b with its paired bootstrap interval (negative: a has the lower perplexity)."""
    diff: float
    low: float
    high: float
    level: float
    units: int
    unit_tokens: int
    resamples: int

    @property
    def verdict(self) -> str:
        """For a against b: 'wins' when the whole interval is below zero, 'loses' above, else 'tie'."""
        if self.high < 0:
            return "wins"
        if self.low > 0:
            return "loses"
        return "tie"

    def describe(self) -> str:
        return f"{self.diff:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"

    def to_json(self) -> dict:
        return asdict(self) | {"verdict": self.verdict}


def flat_nll(token_nll) -> torch.Tensor:
    """Per-prediction NLLs as one float64 vector, windows in evaluation order."""
    if isinstance(token_nll, torch.Tensor):
        return token_nll.reshape(-1).double()
    return torch.cat([torch.as_tensor(t).reshape(-1).double() for t in token_nll])


def paired_bootstrap(nll_a, nll_b, *, units: int = DEFAULT_UNITS, resamples: int = DEFAULT_RESAMPLES,
                     level: float = 0.95, seed: int = 0) -> PairedInterval:
    """Interval of ppl_a - ppl_b from per-prediction NLLs of the same tokens (see the module text)."""
    return paired_contrast([nll_a, nll_b], [1.0, -1.0], units=units, resamples=resamples, level=level, seed=seed)


def paired_contrast(nlls: list, coeffs: list[float], *, units: int = DEFAULT_UNITS,
                    resamples: int = DEFAULT_RESAMPLES, level: float = 0.95, seed: int = 0) -> PairedInterval:
    """Interval of sum_i coeffs[i] * ppl_i over configurations evaluated on the same tokens, with the
    same resampled blocks for all of them (e.g. a point against a chord between two others:
    coeffs (1, -(1 - t), -t)). Negative: the first term is below the rest."""
    if len(nlls) != len(coeffs) or len(nlls) < 2:
        raise ValueError(f"a contrast needs at least two configurations with one coefficient each, "
                         f"not {len(nlls)} NLL sets and {len(coeffs)} coefficients")
    flat = [flat_nll(n) for n in nlls]
    a = flat[0]
    for b in flat[1:]:
        if a.shape != b.shape:
            raise ValueError(f"paired NLLs must cover the same tokens: {a.numel()} against {b.numel()} predictions")
    if isinstance(units, bool) or not isinstance(units, int) or units < MIN_UNITS:
        raise ValueError(f"units must be an integer >= {MIN_UNITS}, not {units!r}")
    if a.numel() < units:
        raise ValueError(f"{a.numel()} predictions cannot make {units} resampling units; evaluate at least "
                         f"{units} tokens or ask for fewer units (>= {MIN_UNITS})")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 100:
        raise ValueError(f"resamples must be an integer >= 100, not {resamples!r}")
    if not 0.5 <= level < 1:
        raise ValueError(f"level must be in [0.5, 1), not {level!r}")
    if not all(torch.isfinite(f).all() for f in flat):
        raise ValueError("per-token NLLs contain NaN or Inf")
    diff = sum(c * math.exp(float(f.mean())) for c, f in zip(coeffs, flat))
    unit_tokens = a.numel() // units
    used = units * unit_tokens
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(units, (resamples, units), generator=gen)
    star = sum(c * f[:used].reshape(units, unit_tokens).mean(1)[pick].mean(1).exp() for c, f in zip(coeffs, flat))
    tail = (1 - level) / 2
    low, high = torch.quantile(star, torch.tensor([tail, 1 - tail], dtype=star.dtype)).tolist()
    return PairedInterval(diff, low, high, level, units, unit_tokens, resamples)
