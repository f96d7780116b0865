"""The throughput model: a whole model's decode over a routing trace, modeled. Every layer of
every step is planned (policy, cache, placement, bytes) and its time read from the performance
model's TimeModel; no tensors move, and the plans are the ones the executor would run. Also
measures the planning cost itself.

Planning cost, CPU time measured per layer in two parts (host/plan.py): deciding (policy, tasks,
placement), which the layer's launch waits for, and finishing (the cache's bookkeeping, prefetch
choices), which runs while the layer executes. What is exposed: all of the deciding, and the part
of the finishing longer than the layer's modeled time (its experts plus one layer's resident
work). The median over decode steps of the exposed time is added to every step's modeled time:
the tokens per second include the planning that is not hidden.

A decode step of `batch` tokens visits the MoE layers in order; layer l of the model reads layer
l mod (trace layers) of the trace, tokens step*batch .. step*batch + batch - 1.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from .cache import ExpertCache
from .models import ModelSpec
from .perf_model import TimeModel
from .plan import LayerPlanner
from .policy import RestorationPolicy
from .presets import SystemPreset
from .routing_trace import RoutingTrace
from .sensitivity import LayerSensitivity
from .sizes import ExpertSizes
from .run_stats import RunStats, layer_stats


@dataclass(frozen=True)
class ModeledDecode:
    label: str
    meta: dict
    summary: dict                       # RunStats.summary(): bytes per token, time, tokens/s
    planning_us_per_token_layer: float          # exposed: deciding + finishing beyond the layer's time
    planning_total_us_per_token_layer: float    # deciding + finishing
    cache_hit_rate: float
    run: RunStats | None = None         # the per-layer figures, when kept


def model_decode(label: str, spec: ModelSpec, system: SystemPreset, sizes: ExpertSizes, policy: RestorationPolicy,
                 trace: RoutingTrace, *, cache_bytes: int, eviction: str = "lru", weight_variant: str = "lo",
                 batch: int = 1, placement: str = "auto", prefetch: bool = True,
                 sensitivity: LayerSensitivity | None = None, keep_layers: bool = False,
                 factor_cache_bytes: int = 0) -> ModeledDecode:
    """factor_cache_bytes > 0 splits that much off `cache_bytes` as a separate factor pool."""
    if trace.top_k != spec.top_k or trace.num_experts != spec.experts:
        raise ValueError(f"trace routes top-{trace.top_k} of {trace.num_experts} experts, model {spec.name!r} "
                         f"top-{spec.top_k} of {spec.experts}")
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= trace.tokens:
        raise ValueError(f"batch must be an integer in [1, trace tokens {trace.tokens}], not {batch!r}")
    if not 0 <= factor_cache_bytes < cache_bytes:
        raise ValueError(f"factor_cache_bytes must be in [0, cache_bytes {cache_bytes}), not {factor_cache_bytes}")
    cache = ExpertCache(cache_bytes - factor_cache_bytes, eviction)
    factor_cache = ExpertCache(factor_cache_bytes, eviction) if factor_cache_bytes else None
    planner = LayerPlanner(sizes, cache, policy, system=system, placement=placement,
                           sensitivity=lambda layer: sensitivity, weight_variant=weight_variant, prefetch=prefetch,
                           factor_cache=factor_cache)
    run = RunStats(meta={"label": label, "model": spec.name, "system": system.name, "policy": policy.name,
                         "eviction": eviction, "cache_bytes": cache_bytes, "factor_cache_bytes": factor_cache_bytes,
                         "batch": batch,
                         "trace": trace.source, "ndp_cost": system.ndp.cost.source if system.ndp else None})
    steps = trace.tokens // batch
    cycles_source = system.ndp.cost.source if system.ndp else "no NDP"
    resident_s = TimeModel(system).resident_seconds(spec.resident_params_per_layer, batch)
    exposed_cpu, total_cpu = [], []
    slices = [[(trace.ids[l][s * batch:(s + 1) * batch], trace.weights[l][s * batch:(s + 1) * batch])
               for s in range(steps)] for l in range(trace.layers)]
    clock = time.process_time    # CPU time: wall time on a shared machine measures the neighbours
    for step in range(steps):
        plans, finishing = [], []
        deciding = 0.0
        t0 = clock()
        for layer in range(spec.moe_layers):
            decision = planner.decide(layer, *slices[layer % trace.layers][step])
            t1 = clock()
            plans.append(planner.finish(decision))
            t2 = clock()
            deciding += t1 - t0
            finishing.append(t2 - t1)
            t0 = t2
        exposed = deciding
        for plan, f in zip(plans, finishing):
            window = (plan.time.total_s if plan.time is not None else 0.0) + resident_s
            exposed += f - window if f > window else 0.0
        exposed_cpu.append(exposed)
        total_cpu.append(deciding + sum(finishing))
        for plan in plans:
            run.add(layer_stats(plan, cycles_source))
    run.tokens = steps * batch
    run.extra_time_s = steps * spec.layers * resident_s
    per = batch * spec.moe_layers
    if exposed_cpu:
        run.planning_time_s = steps * statistics.median(exposed_cpu)
        planning_us, planning_total_us = (statistics.median(exposed_cpu) / per * 1e6,
                                          statistics.median(total_cpu) / per * 1e6)
    else:
        planning_us = planning_total_us = 0.0
    return ModeledDecode(label, run.meta, run.summary(), planning_us, planning_total_us,
                         cache.stats.hit_rate(weight_variant), run if keep_layers else None)
