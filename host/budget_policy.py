"""A per-token budgeted restoration policy over measured options (a multiple-choice knapsack).

Each selected expert of a token gets exactly one option: nothing, a rank-r prefix of its
compensator at a stored factor precision (fp16, int8, int4, int3), or a higher-precision copy
(4 or 8 bits) instead of its low-bit image. Option o of expert e costs cost[e, o] bytes beyond the
low-bit expert and is worth gain[e, o]: the MEASURED reduction of that expert's output squared
error on calibration tokens routed to it (host/budget_study.py measures it by running the expert
under every option; nothing is inferred from spectra).

A slot with router weight w contributes w * f_e(x) to the layer output, so its share of the
layer's squared error scales as w^2 when the slots' errors are independent; the exponent
`weight_power` is measured on calibration data (budget_study.weight_exponent), not assumed.

Per token the policy maximizes sum over its K slots of w^p * gain[e, o] subject to
sum cost[e, o] <= budget. Solved by the Lagrangian / convex-hull method of the multiple-choice
knapsack: per expert, the upper concave hull of its (cost, gain) options is built once (a slot's
weight scales its gains, which leaves the hull unchanged); per token the hull increments of all
K slots are taken in decreasing order of w^p x slope while they fit (the LP relaxation's optimum
without its one fractional step); then repairs in what is left of the budget: the one-slot
replacement that adds the most value (any option, off the hull too), `repair_rounds` times; and,
with `pair_repair`, the best change of two slots among their hull options (one down, one up) and
the one-slot rounds again (nearer the optimum, ~20x the planning time; off by default).
Everything is batched over tokens in torch: per token-layer it costs one sort of K x H hull
increments (H hull points per expert), 2 x `repair_rounds` passes over K x O options and one over
(K x H)^2 pairs. budget_bench.py measures how near the exact optimum it lands and its time.
"""
from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass, field

import torch

from ndpmoe.model.factor_quant import FACTOR_PRECISIONS, factor_bits

COPY_BITS = (4, 8)                  # higher-precision copies the policy may choose


@dataclass(frozen=True)
class Option:
    """One thing a selected expert can be given: kind 'none', 'factors' (precision, rank) or 'copy' (bits)."""
    kind: str
    precision: str | None = None
    rank: int = 0
    bits: int | None = None

    def __post_init__(self):
        if self.kind == "factors":
            factor_bits(self.precision)            # refuses an unknown precision, naming the allowed ones
            if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
                raise ValueError(f"a factor option's rank must be a positive integer, not {self.rank!r}")
        elif self.kind == "copy":
            if self.bits not in COPY_BITS:
                raise ValueError(f"a copy's bits must be one of {COPY_BITS}, not {self.bits!r}")
        elif self.kind != "none":
            raise ValueError(f"option kind must be 'none', 'factors' or 'copy', not {self.kind!r}")

    @property
    def label(self) -> str:
        if self.kind == "factors":
            return f"r{self.rank}-{self.precision}"
        return f"int{self.bits}-copy" if self.kind == "copy" else "none"


def option_list(precisions, stored_rank: int, copy_bits=COPY_BITS, ranks=None) -> tuple[Option, ...]:
    """'none', every rank prefix 1..stored_rank (or `ranks`) at each precision, and each copy."""
    if isinstance(stored_rank, bool) or not isinstance(stored_rank, int) or stored_rank < 0:
        raise ValueError(f"stored rank must be a non-negative integer, not {stored_rank!r}")
    ranks = range(1, stored_rank + 1) if ranks is None else ranks
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= stored_rank:
            raise ValueError(f"rank {r!r} is not stored: ranks must be integers in [1, {stored_rank}] "
                             f"(the stored rank)")
    for p in precisions:
        if p not in FACTOR_PRECISIONS:
            raise ValueError(f"factor precision must be one of {FACTOR_PRECISIONS}, not {p!r}")
    for b in copy_bits:
        if b not in COPY_BITS:
            raise ValueError(f"copy bits must be one of {COPY_BITS}, not {b!r}")
    return ((Option("none"),) + tuple(Option("factors", p, r) for p in precisions for r in ranks)
            + tuple(Option("copy", bits=b) for b in copy_bits))


def check_budget(budget) -> float:
    """A budget is a finite number of bytes >= 0; anything else is refused, naming it."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget < 0:
        raise ValueError(f"budget must be a finite number of bytes per token and layer >= 0, not {budget!r}")
    return float(budget)


@dataclass(frozen=True, eq=False)
class OptionTable:
    """One layer's options: cost [E, O] bytes beyond the low-bit expert, gain [E, O] measured
    reduction of the expert's output squared error (option 0 is 'none': cost 0, gain 0)."""
    options: tuple[Option, ...]
    cost: torch.Tensor
    gain: torch.Tensor
    hull: torch.Tensor = field(init=False)        # [E, H] option indices of each upper hull, padded with -1

    def __post_init__(self):
        e, o = self.cost.shape
        if tuple(self.gain.shape) != (e, o) or len(self.options) != o or self.options[0].kind != "none":
            raise ValueError(f"cost and gain must both be [E, O] with O = {len(self.options)} options, 'none' "
                             f"first; got {tuple(self.cost.shape)} and {tuple(self.gain.shape)}")
        hulls = [upper_hull(self.cost[i].tolist(), self.gain[i].tolist()) for i in range(e)]
        h = max(map(len, hulls))
        object.__setattr__(self, "hull", torch.tensor([hl + [-1] * (h - len(hl)) for hl in hulls], dtype=torch.long))

    def index(self, option: Option) -> int:
        return self.options.index(option)

    @functools.cached_property
    def rows(self) -> list["_ExpertRow"]:
        """Per expert, what the one-token solver reads (its hull steps, options by cost) as Python lists."""
        return [_ExpertRow.of([i for i in h if i >= 0], c, g)
                for h, c, g in zip(self.hull.tolist(), self.cost.tolist(), self.gain.tolist())]


@dataclass(frozen=True)
class _ExpertRow:
    """One expert's options for `solve_one`: hull option indices, cost and gain per option, each
    hull step's (gain rise, cost rise, divisor), and the options in increasing cost with the
    running best gain (the best option that fits a price is then a bisection away)."""
    hull: list[int]
    cost: list[float]
    gain: list[float]
    steps: list[tuple[float, float, float]]
    by_cost: list[float]
    best_gain: list[float]

    @classmethod
    def of(cls, hull: list[int], cost: list[float], gain: list[float]) -> "_ExpertRow":
        steps = []
        for a, b in zip(hull, hull[1:]):
            dc = cost[b] - cost[a]
            steps.append((gain[b] - gain[a], dc, dc if dc > 1e-12 else 1e-12))
        order = sorted(range(len(cost)), key=lambda o: cost[o])
        best, running = [], -math.inf
        for o in order:
            running = max(running, gain[o])
            best.append(running)
        return cls(hull, cost, gain, steps, [cost[o] for o in order], best)

    def best_fitting(self, c0: float, left: float) -> float | None:
        """The largest gain among options with `cost - c0 <= left + 1e-9` (the repair's test, a
        prefix by cost): bisected near the price, then settled by that exact test."""
        fits, by_cost = (lambda c: c - c0 <= left + 1e-9), self.by_cost
        n = bisect.bisect_right(by_cost, c0 + (left + 1e-9))
        while n < len(by_cost) and fits(by_cost[n]):
            n += 1
        while n and not fits(by_cost[n - 1]):
            n -= 1
        return self.best_gain[n - 1] if n else None


def upper_hull(cost: list[float], gain: list[float]) -> list[int]:
    """Indices of the upper concave hull of (cost, gain), in increasing cost, each strictly better
    than the last (the only options a Lagrangian relaxation ever picks). It starts at the best
    option that costs no more than option 0 ('none'): option 0 itself, unless an option is free or
    pays back (e.g. a copy packed smaller than the low-bit expert) and gains more."""
    start = min((i for i in range(len(cost)) if cost[i] <= cost[0]), key=lambda i: (-gain[i], cost[i], i))
    order = sorted(range(len(cost)), key=lambda i: (cost[i], -gain[i]))
    hull = [start]
    for i in order:
        if i == start or cost[i] <= cost[start] or gain[i] <= gain[hull[-1]]:
            continue
        if cost[i] == cost[hull[-1]]:
            continue                                   # same price, no more gain (sorted by -gain)
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (gain[b] - gain[a]) * (cost[i] - cost[a]) <= (gain[i] - gain[a]) * (cost[b] - cost[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


class MeasuredBudgetPolicy:
    """Per token and layer: the option of each selected expert that maximizes sum w^p x measured
    gain within `budget_bytes` (module text). decide() returns option indices [T, K]."""

    def __init__(self, budget_bytes: float, weight_power: float = 2.0, repair_rounds: int = 2):
        self.budget_bytes = check_budget(budget_bytes)
        if isinstance(weight_power, bool) or not isinstance(weight_power, (int, float)) or not math.isfinite(weight_power):
            raise ValueError(f"weight_power must be a finite number, not {weight_power!r}")
        self.weight_power = float(weight_power)
        self.repair_rounds = repair_rounds

    @property
    def name(self) -> str:
        return f"measured-budget@{self.budget_bytes / 1e3:.1f}kB"

    def decide(self, ids: torch.Tensor, weights: torch.Tensor, table: OptionTable) -> torch.Tensor:
        return solve(table, ids, weights, self.budget_bytes, self.weight_power, self.repair_rounds)


def objective(table: OptionTable, ids: torch.Tensor, weights: torch.Tensor, choice: torch.Tensor,
              weight_power: float = 2.0) -> torch.Tensor:
    """Per token: sum over slots of w^p x gain of the chosen option. [T]"""
    return (weights.double() ** weight_power * table.gain[ids, choice]).sum(1)


def spent(table: OptionTable, ids: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """Per token: bytes beyond the low-bit experts. [T]"""
    return table.cost[ids, choice].sum(1)


def solve(table: OptionTable, ids: torch.Tensor, weights: torch.Tensor, budget: float,
          weight_power: float = 2.0, repair_rounds: int = 2, pair_repair: bool = False) -> torch.Tensor:
    """Option index per (token, slot) [T, K] (module text: hull greedy, then one-slot repairs)."""
    if ids.dim() != 2 or ids.shape != weights.shape:
        raise ValueError(f"ids and weights must both be [T, K], not {tuple(ids.shape)} and {tuple(weights.shape)}")
    budget = check_budget(budget)
    t, k = ids.shape
    scale = slot_scale(weights, weight_power)                                   # [T, K]
    if t == 1 and not pair_repair:
        return torch.tensor([solve_one(table, ids[0].tolist(), scale[0].tolist(), budget, repair_rounds)],
                            dtype=torch.long)
    hull = table.hull[ids]                                                      # [T, K, H]
    valid = hull >= 0
    hidx = hull.clamp_min(0)
    hc = torch.gather(table.cost[ids], 2, hidx)                                 # [T, K, H]
    hg = torch.gather(table.gain[ids], 2, hidx)
    dc = (hc[..., 1:] - hc[..., :-1])
    dg = (hg[..., 1:] - hg[..., :-1]) * scale[..., None]
    step_ok = valid[..., 1:]
    slope = torch.where(step_ok, dg / dc.clamp_min(1e-12), torch.full_like(dg, -math.inf))
    flat_slope, flat_cost = slope.reshape(t, -1), torch.where(step_ok, dc, math.inf).reshape(t, -1)
    order = flat_slope.argsort(dim=1, descending=True, stable=True)
    csum = torch.gather(flat_cost, 1, order).cumsum(1)
    room = budget - hc[..., 0].sum(1, keepdim=True)                             # the hulls' starts may pay back
    take = (csum <= room + 1e-9) & (torch.gather(flat_slope, 1, order) > 0)
    take = take.cummin(dim=1).values                                            # stop at the first that does not fit
    taken = torch.zeros_like(take).scatter_(1, order, take)                     # [T, K*(H-1)]
    level = taken.reshape(t, k, -1).sum(2)                                      # hull steps per slot
    choice = torch.gather(hull, 2, level[..., None])[..., 0]                    # [T, K] option index
    cost_all, gain_all = table.cost[ids], table.gain[ids] * scale[..., None]    # [T, K, O]
    _repair_singles(choice, cost_all, gain_all, budget, repair_rounds)
    if pair_repair:
        _repair_pairs(choice, hull, cost_all, gain_all, budget)
        _repair_singles(choice, cost_all, gain_all, budget, repair_rounds)
    return choice


def slot_scale(weights: torch.Tensor, weight_power: float) -> torch.Tensor:
    """What a slot's gains are multiplied by: w^p in float64 (weights below 0 count as 0). [T, K]"""
    return weights.double().clamp_min(0) ** weight_power


def solve_one(table: OptionTable, ids: list[int], scale: list[float], budget: float, rounds: int) -> list[int]:
    """`solve` for one token (batch-1 decode), on lists: the same choices by the same float64
    operations (tests/test_budget_policy.py holds it equal to the batched path), without torch's
    per-op overhead on [1, K] tensors. `scale`: the token's row of `slot_scale`."""
    rows = [table.rows[e] for e in ids]
    steps = []                                      # (slope, cost, slot) of every hull step, slot-major
    for slot, (row, s) in enumerate(zip(rows, scale)):
        steps.extend((dg * s / div, dc, slot) for dg, dc, div in row.steps)
    # the batched path's padding steps sort last and stop the walk where these run out: not needed
    level = [0] * len(ids)
    spent = 0.0
    room = budget - sum(row.cost[row.hull[0]] for row in rows)
    for slope, dc, slot in sorted(steps, key=lambda x: -x[0]):      # stable, as argsort(stable=True)
        spent += dc
        if not (spent <= room + 1e-9 and slope > 0):
            break
        level[slot] += 1
    choice = [row.hull[lv] for row, lv in zip(rows, level)]
    for _ in range(rounds):
        cur = [(row.cost[c], row.gain[c] * s) for row, s, c in zip(rows, scale, choice)]
        left = budget - sum(c for c, _ in cur)
        # The batched repair takes the first (slot, option) of largest value g * s - g0 among the
        # options that fit. Value rises with g, so a slot's largest is at its best fitting gain.
        best, where = -math.inf, None
        for slot, (row, s) in enumerate(zip(rows, scale)):
            c0, g0 = cur[slot]
            top = row.best_fitting(c0, left)
            if top is not None and top * s - g0 > best:
                best, where = top * s - g0, slot
        if not best > 1e-15:
            break
        row, s, (c0, g0) = rows[where], scale[where], cur[where]
        choice[where] = next(o for o, (c, g) in enumerate(zip(row.cost, row.gain))
                             if c - c0 <= left + 1e-9 and g * s - g0 == best)
    return choice


def _repair_singles(choice, cost_all, gain_all, budget: float, rounds: int) -> None:
    """Up to `rounds` times per token: the one-slot change that adds the most value and fits."""
    t = choice.shape[0]
    for _ in range(rounds):
        cur_c = torch.gather(cost_all, 2, choice[..., None])
        cur_g = torch.gather(gain_all, 2, choice[..., None])
        left = budget - cur_c[..., 0].sum(1)                                    # [T]
        fits = cost_all - cur_c <= left[:, None, None] + 1e-9
        better = torch.where(fits, gain_all - cur_g, torch.full_like(gain_all, -math.inf)).reshape(t, -1)
        best, where = better.max(dim=1)
        move = best > 1e-15
        if not move.any():
            break
        slot, opt = where // cost_all.shape[2], where % cost_all.shape[2]
        rows = move.nonzero(as_tuple=True)[0]
        choice[rows, slot[rows]] = opt[rows]


def _repair_pairs(choice, hull, cost_all, gain_all, budget: float) -> None:
    """Per token: the best change of two slots at once among their hull options (e.g. one slot a
    step down to afford another's step up) that fits and adds value. [T, (K H)^2] at once."""
    t, k, h = hull.shape
    opts = hull.clamp_min(0)
    valid = (hull >= 0).reshape(t, -1)
    cur_c = torch.gather(cost_all, 2, choice[..., None])
    cur_g = torch.gather(gain_all, 2, choice[..., None])
    left = budget - cur_c[..., 0].sum(1)
    dc = (torch.gather(cost_all, 2, opts) - cur_c).reshape(t, -1)                   # [T, K*H]
    dg = (torch.gather(gain_all, 2, opts) - cur_g).reshape(t, -1)
    slot = torch.arange(k).repeat_interleave(h)
    ok = (slot[:, None] != slot[None, :]) & valid[:, :, None] & valid[:, None, :]
    ok &= dc[:, :, None] + dc[:, None, :] <= left[:, None, None] + 1e-9
    pg = torch.where(ok, dg[:, :, None] + dg[:, None, :], torch.full_like(ok, -math.inf, dtype=dg.dtype))
    best, where = pg.reshape(t, -1).max(1)
    rows = (best > 1e-15).nonzero(as_tuple=True)[0]
    i, j = where[rows] // (k * h), where[rows] % (k * h)
    flat = opts.reshape(t, -1)
    choice[rows, slot[i]] = flat[rows, i]
    choice[rows, slot[j]] = flat[rows, j]


def solve_exact(table: OptionTable, ids_row: list[int], w_row: list[float], budget: float,
                weight_power: float = 2.0) -> float:
    """The exact optimum of one token's knapsack (Pareto fronts merged slot by slot): the yardstick
    that measures how far `solve` is from optimal. Plain Python; for checks, not for planning."""
    front = [(0.0, 0.0)]
    for e, w in zip(ids_row, w_row):
        s = max(w, 0.0) ** weight_power
        opts = list(zip(table.cost[e].tolist(), (g * s for g in table.gain[e].tolist())))
        merged = sorted((c0 + c, v0 + v) for c0, v0 in front for c, v in opts if c0 + c <= budget + 1e-9)
        front, best = [], -math.inf
        for c, v in merged:
            if v > best:
                front.append((c, v))
                best = v
    return max(v for _, v in front)
