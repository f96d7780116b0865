"""A layer's plan: router output -> restoration decision -> expert tasks with placement, cache
actions and their bytes. The same plan runs on any backend (host/execute.py) and drives the
performance model (host/perf_model.py) and the run statistics (host/run_stats.py).

Legend: T tokens, K top-k, E experts.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, NamedTuple

import torch

from .cache import CacheKey, ExpertCache
from .perf_model import LayerTime, TimeModel, Usage, sum_usage
from .placement import Candidate, Placer
from .policy import Restoration, RestorationPolicy, restoration_context
from .presets import SystemPreset
from .sensitivity import LayerSensitivity
from .sizes import ExpertSizes


# NamedTuples built with tuple.__new__ in the planner: their generated __new__ is a Python lambda,
# a measurable share of planning a many-expert layer.
_new = tuple.__new__
# The plan of every layer, built without the frozen dataclass's __init__ (one object.__setattr__
# per field): the same fields, set once.
_new_plan = object.__new__
_TOKEN_0 = (0,)
_SLOT_TUPLES = tuple((s,) for s in range(256))          # (slot,) of a batch-1 task


class ExpertTask(NamedTuple):
    """All selected (token, slot) pairs of one expert variant, and where their work runs.
    (A NamedTuple for the planner's speed; immutable like the dataclasses elsewhere.)"""
    expert: int
    variant: str                    # "lo" (store format), "hi" (higher-precision copy), "fp16"
    tokens: tuple[int, ...]
    slots: tuple[int, ...]
    ranks: tuple[int, ...]          # compensation rank per (token, slot); 0 = none
    gemm_unit: str                  # "gpu" | "ndp"
    comp_unit: str | None           # "gpu" | "ndp" | None when no slot is compensated
    fetch_weights: bool             # GPU GEMM on weights that were not cached: moved over the link
    fetch_factor_ranks: int         # fp16 factor ranks moved over the link (beyond a cached prefix)

    @property
    def comp_rank(self) -> int:
        return max(self.ranks)


@dataclass(frozen=True)
class LayerPlan:
    layer: int
    ids: list[list[int]]                      # [T][K] expert ids, slots by router weight, descending
    weights_tensor: torch.Tensor              # [T, K] router weights (converted on demand)
    restoration: Restoration
    tasks: tuple[ExpertTask, ...]
    prefetches: tuple[CacheKey, ...]          # fetched into the GPU cache with idle link time
    evictions: tuple[CacheKey, ...]
    task_usage: tuple[Usage, ...]             # per task, then one for the prefetches
    time_model: TimeModel | None              # the placer's: the system's time model (None without one)

    @property
    def tokens(self) -> int:
        return len(self.ids)

    @cached_property
    def weights(self) -> list[list[float]]:
        """[T][K] router weights as floats (only the executor needs them)."""
        return self.weights_tensor.tolist()

    @cached_property
    def usage(self) -> Usage:
        """Bytes, words, cycles and FLOPs of the whole layer (summed on demand: the runtime needs
        only the decisions, the statistics and the performance model need the sums)."""
        return sum_usage(self.task_usage)

    @cached_property
    def time(self) -> LayerTime | None:
        """Modeled time of the layer on the plan's system (None without one)."""
        return self.time_model.layer_time(self.usage) if self.time_model is not None else None


class LayerDecision(NamedTuple):
    """LayerPlanner.decide's result, before the cache is updated (LayerPlanner.finish)."""
    layer: int
    id_rows: list[list[int]]
    weights: torch.Tensor
    restoration: Restoration
    tasks: tuple[ExpertTask, ...]
    cands: list[Candidate]
    choices: list
    usages: list[Usage]
    load: list[float] | None


def check_plan(plan: LayerPlan) -> None:
    """Every selected (token, slot) computed exactly once, with the variant and rank the
    restoration chose; compensation exactly on the slots with a rank; units consistent."""
    t, k = plan.tokens, len(plan.ids[0]) if plan.ids else 0
    seen = {}
    for task in plan.tasks:
        if not len(task.tokens) == len(task.slots) == len(task.ranks) > 0:
            raise ValueError(f"task of expert {task.expert} has mismatched tokens/slots/ranks")
        for tok, slot, rank in zip(task.tokens, task.slots, task.ranks):
            if not (0 <= tok < t and 0 <= slot < k):
                raise ValueError(f"task of expert {task.expert} names (token {tok}, slot {slot}) outside [{t}, {k}]")
            if (tok, slot) in seen:
                raise ValueError(f"(token {tok}, slot {slot}) is computed twice (experts {seen[(tok, slot)]}, {task.expert})")
            seen[(tok, slot)] = task.expert
            if plan.ids[tok][slot] != task.expert:
                raise ValueError(f"(token {tok}, slot {slot}) selected expert {plan.ids[tok][slot]}, "
                                 f"the plan computes expert {task.expert}")
            if rank != plan.restoration.ranks[tok][slot] and not plan.restoration.hi[tok][slot]:
                raise ValueError(f"(token {tok}, slot {slot}) gets rank {rank}, the restoration chose "
                                 f"{plan.restoration.ranks[tok][slot]}")
            if (task.variant == "hi") != plan.restoration.hi[tok][slot]:
                raise ValueError(f"(token {tok}, slot {slot}) runs variant {task.variant!r} against the restoration")
            if task.variant == "hi" and rank:
                raise ValueError(f"(token {tok}, slot {slot}) is compensated on a higher-precision copy")
        if (task.comp_unit is None) != (task.comp_rank == 0):
            raise ValueError(f"task of expert {task.expert} has comp_unit {task.comp_unit!r} with rank {task.comp_rank}")
        if task.gemm_unit not in ("gpu", "ndp") or task.comp_unit not in (None, "gpu", "ndp"):
            raise ValueError(f"task of expert {task.expert} has units {task.gemm_unit!r}, {task.comp_unit!r}")
    if len(seen) != t * k:
        missing = [(a, b) for a in range(t) for b in range(k) if (a, b) not in seen]
        raise ValueError(f"selected (token, slot) pairs not computed: {missing[:5]}")


class LayerPlanner:
    """Plans layers against one expert size, system, cache, policy and placement mode.

    weight_variant "fp16" plans the fp16-offloading baseline (no low-bit experts, no
    restoration). `prefetch` fills the GPU cache with NDP-run experts while the link is idle.
    `factor_cache`: a separate pool for compensation factors (default: the experts' cache), so
    restoring more experts cannot evict experts.
    """

    def __init__(self, sizes: ExpertSizes, cache: ExpertCache, policy: RestorationPolicy, *,
                 system: SystemPreset | None = None, placement: str = "auto",
                 sensitivity: Callable[[int], LayerSensitivity | None] = lambda layer: None,
                 weight_variant: str = "lo", prefetch: bool = True, factor_cache: ExpertCache | None = None):
        if weight_variant not in ("lo", "fp16"):
            raise ValueError(f"weight_variant must be 'lo' or 'fp16', not {weight_variant!r}")
        self.sizes, self.cache, self.policy, self.system = sizes, cache, policy, system
        self.factor_cache = cache if factor_cache is None else factor_cache
        self.sensitivity = sensitivity
        self.weight_variant = weight_variant
        self.placer = Placer(sizes, system, placement)
        self.prefetch = prefetch and system is not None and system.ndp is not None
        self._contexts: dict[int, object] = {}
        self._credit = 0.0                                       # idle link bytes (see _prefetch)
        self._credit_cap = 2.0 * sizes.weight_bytes(weight_variant) if self.prefetch else 0.0
        self._decide_rows = getattr(policy, "decide_rows", None)   # the policy on lists, when it has that form
        self._weight_bytes = {}                                  # variant -> bytes, looked up per prefetch
        for v in ("lo", "hi", "fp16"):
            try:
                self._weight_bytes[v] = sizes.weight_bytes(v)
            except ValueError:
                pass
        self._smallest_fetch = min(sizes.weight_bytes(v) for v in ("lo", "hi", "fp16")
                                   if v != "hi" or sizes.hi_fmt is not None) if sizes.fmt else sizes.weight_bytes("fp16")

    def _context(self, layer: int):
        ctx = self._contexts.get(layer)
        if ctx is None:
            ctx = self._contexts[layer] = restoration_context(self.sizes, self.sensitivity(layer), self.cache, layer,
                                                              factor_cache=self.factor_cache)
        return ctx

    def plan(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> LayerPlan:
        """The whole plan of a layer: `finish(decide(...))`."""
        return self.finish(self.decide(layer, ids, weights))

    def decide(self, layer: int, ids: torch.Tensor, weights: torch.Tensor,
               policy: RestorationPolicy | None = None) -> LayerDecision:
        """What the layer's launch waits for: the restoration, the expert tasks and where they
        run. Reads the caches and changes nothing in them (`finish` does, in the same order).
        The hot path of the runtime: plain loops over Python lists, one tolist() per tensor.
        `policy`: decide with this one instead (a copy, for a guess that must not advance a random
        policy)."""
        ctx = self._contexts.get(layer)
        if ctx is None:
            ctx = self._context(layer)
        id_rows = ids.tolist()
        if policy is None:
            policy, decide_rows = self.policy, self._decide_rows
        else:
            decide_rows = getattr(policy, "decide_rows", None)
        restoration = (decide_rows(id_rows, weights, ctx) if decide_rows is not None
                       else policy.decide(ids, weights, ctx))
        lo = self.weight_variant
        compensable = lo != "fp16"
        entries, fentries = self.cache.entries, self.factor_cache.entries
        if len(id_rows) == 1 and len(set(id_rows[0])) == len(id_rows[0]) <= len(_SLOT_TUPLES):
            # One token, distinct experts (batch-1 decode): one task per slot, in slot order (the
            # order grouping gives), without grouping.
            cands, sigs = [], []
            for s, (e, r, hi) in enumerate(zip(id_rows[0], restoration.ranks[0], restoration.hi[0])):
                if hi:
                    variant, r = "hi", 0
                else:
                    variant = lo
                    if not compensable:
                        r = 0
                if r:
                    f = fentries.get((layer, e, "factors"))
                    cr = f[1] if f is not None else 0
                    sig = (variant, 1, r, (layer, e, variant) in entries, cr if cr < r else r)
                else:
                    sig = (variant, 1, 0, (layer, e, variant) in entries, 0)
                sigs.append(sig)
                cands.append(_new(Candidate, (e, *sig)))
            choices, usages, load = self.placer.place(cands, with_load=self.prefetch, key=tuple(sigs))
            one = _SLOT_TUPLES
            tasks = tuple([_new(ExpertTask, (c[0], c[1], _TOKEN_0, one[s], (c[3],), ch[0], ch[1] if c[3] else None,
                                             ch[2], ch[3]))
                           for s, (c, ch) in enumerate(zip(cands, choices))])
            return _new(LayerDecision, (layer, id_rows, weights, restoration, tasks, cands, choices, usages, load))
        groups: dict[tuple[int, str], tuple[list[int], list[int], list[int]]] = {}
        for t, (row, ranks, his) in enumerate(zip(id_rows, restoration.ranks, restoration.hi)):
            for s, e in enumerate(row):
                if his[s]:
                    key, r = (e, "hi"), 0
                else:
                    key, r = (e, lo), ranks[s] if compensable else 0
                g = groups.get(key)
                if g is None:
                    groups[key] = ([t], [s], [r])
                else:
                    g[0].append(t)
                    g[1].append(s)
                    g[2].append(r)
        cands = []
        for (e, variant), (toks, _, ranks) in groups.items():
            rank = max(ranks)
            cached = (layer, e, variant) in entries
            if rank:
                # A cached rank above the task's counts as the task's: the same choice, and the
                # placer sees fewer distinct candidates.
                f = fentries.get((layer, e, "factors"))
                cr = f[1] if f is not None else 0
                cands.append(_new(Candidate, (e, variant, len(toks), rank, cached, cr if cr < rank else rank)))
            else:
                cands.append(_new(Candidate, (e, variant, len(toks), 0, cached, 0)))
        choices, usages, load = self.placer.place(cands, with_load=self.prefetch)
        tasks = tuple([_new(ExpertTask, (c.expert, c.variant, tuple(toks), tuple(slots), tuple(ranks), ch.gemm_unit,
                                         ch.comp_unit if c.comp_rank else None, ch.fetch_weights,
                                         ch.fetch_factor_ranks))
                       for (toks, slots, ranks), c, ch in zip(groups.values(), cands, choices)])
        return _new(LayerDecision, (layer, id_rows, weights, restoration, tasks, cands, choices, usages, load))

    def finish(self, d: LayerDecision) -> LayerPlan:
        """The cache's side of a decided layer, which can run while the layer executes: the
        counted accesses (hits, recency, frequency), admitting what was fetched (never evicting
        what this layer uses on the GPU), prefetches with idle link time; then the plan."""
        layer, cands, choices = d.layer, d.cands, d.choices
        cache, fcache = self.cache, self.factor_cache
        keys, ranks, fkeys, franks = [], [], [], []
        shared = fcache is cache
        for c in cands:
            keys.append((layer, c[0], c[1]))
            ranks.append(0)
            if c[3]:
                if shared:
                    keys.append((layer, c[0], "factors"))
                    ranks.append(c[3])
                else:
                    fkeys.append((layer, c[0], "factors"))
                    franks.append(c[3])
        cache.lookup_all(keys, ranks)
        if fkeys:
            fcache.lookup_all(fkeys, franks)
        protect = None
        evictions: list[CacheKey] = []
        for c, ch in zip(cands, choices):
            if ch[2] or ch[3]:
                if protect is None:
                    protect = self._protect(layer, cands, choices)
                if ch.fetch_weights:
                    evictions += cache.insert((layer, c.expert, c.variant), self._weight_bytes[c.variant],
                                              protect=protect)[1]
                if ch.fetch_factor_ranks:
                    evictions += fcache.insert((layer, c.expert, "factors"), c.comp_rank * self.sizes.gpu_rank_bytes,
                                              rank=c.comp_rank, protect=protect)[1]
        prefetches, usages = (), d.usages
        if self.prefetch:
            prefetches, fill = self._prefetch(layer, cands, choices, d.load, protect, evictions)
            if fill is not None:
                usages.append(fill)
        plan = _new_plan(LayerPlan)
        plan.__dict__.update(layer=layer, ids=d.id_rows, weights_tensor=d.weights, restoration=d.restoration,
                             tasks=d.tasks, prefetches=prefetches, evictions=tuple(evictions), task_usage=tuple(usages),
                             time_model=self.placer.time_model)
        return plan

    @staticmethod
    def _protect(layer: int, cands, choices) -> frozenset:
        keys = []
        for c, ch in zip(cands, choices):
            if ch.gemm_unit == "gpu":
                keys.append((layer, c.expert, c.variant))
            if ch.comp_unit == "gpu":
                keys.append((layer, c.expert, "factors"))
        return frozenset(keys)

    def _prefetch(self, layer, cands, choices, load: list[float], protect, evictions
                  ) -> tuple[tuple[CacheKey, ...], Usage | None]:
        """Fetch NDP-run experts into the GPU cache with link time that would otherwise idle.

        The layer lasts as long as its busiest resource; the link towards the GPU has the rest.
        That idle time accrues as credit (a background copy runs on across layers, capped at two
        experts' bytes) and an expert is fetched once the credit covers it."""
        idle = self.placer.time_model.link_bytes(max(load[:5]) - load[0])
        credit = self._credit = min(self._credit + idle, self._credit_cap)
        if credit < self._smallest_fetch:
            return (), None
        fill, out = Usage(), []
        on_ndp = [(c, ch) for c, ch in zip(cands, choices) if ch.gemm_unit == "ndp"]
        if len(on_ndp) > 1:
            on_ndp.sort(key=lambda p: -p[0].tokens)
        weight_bytes = self._weight_bytes
        for c, ch in on_ndp:
            nbytes = weight_bytes[c.variant]
            if nbytes > credit:
                continue
            if protect is None:
                protect = self._protect(layer, cands, choices)
            admitted, ev = self.cache.insert((layer, c.expert, c.variant), nbytes, protect=protect)
            if admitted:
                credit -= nbytes
                fill.link["prefetch"] += nbytes
                evictions += ev
                out.append((layer, c.expert, c.variant))
        self._credit = credit
        return tuple(out), fill
