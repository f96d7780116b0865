"""Restoration policies: for each selected (token, slot), how much compensation rank to apply, or
whether to use the expert's higher-precision copy instead. Small swappable objects with one method:

    policy.decide(ids [T, K], weights [T, K], ctx: RestorationContext) -> Restoration

`Restoration.restore_tensor()` / `.hi_tensor()` are the `restore` / `hi` arguments of
`model.moe_quant.moe_forward_quant`: the runtime's planner and the accuracy study (host/study.py)
both decide through these objects, and `decode_restoration` is the decision batch-1 decode makes.
Slots are sorted by router weight, descending (model.moe.route).

- TopN(n): the paper's rule, full (or a fixed) rank on the n highest-weighted slots, n < k
  (n = k, every slot, is the study's upper reference).
- RandomN(n): n random slots per token (the control for "router-guided").
- HobbitTopHi(n): higher-precision copy of the top-n slots (optionally above a router weight).
- BudgetedPolicy(bytes per token): per batch, buys gain per byte greedily: gain of giving expert e
  rank r = sum over the tokens that chose e of weight^p x rank_gain[e, r]; the higher-precision
  copy is one more option of the same expert. Factors or copies already cached cost nothing.
- GainBudgetPolicy (host/gain_policy.py, 'gain-budget:BYTES'): per token, the measured-gain
  knapsack of the accuracy study's budgeted rows, over gain tables kept with the store.
"""
from __future__ import annotations

import functools
import heapq
import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .sensitivity import LayerSensitivity
from .sizes import ExpertSizes


@dataclass(frozen=True)
class Restoration:
    """Per (token, slot): a rank (0 = none) and whether the higher-precision copy is used."""
    ranks: tuple[tuple[int, ...], ...]
    hi: tuple[tuple[bool, ...], ...]

    def restore_tensor(self) -> torch.Tensor:
        return torch.tensor(self.ranks, dtype=torch.long).reshape(len(self.ranks), -1)

    def hi_tensor(self) -> torch.Tensor:
        return torch.tensor(self.hi, dtype=torch.bool).reshape(len(self.hi), -1)

    def bytes_moved(self, ids: torch.Tensor, ctx: "RestorationContext") -> int:
        """Bytes it adds beyond the low-bit experts: factors per expert at the largest rank any
        token uses (minus a cached prefix), plus each higher-precision copy's price now."""
        rank, hi = {}, set()
        for row_ids, row_r, row_h in zip(ids.tolist(), self.ranks, self.hi):
            for e, r, h in zip(row_ids, row_r, row_h):
                if h:
                    hi.add(e)
                elif r:
                    rank[e] = max(rank.get(e, 0), min(r, ctx.stored_rank))
        total = sum(max(0, r - ctx.cached_rank(e)) * ctx.rank_bytes for e, r in rank.items())
        return total + sum(ctx.hi_price(e) for e in hi)


def _new_restoration(ranks: tuple, hi: tuple) -> Restoration:
    """Restoration(ranks, hi) without the frozen dataclass's __init__ (an object.__setattr__ per
    field): the planner makes one per layer."""
    r = object.__new__(Restoration)
    d = r.__dict__
    d["ranks"], d["hi"] = ranks, hi
    return r


def _no_rank(e: int) -> int:
    return 0


def _none_cached(e: int) -> bool:
    return False


@dataclass(frozen=True)
class RestorationContext:
    """What a policy may know: stored rank, byte prices, sensitivity and what is cached."""
    stored_rank: int
    rank_bytes: int                                   # bytes of one rank component of an expert
    hi_extra_bytes: int | None = None                 # None: no higher-precision copies
    sensitivity: LayerSensitivity | None = None
    cached_rank: Callable[[int], int] = _no_rank      # expert -> rank of its cached factors
    hi_cached: Callable[[int], bool] = _none_cached   # expert -> its hi copy is cached
    lo_cached: Callable[[int], bool] = _none_cached   # expert -> its low-bit copy is cached
    lo_bytes: int = 0                                 # bytes of one low-bit expert (for hi_price)
    states: Callable[[list[int], bool], list[tuple[int, int | None]]] | None = None   # start_states, in one pass
    layer: int | None = None                          # the store layer decided (per-layer tables)

    def start_states(self, experts: list[int], copies: bool) -> list[tuple[int, int | None]]:
        """Per expert: (cached factor rank, hi_price, or None without `copies`), for a whole layer
        at once (the cache-backed context reads the caches directly: the planner's hot path)."""
        if self.states is not None:
            return self.states(experts, copies)
        return [(self.cached_rank(e), self.hi_price(e) if copies else None) for e in experts]

    def hi_price(self, e: int) -> int:
        """Bytes a higher-precision copy of expert e costs now: nothing if it is cached; its
        extra over the low-bit expert if that one would be fetched anyway; all of it if the
        low-bit expert is cached (the copy then replaces a free hit)."""
        if self.hi_cached(e):
            return 0
        return self.hi_bytes if self.lo_cached(e) else self.hi_extra_bytes

    @property
    def hi_bytes(self) -> int:
        return self.hi_extra_bytes + self.lo_bytes


def restoration_context(sizes: ExpertSizes, sensitivity: LayerSensitivity | None = None,
                        cache=None, layer: int = 0, factor_bytes: str = "fp16", factor_cache=None) -> RestorationContext:
    """The context for one layer: prices from the contract sizes (fp16 factors to the GPU, or
    int8 factors read by the NDP), cache state from an ExpertCache if given."""
    if factor_bytes == "fp16":
        rank_bytes = sizes.gpu_rank_bytes          # fp16, or the packed rows of a low-bit store
    elif factor_bytes == "int8":
        rank_bytes = sizes.int8_bytes_per_rank
    else:
        raise ValueError(f"factor_bytes must be 'fp16' or 'int8', not {factor_bytes!r}")
    hi_extra = sizes.hi_extra_bytes if sizes.hi_fmt is not None else None
    lo = sizes.weight_bytes("lo") if sizes.fmt is not None else 0
    if cache is None:
        return RestorationContext(sizes.stored_rank, rank_bytes, hi_extra, sensitivity, lo_bytes=lo, layer=layer)
    fcache = cache if factor_cache is None else factor_cache
    return RestorationContext(sizes.stored_rank, rank_bytes, hi_extra, sensitivity,
                              cached_rank=functools.partial(fcache.cached_rank, layer),
                              hi_cached=functools.partial(cache.holds, layer, "hi"),
                              lo_cached=functools.partial(cache.holds, layer, "lo"), lo_bytes=lo,
                              states=_cache_states(cache.entries, fcache.entries, layer, hi_extra, lo), layer=layer)


def _cache_states(entries, factor_entries, layer: int, hi_extra: int | None, lo_bytes: int):
    """RestorationContext.start_states read straight from the caches' entries (the same values as
    cached_rank and hi_price)."""
    hi_all = None if hi_extra is None else hi_extra + lo_bytes

    def states(experts: list[int], copies: bool) -> list[tuple[int, int | None]]:
        out = []
        for e in experts:
            f = factor_entries.get((layer, e, "factors"))
            r0 = f[1] if f is not None else 0
            if not copies:
                out.append((r0, None))
            elif (layer, e, "hi") in entries:
                out.append((r0, 0))
            else:
                out.append((r0, hi_all if (layer, e, "lo") in entries else hi_extra))
        return out
    return states


class RestorationPolicy(Protocol):
    name: str
    row_wise: bool            # a token's decision depends on that token alone, not on the batch
    needs_sensitivity: bool   # decide() reads ctx.sensitivity

    def decide(self, ids: torch.Tensor, weights: torch.Tensor, ctx: RestorationContext) -> Restoration: ...


def decode_restoration(policy: RestorationPolicy, ids: torch.Tensor, weights: torch.Tensor,
                       ctx: RestorationContext) -> Restoration:
    """The decisions batch-1 decode makes for these T tokens, each token its own batch (how the
    study counts bytes). A row-wise policy decides them all in one call: the same decisions (for
    a random policy, draws of the same distribution)."""
    if policy.row_wise:
        return policy.decide(ids, weights, ctx)
    rows = [policy.decide(ids[i:i + 1], weights[i:i + 1], ctx) for i in range(ids.shape[0])]
    return Restoration(tuple(r.ranks[0] for r in rows), tuple(r.hi[0] for r in rows))


def _check_ids(ids: torch.Tensor, weights: torch.Tensor) -> tuple[int, int]:
    shape = ids.shape
    if len(shape) != 2 or shape != weights.shape:
        raise ValueError(f"ids and weights must both be [T, K], not {tuple(ids.shape)} and {tuple(weights.shape)}")
    return shape


def _check_n(n: int, k: int) -> None:
    if not 0 <= n <= k:
        raise ValueError(f"n must be in [0, k] = [0, {k}] for top-{k} routing, not {n}")


def _count(name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{name} must be a non-negative integer, not {n!r}")
    return n


@functools.lru_cache(maxsize=256)
def _topn_restoration(t: int, k: int, n: int, rank: int) -> Restoration:
    """The same few decisions recur every layer: build each once (Restoration is immutable)."""
    _check_n(n, k)
    row = tuple(rank if (s < n and rank) else 0 for s in range(k))
    return Restoration((row,) * t, ((False,) * k,) * t)


def _rank_used(rank: int | None, ctx: RestorationContext) -> int:
    return ctx.stored_rank if rank is None else min(rank, ctx.stored_rank)


@dataclass(frozen=True)
class TopN:
    """Rank `rank` (None: all that is stored) on the n highest-weighted slots of every token."""
    n: int
    rank: int | None = None
    row_wise = True
    needs_sensitivity = False

    def __post_init__(self):
        _count("n", self.n)
        if self.rank is not None:
            _count("rank", self.rank)

    @property
    def name(self) -> str:
        return f"top-{self.n}" + (f"@r{self.rank}" if self.rank is not None else "")

    def decide(self, ids, weights, ctx):
        t, k = _check_ids(ids, weights)
        return _topn_restoration(t, k, self.n, _rank_used(self.rank, ctx))


class RandomN:
    """n random slots per token at rank `rank` (None: all that is stored): the control that Top-n
    must beat. Draws come from the policy's own seeded generator, so successive calls (the tokens
    of a decode) differ and a run repeats exactly."""
    row_wise = True
    needs_sensitivity = False

    def __init__(self, n: int, seed: int = 0, rank: int | None = None):
        self.n, self.seed = _count("n", n), seed
        self.rank = None if rank is None else _count("rank", rank)
        self._generator = torch.Generator().manual_seed(seed)

    @property
    def name(self) -> str:
        return f"random-{self.n}" + (f"@r{self.rank}" if self.rank is not None else "")

    def fork(self) -> "RandomN":
        """A copy at the same point of its draws: deciding with it leaves this policy's draws as they
        were (a guess, host/prefetch.py). Policies without draws need no fork and have none."""
        fork = RandomN(self.n, self.seed, self.rank)
        fork._generator.set_state(self._generator.get_state())
        return fork

    def decide(self, ids, weights, ctx):
        t, k = _check_ids(ids, weights)
        _check_n(self.n, k)
        pick = torch.rand((t, k), generator=self._generator).argsort(dim=1)[:, :self.n]
        ranks = torch.zeros(t, k, dtype=torch.long).scatter_(1, pick, _rank_used(self.rank, ctx))
        return Restoration(tuple(map(tuple, ranks.tolist())), ((False,) * k,) * t)


@dataclass(frozen=True)
class HobbitTopHi:
    """HOBBIT-style mixed precision: the higher-precision copy for the top-n slots whose router
    weight is at least `min_weight` (a threshold lets it spend a given byte budget on average)."""
    n: int = 1
    min_weight: float = 0.0
    row_wise = True
    needs_sensitivity = False

    @property
    def name(self) -> str:
        return f"hobbit-top{self.n}" + (f"@w>={self.min_weight:.3f}" if self.min_weight else "")

    def decide(self, ids, weights, ctx):
        t, k = _check_ids(ids, weights)
        if not 0 <= self.n <= k:
            raise ValueError(f"n must be in [0, {k}], not {self.n}")
        if ctx.hi_extra_bytes is None and self.n:
            raise ValueError("HobbitTopHi needs higher-precision copies, and this store has none")
        hi = tuple(tuple(s < self.n and w >= self.min_weight for s, w in enumerate(row))
                   for row in weights.tolist())
        return Restoration(((0,) * k,) * t, hi)


@dataclass(frozen=True)
class BudgetedPolicy:
    """Spend at most `budget_bytes` per token (over the batch) where gain per byte is highest.

    Options of a selected expert e: rank r in steps of `rank_step` up to the stored rank
    (price (r - cached rank) x rank_bytes) or its higher-precision copy (RestorationContext.hi_price:
    0 if cached, all its bytes if the low-bit copy is cached, else its extra bytes). Value = sum over its tokens of weight^weight_power x gain: with independent expert
    errors, a slot's share of the output's squared error scales with its router weight squared.
    Per expert, the options' upper concave hull is walked greedily across experts by slope (the
    multiple-choice knapsack's greedy); a step that does not fit is replaced by the largest
    affordable rank.
    """
    budget_bytes: float
    rank_step: int = 8
    weight_power: float = 2.0
    allow_hi: bool = True
    row_wise = False               # the budget is shared by the tokens of a batch
    needs_sensitivity = True

    def __post_init__(self):
        if not isinstance(self.budget_bytes, (int, float)) or self.budget_bytes < 0:
            raise ValueError(f"budget_bytes must be a non-negative number, not {self.budget_bytes!r}")
        if isinstance(self.rank_step, bool) or not isinstance(self.rank_step, int) or self.rank_step < 1:
            raise ValueError(f"rank_step must be a positive integer, not {self.rank_step!r}")

    @property
    def name(self) -> str:
        return f"budgeted@{self.budget_bytes / 1e3:.0f}kB" + ("" if self.allow_hi else "-nohi")

    def decide(self, ids, weights, ctx):
        _check_ids(ids, weights)
        return self.decide_rows(ids.tolist(), weights, ctx)

    def decide_rows(self, id_rows: list[list[int]], weights: torch.Tensor, ctx: RestorationContext) -> Restoration:
        """`decide` on the ids as lists (the planner has converted them already)."""
        t = len(id_rows)
        k = len(id_rows[0]) if t else 0
        if weights.shape != (t, k):
            raise ValueError(f"ids and weights must both be [T, K], not {(t, k)} and {tuple(weights.shape)}")
        sens = ctx.sensitivity
        if sens is None:
            raise ValueError("BudgetedPolicy needs a sensitivity (RestorationContext.sensitivity)")
        stored, rank_bytes, step = ctx.stored_rank, ctx.rank_bytes, self.rank_step
        hulls = _hull_table(sens, stored, rank_bytes, step)
        w_rows = weights.tolist()
        p = self.weight_power
        value: dict[int, float] = {}
        if t == 1:                                # one token: its k experts are distinct (usually)
            value = dict(zip(id_rows[0], [w * w for w in w_rows[0]] if p == 2.0 else [w ** p for w in w_rows[0]]))
        if len(value) != t * k:
            value = {}
            for row_ids, row_w in zip(id_rows, w_rows):
                for e, w in zip(row_ids, row_w):
                    value[e] = value.get(e, 0.0) + (w * w if p == 2.0 else w ** p)
        copies = self.allow_hi and ctx.hi_extra_bytes is not None
        state, walk, heap = {}, {}, []
        start_states = ctx.states if ctx.states is not None else ctx.start_states
        for (e, v), (r0, price) in zip(value.items(), start_states(list(value), copies)):
            if r0 > stored:
                r0 = stored
            hit = hulls.get((e, r0, price))
            if hit is None:
                hit = hulls[(e, r0, price)] = _unit_hull(sens, e, r0, stored, rank_bytes, price, step)
            hull = hit[0]
            state[e] = hull[0][2]
            walk[e] = (hull, hit[1], 0, v)
            if len(hull) > 1 and v > 0:
                heap.append((-v * hull[1][3], e))
        heapq.heapify(heap)                       # items are distinct: pops do not depend on the build
        left = float(self.budget_bytes) * t
        # A partial step buys at least one rank: below that (less a margin for rounding) only a
        # pending full step can still fit, and once none does, the rest of the walk buys nothing.
        partial_floor = rank_bytes * (1.0 - 1e-9)
        while heap:
            if left < partial_floor:
                if all(walk[x][0][walk[x][2] + 1][0] - walk[x][0][walk[x][2]][0] > left for _, x in heap):
                    break
                partial_floor = -1.0
            _, e = heapq.heappop(heap)
            hull, ranks, i, v = walk[e]
            cost = hull[i + 1][0] - hull[i][0]
            if cost <= left:
                left -= cost
                state[e] = hull[i + 1][2]
                walk[e] = (hull, ranks, i + 1, v)
                if i + 2 < len(hull):
                    heapq.heappush(heap, (-v * hull[i + 2][3], e))
            elif hull[i][2] >= 0:                 # the largest rank between here and there that fits
                spent, here = hull[i][0], hull[i][1]
                best = None
                for c, g, r in ranks:
                    if spent < c <= spent + left and g > here and (best is None or g > best[1]):
                        best = (c, g, r)
                if best is not None:
                    left -= best[0] - spent
                    state[e] = best[2]
        if t == 1:
            row = id_rows[0]
            states = [state[e] for e in row]
            return _new_restoration((tuple([s if s > 0 else 0 for s in states]),),
                                    (tuple([s == -1 for s in states]),))
        rank_of = {e: (s if s > 0 else 0) for e, s in state.items()}
        hi_of = {e: s == -1 for e, s in state.items()}
        return Restoration(tuple([tuple(map(rank_of.__getitem__, row)) for row in id_rows]),
                           tuple([tuple(map(hi_of.__getitem__, row)) for row in id_rows]))


@functools.lru_cache(maxsize=256)
def _hull_table(sens: LayerSensitivity, stored_rank: int, rank_bytes: int, step: int) -> dict:
    """(expert, free start rank, hi price) -> _unit_hull, filled as the planner meets them: one
    small dict per (layer sensitivity, prices, step), read per expert with one lookup."""
    if sens.max_rank < stored_rank:
        raise ValueError(f"sensitivity covers rank {sens.max_rank}, below the stored rank {stored_rank}")
    return {}


@functools.lru_cache(maxsize=1 << 16)
def _unit_hull(sens: LayerSensitivity, e: int, r0: int, stored_rank: int, rank_bytes: int,
               hi_price: int | None, step: int) -> tuple[tuple, tuple]:
    """An expert's options at router value 1, from its free start state: the upper concave hull
    of (bytes, gain, state) with state = rank, or -1 for the higher-precision copy, plus each
    hull point's slope from the previous one; and all rank options (for the last, partial step).
    Gains scale with the router value, which leaves the hull unchanged, so it is built once per
    (layer sensitivity, expert, cached state). Holding `sens` keeps its identity unique."""
    gains = sens.rank_gain_rows[e]
    base = gains[r0]
    rank_pts = [(float((r - r0) * rank_bytes), gains[r] - base, r)
                for r in range(r0 - r0 % step + step, stored_rank + 1, step)]
    if stored_rank > r0 and (not rank_pts or rank_pts[-1][2] != stored_rank):
        rank_pts.append((float((stored_rank - r0) * rank_bytes), gains[stored_rank] - base, stored_rank))
    start, points = (0.0, 0.0, r0), list(rank_pts)
    if hi_price is not None:
        hi_gain = sens.hi_gain_list[e] - base
        if hi_price == 0 and hi_gain > 0:
            start, points = (0.0, hi_gain, -1), []        # a cached copy beats the free rank
        elif hi_gain > 0:
            points.append((float(hi_price), hi_gain, -1))
    points.sort()
    hull = [start]
    for pt in points:
        if pt[1] <= hull[-1][1]:
            continue                                      # dominated: costs more, gains no more
        while len(hull) >= 2 and ((hull[-1][1] - hull[-2][1]) * (pt[0] - hull[-2][0])
                                  <= (pt[1] - hull[-2][1]) * (hull[-1][0] - hull[-2][0])):
            hull.pop()
        hull.append(pt)
    with_slope = [hull[0] + (0.0,)]
    for a, b in zip(hull, hull[1:]):
        with_slope.append(b + ((b[1] - a[1]) / max(b[0] - a[0], 1e-9),))
    return tuple(with_slope), tuple(rank_pts)


_SPEC_GRAMMAR = "none, top-N[@rR], random-N[@rR], hobbit, budgeted:BYTES_PER_TOKEN or gain-budget:BYTES_PER_TOKEN"


def parse_budget(spec: str, prefix: str) -> float:
    """The BYTES of a 'PREFIX:BYTES' policy spec: a finite, non-negative number of bytes per token."""
    text = spec[len(prefix):]
    try:
        budget = float(text)
    except ValueError:
        budget = math.nan
    if not math.isfinite(budget) or budget < 0:
        raise ValueError(f"restoration policy {spec!r}: the budget must be a non-negative number of bytes per "
                         f"token, not {text!r}")
    return budget


def get_policy(spec: str, top_k: int | None = None) -> RestorationPolicy:
    """Parse a policy spec: 'none', 'top-N' / 'random-N' (optionally '@rR', rank R, else all that
    is stored), 'hobbit' (top-1 higher-precision copy), 'budgeted:BYTES' (per token and layer,
    options ranked by the spectral sensitivity), 'gain-budget:BYTES' (per token and layer, the
    study's measured-gain knapsack over the store's gain tables; returned unbound: the runtime
    binds it to the store's tables, host/gain_policy.py).
    top_k: the model's routing, to refuse an N above it (None: checked when deciding)."""
    if not isinstance(spec, str):
        raise TypeError(f"policy spec must be a string, not {spec!r}")
    if spec == "none":
        return TopN(0)
    if spec == "hobbit":
        return HobbitTopHi(1)
    for prefix, make in (("top-", TopN), ("random-", RandomN)):
        if spec.startswith(prefix):
            n, at, rank = spec[len(prefix):].partition("@r")
            if n.isdigit() and (not at or rank.isdigit()):
                if top_k is not None:
                    try:
                        _check_n(int(n), top_k)
                    except ValueError as err:
                        raise ValueError(f"restoration policy {spec!r}: {err}") from None
                return make(int(n), rank=int(rank) if at else None)
    if spec.startswith("budgeted:"):
        return BudgetedPolicy(parse_budget(spec, "budgeted:"))
    if spec.startswith("gain-budget:"):
        from .gain_policy import parse_gain_budget

        return parse_gain_budget(spec)
    raise ValueError(f"unknown restoration policy {spec!r}; expected {_SPEC_GRAMMAR}")
