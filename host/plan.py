"""A layer's plan: router output -> restoration decision -> expert tasks with placement, cache
actions and their bytes. The same plan runs on any backend (host/execute.py) and drives the
performance model (host/perf_model.py) and the traces (host/trace.py).

Legend: T tokens, K top-k, E experts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .cache import CacheKey, ExpertCache
from .perf_model import LayerTime, Usage, layer_time, weight_link_kind
from .placement import Candidate, Placer
from .policy import Restoration, RestorationPolicy, restoration_context
from .presets import SystemPreset
from .sensitivity import LayerSensitivity
from .sizes import ExpertSizes


@dataclass(frozen=True)
class ExpertTask:
    """All selected (token, slot) pairs of one expert variant, and where their work runs."""
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
    ids: tuple[tuple[int, ...], ...]          # [T][K], slots by router weight, descending
    weights: tuple[tuple[float, ...], ...]
    restoration: Restoration
    tasks: tuple[ExpertTask, ...]
    prefetches: tuple[CacheKey, ...]          # fetched into the GPU cache with idle link time
    evictions: tuple[CacheKey, ...]
    usage: Usage
    time: LayerTime | None                    # None without a system preset

    @property
    def tokens(self) -> int:
        return len(self.ids)


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
    """

    def __init__(self, sizes: ExpertSizes, cache: ExpertCache, policy: RestorationPolicy, *,
                 system: SystemPreset | None = None, placement: str = "auto",
                 sensitivity: Callable[[int], LayerSensitivity | None] = lambda layer: None,
                 weight_variant: str = "lo", prefetch: bool = True):
        if weight_variant not in ("lo", "fp16"):
            raise ValueError(f"weight_variant must be 'lo' or 'fp16', not {weight_variant!r}")
        self.sizes, self.cache, self.policy, self.system = sizes, cache, policy, system
        self.sensitivity = sensitivity
        self.weight_variant = weight_variant
        self.placer = Placer(sizes, system, placement)
        self.prefetch = prefetch and system is not None and system.ndp is not None

    def plan(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> LayerPlan:
        ctx = restoration_context(self.sizes, self.sensitivity(layer), self.cache, layer)
        restoration = self.policy.decide(ids, weights, ctx)
        id_rows = ids.tolist()
        groups: dict[tuple[int, str], list[list[int]]] = {}
        for t, (row, ranks, his) in enumerate(zip(id_rows, restoration.ranks, restoration.hi)):
            for s, (e, r, h) in enumerate(zip(row, ranks, his)):
                variant = "hi" if h else self.weight_variant
                g = groups.setdefault((e, variant), [[], [], []])
                g[0].append(t)
                g[1].append(s)
                g[2].append(0 if h or variant == "fp16" else r)
        cache, cands = self.cache, []
        for (e, variant), (toks, slots, ranks) in groups.items():
            rank = max(ranks)
            cached = cache.lookup((layer, e, variant))
            if rank:
                cache.lookup((layer, e, "factors"), rank)
            cands.append(Candidate(e, variant, len(toks), rank, cached, cache.cached_rank(layer, e)))
        choices = self.placer.place(cands)

        # Cache actions: admit what was fetched; never evict what this layer uses on the GPU.
        protect = frozenset((layer, c.expert, c.variant) for c, ch in zip(cands, choices) if ch.gemm_unit == "gpu")
        protect |= frozenset((layer, c.expert, "factors") for c, ch in zip(cands, choices) if ch.comp_unit == "gpu")
        evictions: list[CacheKey] = []
        usage = Usage()
        tasks = []
        for (key, (toks, slots, ranks)), c, ch in zip(groups.items(), cands, choices):
            if ch.fetch_weights:
                evictions += cache.insert((layer, c.expert, c.variant), self.sizes.weight_bytes(c.variant),
                                          protect=protect)[1]
            if ch.fetch_factor_ranks:
                evictions += cache.insert((layer, c.expert, "factors"), c.comp_rank * self.sizes.fp16_bytes_per_rank,
                                          rank=c.comp_rank, protect=protect)[1]
            usage.add(self.placer.usage(c, ch))
            tasks.append(ExpertTask(c.expert, c.variant, tuple(toks), tuple(slots), tuple(ranks),
                                    ch.gemm_unit, ch.comp_unit if c.comp_rank else None,
                                    ch.fetch_weights, ch.fetch_factor_ranks))
        prefetches = self._prefetch(layer, cands, choices, usage, protect, evictions) if self.prefetch else ()
        time = layer_time(usage, self.system) if self.system is not None else None
        return LayerPlan(layer, tuple(map(tuple, id_rows)), tuple(map(tuple, weights.tolist())), restoration,
                         tuple(tasks), prefetches, tuple(evictions), usage, time)

    def _prefetch(self, layer, cands, choices, usage: Usage, protect, evictions) -> tuple[CacheKey, ...]:
        """Fetch NDP-run experts into the GPU cache while the link would otherwise idle."""
        t = layer_time(usage, self.system)
        busy = max(t.link_s, t.ndp_s, t.gpu_s)
        bw = self.system.link.gbps * 1e9
        idle = busy * bw - (sum(usage.link.values()) - usage.link["act_to_ndp"])
        out = []
        for c, ch in sorted(zip(cands, choices), key=lambda p: -p[0].tokens):
            nbytes = self.sizes.weight_bytes(c.variant)
            if ch.gemm_unit != "ndp" or nbytes > idle:
                continue
            admitted, ev = self.cache.insert((layer, c.expert, c.variant), nbytes, protect=protect)
            if admitted:
                idle -= nbytes
                usage.link["prefetch"] += nbytes
                evictions += ev
                out.append((layer, c.expert, c.variant))
        return tuple(out)
