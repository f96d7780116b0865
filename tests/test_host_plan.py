"""Plans: valid for every policy and placement; bytes in the layer statistics equal bytes computed from the
contract's sizes and equal what the backends actually moved; the NDP descriptors issued are the
ones the cost model counted."""
import math
from dataclasses import replace

import pytest
import torch

from ndpmoe.host.backends import TorchGpuBackend
from ndpmoe.host.cache import ExpertCache
from ndpmoe.host.execute import LayerExecutor
from ndpmoe.host.ndp import GoldenNdpBackend, NdpDriver
from ndpmoe.host.perf_model import LayerTime, ResourceSeconds, layer_time
from ndpmoe.host.plan import LayerPlanner, check_plan
from ndpmoe.host.policy import BudgetedPolicy, HobbitTopHi, RandomN, TopN
from ndpmoe.host.presets import get_system
from ndpmoe.host.run_stats import RunStats, layer_stats
from ndpmoe.host.sensitivity import assumed_sensitivity
from ndpmoe.host.sizes import ExpertSizes
from ndpmoe.model.contract import QuantFormat, act_row_len, fp16_factor_bytes, output_struct
from ndpmoe.model.moe import route

from host_block import D, E, FMT, HI_FMT, I, K, NDP_CFG, RANK, make_store

SYSTEM = get_system("gpu-ndp")
SHAPES = {"w1": (I, D), "w3": (I, D), "w2": (D, I)}
POLICIES = [TopN(0), TopN(2), RandomN(1), HobbitTopHi(1), BudgetedPolicy(30_000)]


def _routing(t, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)])
    w = torch.softmax(torch.randn(t, K, generator=g), -1).sort(-1, descending=True).values
    return ids, w


@pytest.mark.parametrize("placement", ["auto", "all-gpu", "all-ndp", "ndp-gemm", "ndp-comp"])
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_plans_are_valid(policy, placement):
    sizes = ExpertSizes(D, I, FMT, HI_FMT, RANK, NDP_CFG)
    cache = ExpertCache(3 * sizes.weight_bytes("lo"), "lfu")
    planner = LayerPlanner(sizes, cache, policy, system=SYSTEM, placement=placement,
                           sensitivity=lambda layer: assumed_sensitivity(E, RANK))
    for seed in range(6):
        ids, w = _routing(1 + seed, seed)
        plan = planner.plan(seed % 2, ids, w)
        check_plan(plan)
        # Compensation exactly on the chosen set: every slot with a rank and no copy.
        chosen = {(t, s) for t in range(plan.tokens) for s in range(K)
                  if plan.restoration.ranks[t][s] and not plan.restoration.hi[t][s]}
        compensated = {(t, s) for task in plan.tasks for t, s, r in zip(task.tokens, task.slots, task.ranks) if r}
        assert compensated == chosen
        assert all((task.comp_unit is not None) == any(task.ranks) for task in plan.tasks)


def test_check_plan_catches_broken_plans():
    sizes = ExpertSizes(D, I, FMT, HI_FMT, RANK, NDP_CFG)
    planner = LayerPlanner(sizes, ExpertCache(1 << 22), TopN(1), system=SYSTEM)
    plan = planner.plan(0, *_routing(3, 0))
    t0 = plan.tasks[0]
    dup = replace(plan, tasks=plan.tasks + (t0,))
    with pytest.raises(ValueError, match="computed twice"):
        check_plan(dup)
    with pytest.raises(ValueError, match="not computed"):
        check_plan(replace(plan, tasks=plan.tasks[1:]))
    wrong_rank = t0._replace(ranks=tuple(r + 1 for r in t0.ranks))
    with pytest.raises(ValueError, match="gets rank"):
        check_plan(replace(plan, tasks=(wrong_rank,) + plan.tasks[1:]))


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("s"))


def _contract_link_bytes(plan) -> dict[str, int]:
    """Link bytes of a plan recomputed from model.contract alone (not host/sizes.py)."""
    out = {"weights": 0, "hi_weights": 0, "factors": 0, "act_to_ndp": 0, "results_from_ndp": 0}
    rec = math.ceil(output_struct(NDP_CFG.t_max).width / 8)
    pad_rank = -(-RANK // 32) * 32
    for task in plan.tasks:
        fmt = HI_FMT if task.variant == "hi" else FMT
        if task.fetch_weights:
            out["hi_weights" if task.variant == "hi" else "weights"] += sum(fmt.matrix_bytes(*s) for s in SHAPES.values())
        if task.comp_unit == "gpu":
            out["factors"] += sum(fp16_factor_bytes(o, i, task.fetch_factor_ranks) for o, i in SHAPES.values())
        n, r = len(task.tokens), task.comp_rank if task.comp_unit == "ndp" else 0
        if task.gemm_unit == "ndp" or r:
            # per token: x and h down; w1, w3, w2 rows up (GEMM); B rows, B x down, A rows up (comp)
            down = act_row_len(D, 128) + act_row_len(I, 128) + (3 * act_row_len(pad_rank, 128) if r else 0)
            up = (2 * I + D if task.gemm_unit == "ndp" else 0) + (3 * r + 2 * I + D if r else 0)
            out["act_to_ndp"] += n * down
            out["results_from_ndp"] += n * up * rec
    return out


@pytest.mark.parametrize("placement, policy", [
    ("all-gpu", BudgetedPolicy(25_000)), ("all-ndp", TopN(2)), ("all-ndp", HobbitTopHi(1)),
    ("ndp-gemm", TopN(1)), ("ndp-comp", TopN(2))], ids=lambda v: getattr(v, "name", v))
def test_stats_bytes_equal_contract_sizes_and_what_moved(stored, placement, policy):
    cfg, blocks, x, store = stored
    w = blocks[0][0]
    ids, wts = route(x, w.router, cfg)
    cache = ExpertCache(1 << 22)
    planner = LayerPlanner(store.sizes(NDP_CFG), cache, policy, system=SYSTEM,
                           placement=placement, sensitivity=store.sensitivity, prefetch=False)
    plan = planner.plan(0, ids, wts)
    ndp = NdpDriver(GoldenNdpBackend(NDP_CFG, 1 << 22))
    ex = LayerExecutor(store, TorchGpuBackend(), cache, ndp)
    ex.place_layer(0)
    _, rec = ex.run(plan, x)
    stats = layer_stats(plan, "test", rec)
    expect = _contract_link_bytes(plan)
    for kind, value in expect.items():
        assert stats.link_bytes[kind] == value, kind
        assert rec.link_bytes.get(kind, 0) == value, kind          # what the backends moved
    # NDP: the descriptors issued are those the cost model counted, word for word.
    steps = [s for t in plan.tasks for s in store.sizes(NDP_CFG).ndp_steps(
        t.variant, len(t.tokens), t.gemm_unit == "ndp", t.comp_rank if t.comp_unit == "ndp" else 0)]
    issued = rec.ndp_descriptors
    assert [(s.descriptor, s.words) for s in steps] == [(d.descriptor.at(0), d.words) for d in issued]
    assert stats.ndp["words"] == sum(d.words for d in issued) == ndp.backend.counters()["words_read"]
    if placement != "all-gpu":
        assert issued


def test_run_stats_json(tmp_path):
    sizes = ExpertSizes(D, I, FMT, HI_FMT, RANK, NDP_CFG)
    planner = LayerPlanner(sizes, ExpertCache(1 << 22), TopN(1), system=SYSTEM)
    run = RunStats(meta={"test": True})
    for layer in range(3):
        run.add(layer_stats(planner.plan(layer, *_routing(2, layer)), "test"))
    run.tokens = 2
    run.write(tmp_path / "run.json")
    import json
    data = json.loads((tmp_path / "run.json").read_text())
    assert len(data["layers"]) == 3 and data["summary"]["tokens"] == 2
    assert data["summary"]["modeled_time_s"] > 0 and "weights" in data["layers"][0]["link_bytes"]


def test_placer_weighs_the_time_the_layer_is_modeled_at():
    """The placer adds up per-task resource seconds; the layer's modeled time comes from the summed
    work. Both are the one TimeModel, and it is linear in the work, so the two agree: the placer
    balances the very time the model reports."""
    sizes = ExpertSizes(D, I, FMT, HI_FMT, RANK, NDP_CFG)
    planner = LayerPlanner(sizes, ExpertCache(3 * sizes.weight_bytes("lo")), TopN(2), system=SYSTEM,
                           sensitivity=lambda layer: assumed_sensitivity(E, RANK))
    model = planner.placer.time_model
    for seed in range(4):
        plan = planner.plan(seed, *_routing(1 + 2 * seed, seed))
        per_task = [model.seconds(u) for u in plan.task_usage]
        summed = ResourceSeconds(*(sum(s[r] for s in per_task) for r in range(5)),
                                 max((s.latency for s in per_task), default=0.0))
        assert LayerTime.of(summed).total_s == pytest.approx(plan.time.total_s, rel=1e-12)
        assert plan.time == model.layer_time(plan.usage) == layer_time(plan.usage, SYSTEM)
