"""Rank allocation across experts and matrices under a total byte budget.

Each matrix's compensator has a per-component gain (LowRank.spectrum: the reduction of its
calibration output error, weighted by how much that matrix matters) and a per-component cost in
bytes. Gains are non-increasing within a matrix, so taking components greedily by gain per byte
is optimal for the budget (up to the last, partially fitting component), exactly like water-filling.
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Hashable, Mapping

import torch


def allocate_ranks(gains: Mapping[Hashable, torch.Tensor], cost_per_rank: Mapping[Hashable, float],
                   budget: float, granularity: int = 1) -> dict[Hashable, int]:
    """Ranks per key maximizing total gain with sum(rank * cost) <= budget.

    granularity: ranks move in steps of this many components (e.g. 32 for the NDP's int8 factors,
    whose A matrix is padded to a multiple of 32 columns).
    """
    if budget < 0:
        raise ValueError(f"budget must be non-negative, not {budget}")
    if isinstance(granularity, bool) or not isinstance(granularity, int) or granularity < 1:
        raise ValueError(f"granularity must be a positive integer, not {granularity!r}")
    missing = set(gains) - set(cost_per_rank)
    if missing:
        raise ValueError(f"no cost given for {sorted(map(str, missing))[:3]}")
    ranks = {key: 0 for key in gains}
    heap = []

    def push(key):
        g = gains[key]
        r = ranks[key]
        if r >= g.numel():
            return
        step = min(granularity, g.numel() - r)
        gain = float(g[r:r + step].sum())
        cost = cost_per_rank[key] * step
        heapq.heappush(heap, (-gain / cost, id(key), key, step, cost))

    for key in gains:
        if cost_per_rank[key] <= 0:
            raise ValueError(f"cost per rank of {key!r} must be positive, not {cost_per_rank[key]}")
        push(key)
    spent = 0.0
    while heap:
        _, _, key, step, cost = heapq.heappop(heap)
        if spent + cost > budget:
            continue            # a smaller step of another matrix may still fit
        ranks[key] += step
        spent += cost
        push(key)
    return ranks


def kurtosis(w: torch.Tensor) -> float:
    """Excess kurtosis of a weight matrix's entries (the paper's heavy-tail rank heuristic)."""
    x = w.double().flatten()
    x = x - x.mean()
    var = (x ** 2).mean()
    return float((x ** 4).mean() / var.clamp_min(1e-30) ** 2 - 3.0)


def allocate_by_kurtosis(kurt: Mapping[Hashable, float], cost_per_rank: Mapping[Hashable, float], budget: float,
                         max_rank: int) -> dict[Hashable, int]:
    """The paper's and MiLo's rule: ranks proportional to each matrix's kurtosis (heavy-tailed
    weights get more rank), capped at `max_rank`, scaled to spend at most `budget` bytes.

    kurt: each key's (non-excess, so positive) kurtosis. The scale is found by bisection on
    sum(min(max_rank, floor(s * kurt)) * cost) <= budget; what is left goes to the keys with the
    largest rounding remainders that still fit."""
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not math.isfinite(budget) or budget < 0:
        raise ValueError(f"budget must be a non-negative number of bytes, not {budget!r}")
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 0:
        raise ValueError(f"max_rank must be a non-negative integer, not {max_rank!r}")
    missing = set(kurt) - set(cost_per_rank)
    if missing:
        raise ValueError(f"no cost given for {sorted(map(str, missing))[:3]}")
    for key, k in kurt.items():
        if not k > 0:
            raise ValueError(f"kurtosis of {key!r} must be positive, not {k!r}")

    def ranks_at(s: float) -> dict:
        return {key: min(max_rank, int(s * k)) for key, k in kurt.items()}

    def cost(ranks: dict) -> float:
        return sum(r * cost_per_rank[key] for key, r in ranks.items())

    lo, hi = 0.0, max_rank / min(kurt.values()) + 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(ranks_at(mid)) <= budget else (lo, mid)
    ranks = ranks_at(lo)
    left = budget - cost(ranks)
    for key in sorted(kurt, key=lambda q: -(lo * kurt[q] - int(lo * kurt[q]))):
        if ranks[key] < max_rank and cost_per_rank[key] <= left:
            ranks[key] += 1
            left -= cost_per_rank[key]
    return ranks
