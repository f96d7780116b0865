"""Golden layer 2: Top-n extremes and compensation behaviour on a small random MoE block."""
import pytest
import torch

from ndpmoe.model.contract import QuantFormat
from ndpmoe.model.moe import MoEWeights, RouterConfig, moe_forward
from ndpmoe.model.moe_quant import (FULL_RANK, QuantizedExpert, check_block_fits, moe_forward_quant, quantize_moe,
                                    topn_restore)


def _block(seed=0, e=6, d=128, i=64):
    g = torch.Generator().manual_seed(seed)
    w = MoEWeights(torch.randn(e, d, generator=g) * 0.05, torch.randn(e, i, d, generator=g) * 0.1,
                   torch.randn(e, i, d, generator=g) * 0.1, torch.randn(e, d, i, generator=g) * 0.1)
    calib = torch.randn(512, d, generator=g)
    x = torch.randn(32, d, generator=g)
    return w, calib, x


@pytest.fixture(scope="module")
def block():
    w, calib, x = _block()
    cfg = RouterConfig(top_k=4)
    qm = quantize_moe(w, cfg, QuantFormat(3, 64), rank=16, calib=calib)
    return w, cfg, qm, x


def test_n_zero_is_plain_low_bit(block):
    w, cfg, qm, x = block
    plain = moe_forward_quant(x, qm)
    assert torch.equal(moe_forward_quant(x, qm, topn_restore(32, 4, 0)), plain)


def test_n_equal_k_compensates_everything(block):
    w, cfg, qm, x = block
    full = moe_forward_quant(x, qm, topn_restore(32, 4, 4))
    everything = moe_forward_quant(x, qm, torch.full((32, 4), FULL_RANK))
    assert torch.equal(full, everything)
    # ... and it is what the compensated weights give, computed independently of the Top-n path.
    from ndpmoe.model.moe import expert_mlp, route, combine
    ids, wts = route(x, w.router, cfg)
    def comp_expert(e, xs, tok, slot):
        ex = qm.experts[e]
        ww = {n: ex.weight(n) + ex.comp[n].delta() for n in ("w1", "w3", "w2")}
        return expert_mlp(xs, ww["w1"], ww["w3"], ww["w2"])
    ref = combine(x, ids, wts, comp_expert)
    # Same math in a different association order (A(Bx) vs (AB)x): float32 rounding only.
    assert torch.allclose(full, ref, rtol=1e-4, atol=1e-5)


def test_error_falls_with_n(block):
    w, cfg, qm, x = block
    ref = moe_forward(x, w, cfg)
    errs = [float((moe_forward_quant(x, qm, topn_restore(32, 4, n)) - ref).norm()) for n in range(5)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


def test_topn_n_out_of_range():
    with pytest.raises(ValueError, match="n must be in"):
        topn_restore(4, 2, 3)


def test_aware_compensation_needs_calibration():
    w, calib, x = _block(e=2)
    with pytest.raises(ValueError, match="calibration"):
        quantize_moe(w, RouterConfig(top_k=1), QuantFormat(2, 64), rank=4)


def test_masked_block_matches_the_per_expert_reference():
    """The study's all-experts-at-once block equals the reference loop for any mix of plain,
    restored (at several ranks, past the stored one too) and higher-precision slots."""
    from ndpmoe.model.moe_quant_masked import MaskedQuantMoE
    from ndpmoe.model.moe import route

    w, calib, _ = _block(seed=3, e=8)
    g = torch.Generator().manual_seed(4)
    w = MoEWeights(w.router, w.w1, w.w3, w.w2, shared_w1=torch.randn(48, 128, generator=g) * 0.1,
                   shared_w3=torch.randn(48, 128, generator=g) * 0.1, shared_w2=torch.randn(128, 48, generator=g) * 0.1)
    cfg = RouterConfig(top_k=4)
    qm = quantize_moe(w, cfg, QuantFormat(3, 64), rank=6, fit="aware", calib=calib)
    hi = quantize_moe(w, cfg, QuantFormat(8, 64))
    qm = type(qm)(qm.fmt, qm.experts, qm.router, qm.cfg, qm.float_weights, hi.experts)
    x = torch.randn(40, 128, generator=g)
    routing = route(x, qm.router, cfg)
    restore = torch.tensor([0, 2, 6, FULL_RANK])[torch.randint(0, 4, (40, 4), generator=g)]
    his = torch.rand(40, 4, generator=g) < 0.25
    ref = moe_forward_quant(x, qm, restore, his, routing=routing)
    got = MaskedQuantMoE(qm)(x, restore, his, routing)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5), float((got - ref).abs().max())
    plain = torch.zeros(40, 4, dtype=torch.long)
    none = torch.zeros(40, 4, dtype=torch.bool)
    assert not torch.allclose(MaskedQuantMoE(qm)(x, plain, none, routing), ref, atol=1e-4)
    # Ranks that differ per expert and matrix, some matrices without a compensator (a rank allocation)
    uneven = [QuantizedExpert(ex.q, {m: f.truncate(1 + (e + i) % 6) for i, (m, f) in enumerate(ex.comp.items())
                                     if (e + i) % 4}, ex._deq) for e, ex in enumerate(qm.experts)]
    qa = type(qm)(qm.fmt, uneven, qm.router, qm.cfg, qm.float_weights, hi.experts)
    ref = moe_forward_quant(x, qa, restore, his, routing=routing)
    got = MaskedQuantMoE(qa)(x, restore, his, routing)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5), float((got - ref).abs().max())


def test_width_not_a_multiple_of_the_group_is_named():
    """An expert 96 wide with groups of 64: the message names the layer, expert and matrix, and
    the group sizes that would fit."""
    w, _, _ = _block(e=2, d=128, i=96)
    with pytest.raises(ValueError, match=r"^layer 7, expert 0, matrix w2 \[128 x 96\] .*multiple of the group "
                                         r"size 64, not 96 \(group sizes that divide 96: 32\)"):
        check_block_fits(w, QuantFormat(3, 64), layer=7)
    with pytest.raises(ValueError, match=r"^expert 0, matrix w2 \[128 x 96\]"):
        quantize_moe(w, RouterConfig(top_k=1), QuantFormat(3, 64))
    check_block_fits(w, QuantFormat(3, 32), layer=7)       # 32 divides both widths
    w, _, _ = _block(e=2, d=80, i=64)
    with pytest.raises(ValueError, match=r"matrix w1 \[64 x 80\].*no supported group size \(32, 64, 128\) divides 80"):
        check_block_fits(w, QuantFormat(3, 32))
