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

The held-out layer-output error gets the same treatment (`paired_layer_error`): its rows are the
same token positions in every layer and configuration, in text order, so they are cut into
contiguous blocks the same way, and each resample recomputes every configuration's layer error
(RMS over layers of sum ||y - ref||^2 / sum ||ref||^2 over the drawn rows) on the same blocks.
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

    def describe(self, digits: int = 3) -> str:
        return f"{self.diff:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"

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
    _check_contrast(nlls, coeffs, "NLL sets")
    flat = [flat_nll(n) for n in nlls]
    a = flat[0]
    for b in flat[1:]:
        if a.shape != b.shape:
            raise ValueError(f"paired NLLs must cover the same tokens: {a.numel()} against {b.numel()} predictions")
    _check_resampling(a.numel(), "predictions", units, resamples, level)
    if not all(torch.isfinite(f).all() for f in flat):
        raise ValueError("per-token NLLs contain NaN or Inf")
    diff = sum(c * math.exp(float(f.mean())) for c, f in zip(coeffs, flat))
    unit_tokens = a.numel() // units
    used = units * unit_tokens
    pick = _draws(units, resamples, seed)
    star = sum(c * f[:used].reshape(units, unit_tokens).mean(1)[pick].mean(1).exp() for c, f in zip(coeffs, flat))
    return _interval(diff, star, level, units, unit_tokens, resamples)


def layer_error_of(err_sum: torch.Tensor, ref_sum: torch.Tensor) -> torch.Tensor:
    """The layer error from squared-error and reference sums over rows, layers last: the RMS over
    layers of the relative error, sqrt(mean_l err_l / ref_l). [..., layers] -> [...]"""
    return (err_sum / ref_sum).mean(-1).sqrt()


def paired_layer_error(row_sq: list[torch.Tensor], ref_sq: torch.Tensor, coeffs: list[float], *,
                       units: int = DEFAULT_UNITS, resamples: int = DEFAULT_RESAMPLES, level: float = 0.95,
                       seed: int = 0) -> PairedInterval:
    """Interval of sum_i coeffs[i] * layer_error_i (module text). row_sq[i]: configuration i's
    squared output error per held-out row [layers, rows]; ref_sq: the float blocks' squared output
    norm per row [layers, rows]; rows in text order, the same positions in every layer."""
    _check_contrast(row_sq, coeffs, "error sets")
    ref = ref_sq.double()
    if ref.dim() != 2 or any(tuple(e.shape) != tuple(ref.shape) for e in row_sq):
        raise ValueError(f"per-row errors must all be [layers, rows] like the reference's {tuple(ref.shape)}, not "
                         f"{[tuple(e.shape) for e in row_sq]}")
    _check_resampling(ref.shape[1], "held-out rows", units, resamples, level)
    if not all(torch.isfinite(e).all() for e in row_sq) or not bool((ref > 0).any(1).all()):
        raise ValueError("per-row errors contain NaN or Inf, or a layer's reference outputs are all zero")
    diff = sum(c * float(layer_error_of(e.double().sum(1), ref.sum(1))) for c, e in zip(coeffs, row_sq))
    per_unit = ref.shape[1] // units
    used = units * per_unit
    blocks = lambda t: t.double()[:, :used].reshape(t.shape[0], units, per_unit).sum(2)    # [layers, units]
    pick = _draws(units, resamples, seed)
    den = blocks(ref)[:, pick].sum(2).t()                                                   # [resamples, layers]
    star = sum(c * layer_error_of(blocks(e)[:, pick].sum(2).t(), den) for c, e in zip(coeffs, row_sq))
    return _interval(diff, star, level, units, per_unit, resamples)


def _check_contrast(sets: list, coeffs: list[float], what: str) -> None:
    if len(sets) != len(coeffs) or len(sets) < 2:
        raise ValueError(f"a contrast needs at least two configurations with one coefficient each, "
                         f"not {len(sets)} {what} and {len(coeffs)} coefficients")


def _check_resampling(n: int, what: str, units: int, resamples: int, level: float) -> None:
    if isinstance(units, bool) or not isinstance(units, int) or units < MIN_UNITS:
        raise ValueError(f"units must be an integer >= {MIN_UNITS}, not {units!r}")
    if n < units:
        raise ValueError(f"{n} {what} cannot make {units} resampling units; evaluate at least "
                         f"{units} tokens or ask for fewer units (>= {MIN_UNITS})")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 100:
        raise ValueError(f"resamples must be an integer >= 100, not {resamples!r}")
    if not 0.5 <= level < 1:
        raise ValueError(f"level must be in [0.5, 1), not {level!r}")


def _draws(units: int, resamples: int, seed: int) -> torch.Tensor:
    """[resamples, units] block indices drawn with replacement (the same for every configuration)."""
    return torch.randint(units, (resamples, units), generator=torch.Generator().manual_seed(seed))


def _interval(diff: float, star: torch.Tensor, level: float, units: int, unit_size: int, resamples: int) -> PairedInterval:
    tail = (1 - level) / 2
    low, high = torch.quantile(star, torch.tensor([tail, 1 - tail], dtype=star.dtype)).tolist()
    return PairedInterval(diff, low, high, level, units, unit_size, resamples)
