"""The fast planner decides exactly what the plain one (tests/plan_reference.py) decides: the same
restorations, tasks, placements, cache admissions, evictions and prefetches, layer after layer, on
OLMoE's expert shapes over a routing trace, for every kind of policy, with caches small enough to
evict (LFU aging often) and a separate factor pool."""
import pytest

from ndpmoe.host.cache import ExpertCache, LfuEviction, LruEviction
from ndpmoe.host.perf_model import Usage
from ndpmoe.host.placement import Placer
from ndpmoe.host.plan import LayerPlanner
from ndpmoe.host.policy import BudgetedPolicy, HobbitTopHi, RandomN, TopN
from ndpmoe.host.presets import get_system
from ndpmoe.host.routing_trace import synthetic_trace
from ndpmoe.host.sensitivity import assumed_sensitivity
from ndpmoe.host.sizes import ExpertSizes
from ndpmoe.model.contract import QuantFormat, get_config

from plan_reference import EagerLfu, PlainBudgeted, PlainPlanner

E, K, LAYERS, RANK = 64, 8, 3, 32
SIZES = ExpertSizes(2048, 1024, QuantFormat(3, 64, 256), QuantFormat(4, 64, 256), RANK, get_config("wide"))
FP16 = ExpertSizes(2048, 1024, None, None, 0, get_config("wide"))
SENS = assumed_sensitivity(E, RANK)
RANK_BYTES = RANK * SIZES.fp16_bytes_per_rank
POLICIES = {
    "none": lambda plain: TopN(0),
    "top-2": lambda plain: TopN(2),
    "top-1@r8": lambda plain: TopN(1, rank=8),
    "random-2": lambda plain: RandomN(2, seed=5),
    "hobbit": lambda plain: HobbitTopHi(1, 0.2),
    "budgeted-small": lambda plain: (PlainBudgeted if plain else BudgetedPolicy)(0.7 * RANK_BYTES),
    "budgeted-large": lambda plain: (PlainBudgeted if plain else BudgetedPolicy)(5 * RANK_BYTES),
    "budgeted-nohi": lambda plain: (PlainBudgeted if plain else BudgetedPolicy)(2 * RANK_BYTES, allow_hi=False),
}


def _fingerprint(plan):
    u = plan.usage
    return (plan.layer, plan.restoration, plan.tasks, plan.prefetches, plan.evictions, sorted(u.link.items()),
            u.ndp_descriptors, u.ndp_words, u.ndp_wall_cycles, u.gpu_flops, u.gpu_bytes, u.round_trips)


def _run(plain: bool, policy: str, system: str, eviction: str, batch: int, factor_pool: bool, variant: str = "lo"):
    sizes = FP16 if variant == "fp16" else SIZES
    expert = sizes.weight_bytes(variant)
    evict = (lambda: EagerLfu(age_every=40) if plain else LfuEviction(age_every=40)) if eviction == "lfu" else LruEviction
    cache = ExpertCache(40 * expert, evict())
    factors = ExpertCache(6 * RANK_BYTES, evict()) if factor_pool else None
    planner = (PlainPlanner if plain else LayerPlanner)(
        sizes, cache, POLICIES[policy](plain), system=get_system(system), sensitivity=lambda layer: SENS,
        weight_variant=variant, factor_cache=factors)
    trace = synthetic_trace(E, K, LAYERS, 24, seed=3)
    out = []
    for step in range(trace.tokens // batch):
        for layer in range(2 * LAYERS):
            rows = slice(step * batch, (step + 1) * batch)
            out.append(_fingerprint(planner.plan(layer, trace.ids[layer % LAYERS][rows],
                                                 trace.weights[layer % LAYERS][rows])))
    return out, cache.stats.to_json(), None if factors is None else factors.stats.to_json()


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("system, eviction, batch, factor_pool", [
    ("gpu-ndp", "lfu", 1, False), ("gpu-ndp", "lru", 3, True), ("gpu-only", "lfu", 2, True), ("gpu-ndp", "lru", 1, True)])
def test_fast_planner_decides_as_the_plain_one(policy, system, eviction, batch, factor_pool):
    fast = _run(False, policy, system, eviction, batch, factor_pool)
    plain = _run(True, policy, system, eviction, batch, factor_pool)
    assert sum(len(p[4]) for p in plain[0]) > 0, "the cache must be small enough to evict"
    assert fast == plain


def test_fast_planner_fp16_baseline():
    assert _run(False, "none", "gpu-ndp", "lru", 1, False, "fp16") == _run(True, "none", "gpu-ndp", "lru", 1, False, "fp16")


def test_decide_leaves_the_cache_alone():
    """decide() only reads the caches: counted accesses, admissions and evictions come in finish()."""
    cache = ExpertCache(40 * SIZES.weight_bytes("lo"), "lfu")
    planner = LayerPlanner(SIZES, cache, BudgetedPolicy(RANK_BYTES), system=get_system("gpu-ndp"),
                           sensitivity=lambda layer: SENS)
    trace = synthetic_trace(E, K, LAYERS, 4, seed=1)
    planner.plan(0, trace.ids[0][:1], trace.weights[0][:1])
    before = (cache.keys(), cache.stats.to_json(), dict(cache.eviction._count))
    decision = planner.decide(0, trace.ids[0][1:2], trace.weights[0][1:2])
    assert (cache.keys(), cache.stats.to_json(), dict(cache.eviction._count)) == before
    plan = planner.finish(decision)
    assert cache.stats.to_json() != before[1] and plan.tasks == decision.tasks


def test_placement_remembered_equals_weighed_afresh():
    """Placer.place remembers each sequence of candidates; a repeat gets the choices, usages and
    load that weighing it afresh gives, and lists the caller may extend without touching the memo."""
    placer = Placer(SIZES, get_system("gpu-ndp"))
    cache = ExpertCache(40 * SIZES.weight_bytes("lo"), "lfu")
    planner = LayerPlanner(SIZES, cache, TopN(3), system=get_system("gpu-ndp"))
    trace = synthetic_trace(E, K, LAYERS, 12, seed=2)
    seen = []
    for t in range(12):
        d = planner.decide(t % LAYERS, trace.ids[t % LAYERS][t:t + 1], trace.weights[t % LAYERS][t:t + 1])
        planner.finish(d)
        seen.append(d.cands)
    for cands in seen + seen:
        choices, usages, load = placer.place(cands, with_load=True)
        out, fresh_usages, fresh_load, _ = placer._place(cands)
        assert (choices, usages, load) == (list(out), list(fresh_usages), list(fresh_load))
        usages.append(Usage())
    assert len(placer._placed) <= len(seen)
