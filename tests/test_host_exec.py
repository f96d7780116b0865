"""Plans executed on the golden backends equal the golden references.

- GPU path (float32, fp16 factors from the store) == moe_forward_quant on the same stored bytes.
- NDP path == an independent int8-activation reference: the same dequantized weights and int8
  factors in float64, with activations rounded to per-token int8 where the NDP sees them (x, h,
  B x). The NDP computes the same sums exactly in integers, so only float32 rounding differs.
- NDP path vs moe_forward_quant (float activations): bounded by the int8 activation error.
"""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from ndpmoe.host.backends import TorchGpuBackend
from ndpmoe.host.cache import ExpertCache
from ndpmoe.host.execute import LayerExecutor
from ndpmoe.host.ndp import GoldenNdpBackend, NdpDriver
from ndpmoe.host.plan import LayerPlanner, check_plan
from ndpmoe.host.policy import BudgetedPolicy, HobbitTopHi, TopN
from ndpmoe.host.presets import get_system
from ndpmoe.host.sizes import ExpertSizes
from ndpmoe.model.contract import Descriptor, act_row_len
from ndpmoe.model.moe import route
from ndpmoe.model.moe_quant import moe_forward_quant
from ndpmoe.model.ndp_golden import quantize_activations

from host_block import NDP_CFG, make_store

SYSTEM = get_system("gpu-ndp")


@pytest.fixture(scope="module")
def layer(tmp_path_factory):
    cfg, blocks, x, store = make_store(tmp_path_factory.mktemp("store"))
    w = blocks[0][0]
    ids, wts = route(x, w.router, cfg)
    return cfg, w, x, store, (ids, wts)


def _execute(store, x, routing, policy, placement, cache=None):
    cache = cache or ExpertCache(1 << 22)
    planner = LayerPlanner(store.sizes(NDP_CFG), cache, policy, system=SYSTEM, placement=placement,
                           sensitivity=store.sensitivity, prefetch=False)
    plan = planner.plan(0, *routing)
    check_plan(plan)
    ex = LayerExecutor(store, TorchGpuBackend("cpu"), cache, NdpDriver(GoldenNdpBackend(NDP_CFG, 1 << 22)))
    ex.place_layer(0)
    y, rec = ex.run(plan, x)
    return plan, y, rec


def _fake_int8(v):
    q, s = quantize_activations(v.float())
    return q.double() * s.double()[:, None]


def int8_reference(store, x, plan):
    """Independent float64 model of the NDP path of a plan (all GEMMs and compensation on NDP)."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    pad = store.sizes().padded_rank
    for t, (row_ids, row_w) in enumerate(zip(plan.ids, plan.weights)):
        for s, (e, wt) in enumerate(zip(row_ids, row_w)):
            hi, rank = plan.restoration.hi[t][s], plan.restoration.ranks[t][s]
            variant = "hi" if hi else "lo"
            wm = {m: store.matrix(0, e, m, variant).dequantize(torch.float64) for m in ("w1", "w3", "w2")}

            def linear(m, v):
                vq = _fake_int8(v)
                y = vq @ wm[m].t()
                if rank and not hi:
                    f = store.factors_int8(0, e, m)
                    bx = vq @ f.B_q.dequantize(torch.float64)[:rank].t()
                    bx_pad = torch.zeros(1, pad, dtype=torch.float64)
                    bx_pad[:, :rank] = bx
                    y = y + _fake_int8(bx_pad) @ f.A_q.dequantize(torch.float64).t()
                return y.float()

            xt = x[t:t + 1].float()
            h = F.silu(linear("w1", xt)) * linear("w3", xt)
            out[t] += wt * linear("w2", h).double()[0]
    return out.float()


@pytest.mark.parametrize("policy", [TopN(1), TopN(2), BudgetedPolicy(20_000)], ids=lambda p: p.name)
def test_all_gpu_plan_equals_golden_layer2(layer, policy):
    cfg, w, x, store, routing = layer
    plan, y, rec = _execute(store, x, routing, policy, "all-gpu")
    ref = moe_forward_quant(x, store.quantized_moe(0, w, cfg), plan.restoration.restore_tensor(),
                            plan.restoration.hi_tensor(), routing=routing)
    # Same float32 math on the same stored weights and fp16 factors; only the order of the
    # combine's additions and the masked-rank matmul shapes differ.
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-6), float((y - ref).abs().max())
    assert rec.unplanned_uploads == 0 and not rec.ndp_descriptors


@pytest.mark.parametrize("policy", [TopN(1), BudgetedPolicy(20_000), HobbitTopHi(1)], ids=lambda p: p.name)
def test_all_ndp_plan_equals_int8_reference(layer, policy):
    cfg, w, x, store, routing = layer
    plan, y, rec = _execute(store, x, routing, policy, "all-ndp")
    assert all(t.gemm_unit == "ndp" for t in plan.tasks)
    ref = int8_reference(store, x, plan)
    # Integer sums on the NDP vs float64 sums here agree to ~1e-15 before the float32 cast.
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-6), float((y - ref).abs().max())


@pytest.mark.parametrize("placement", ["all-ndp", "ndp-gemm", "ndp-comp"])
def test_ndp_placements_near_golden_layer2(layer, placement):
    """Against float activations: x, h (and B x) are rounded to per-token int8 (step amax / 127,
    about 0.8 % of the RMS of a Gaussian row at each rounding point) and the NDP's factors are
    int8: measured 1.5 % relative error on this block; bound 4 %."""
    cfg, w, x, store, routing = layer
    plan, y, rec = _execute(store, x, routing, TopN(2), placement)
    ref = moe_forward_quant(x, store.quantized_moe(0, w, cfg), plan.restoration.restore_tensor(), routing=routing)
    rel = float((y - ref).norm() / ref.norm())
    assert rel < 0.04, rel


def test_rank_zero_tokens_inside_a_compensated_task(layer):
    """Per-token ranks inside one expert task (some tokens 0) are honoured on both units."""
    cfg, w, x, store, routing = layer
    plan_g, y_g, _ = _execute(store, x, routing, TopN(1), "all-gpu")
    plan_n, y_n, _ = _execute(store, x, routing, TopN(1), "ndp-comp")
    mixed = [t for t in plan_n.tasks if t.comp_unit and 0 in t.ranks]
    assert mixed, "the routing should put restored and unrestored tokens in one task"
    ref = moe_forward_quant(x, store.quantized_moe(0, w, cfg), plan_g.restoration.restore_tensor(), routing=routing)
    assert torch.allclose(y_g, ref, rtol=1e-5, atol=1e-6)
    assert float((y_n - ref).norm() / ref.norm()) < 0.01       # only B x and factors are int8 here


def test_cache_carries_over_layers_without_unplanned_uploads(tmp_path):
    cfg, blocks, x, store = make_store(tmp_path, layers=2, seed=3)
    sizes = store.sizes()
    # Room for 8 of the 12 experts of the two layers and some factors: hits, misses and evictions.
    cache = ExpertCache(8 * sizes.weight_bytes("lo") + 2 * sizes.factor_bytes_fp16(sizes.stored_rank), "lfu")
    gpu = TorchGpuBackend("cpu")
    ex = LayerExecutor(store, gpu, cache, NdpDriver(GoldenNdpBackend(NDP_CFG, 1 << 22)))
    for l in range(2):
        ex.place_layer(l)
    planner = LayerPlanner(store.sizes(NDP_CFG), cache, TopN(1), system=SYSTEM, sensitivity=store.sensitivity)
    for step in range(3):
        for l, (w, _, _) in enumerate(blocks):
            xs = x[step * 2:(step + 1) * 2]
            routing = route(xs, w.router, cfg)
            plan = planner.plan(l, *routing)
            y, rec = ex.run(plan, xs)
            assert rec.unplanned_uploads == 0
            assert set(gpu.resident) <= set(cache.keys())
    assert cache.stats.hits["lo"] > 0 and cache.stats.evictions["lo"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_backend_matches_cpu(layer):
    cfg, w, x, store, routing = layer
    planner = LayerPlanner(store.sizes(), ExpertCache(1 << 22), TopN(1), placement="all-gpu")
    plan = planner.plan(0, *routing)
    cpu = LayerExecutor(store, TorchGpuBackend("cpu"), ExpertCache(1 << 22)).run(plan, x)[0]
    cuda = LayerExecutor(store, TorchGpuBackend("cuda"), ExpertCache(1 << 22)).run(plan, x)[0]
    assert torch.allclose(cpu, cuda, rtol=1e-4, atol=1e-5)


def test_executor_issues_only_what_ndp_steps_yields(layer, monkeypatch):
    """The executor walks ndp_steps and the driver refuses a step its data does not make: a model
    that drifted from what runs fails here, before anything reaches the unit."""
    cfg, w, x, store, routing = layer
    real = ExpertSizes.ndp_steps

    def drifted(self, *args, **kwargs):
        steps = list(real(self, *args, **kwargs))
        for i, s in enumerate(steps):
            if s.kind == "w":
                steps[i] = replace(s, descriptor=replace(s.descriptor, rows=s.descriptor.rows - 1))
        return steps

    monkeypatch.setattr(ExpertSizes, "ndp_steps", drifted)
    with pytest.raises(ValueError, match=r"makes the descriptor MATMUL .* but the step to issue is MATMUL"):
        _execute(store, x, routing, TopN(1), "all-ndp")


def test_driver_refuses_a_load_step_before_writing_anything():
    driver = NdpDriver(GoldenNdpBackend(NDP_CFG, 1 << 20))
    x_q = torch.ones(2, 64, dtype=torch.int8)
    wrong = Descriptor.load_act(tokens=3, in_features=act_row_len(64, NDP_CFG.word_bits))
    with pytest.raises(ValueError, match=r"activations \[2, 64\] makes the descriptor LOAD_ACT .*tokens=2"):
        driver.load(x_q, step=wrong)
    assert not any(driver.backend.unit.mem) and not driver.log and driver.backend.unit.act is None
    driver.load(x_q, step=replace(wrong, tokens=2))
    assert [d.descriptor.at(0) for d in driver.log] == [replace(wrong, tokens=2)]
