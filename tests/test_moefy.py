"""MoEfication of a dense SwiGLU MLP: the partition is exact, the fitted block is better than chance."""
import pytest
import torch

from ndpmoe.model.moe import MoEWeights, RouterConfig, moe_forward, route
from ndpmoe.model.moefy import MoEfyConfig, balanced_assign, hidden_acts, moefy_mlp

D, G = 48, 64


pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py


def _dense(seed=0, experts=4, shared=64, tokens=768):
    gen = torch.Generator().manual_seed(seed)
    i = experts * G + shared
    w1, w3 = torch.randn(i, D, generator=gen) / D ** 0.5, torch.randn(i, D, generator=gen) / D ** 0.5
    w2 = torch.randn(D, i, generator=gen) / i ** 0.5
    # inputs with structure (a few directions dominate per token), so that neurons co-activate
    basis = torch.randn(6, D, generator=gen)
    x = torch.randn(tokens, 6, generator=gen).pow(3) @ basis + 0.3 * torch.randn(tokens, D, generator=gen)
    return x, w1, w3, w2


def _cfg(**kw):
    base = dict(num_experts=4, expert_size=G, shared_size=64, top_k=2, calib_tokens=768, router_steps=30)
    return MoEfyConfig(**{**base, **kw})


def test_all_experts_with_weight_one_reproduce_the_dense_mlp():
    x, w1, w3, w2 = _dense()
    w, rc = moefy_mlp(x, w1, w3, w2, _cfg(refit_down=False))
    assert (w.num_experts, w.intermediate, w.hidden) == (4, G, D) and w.shared_w1.shape == (64, D)
    assert rc == RouterConfig(top_k=2, norm_topk_prob=True, routed_scaling_factor=2.0)
    # every dense neuron sits in exactly one expert (or the shared one)
    rows = torch.cat([w.w1.reshape(-1, D), w.shared_w1])
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, w1.tolist()))
    every = RouterConfig(top_k=4, norm_topk_prob=True, routed_scaling_factor=4.0)
    flat = MoEWeights(torch.zeros_like(w.router), w.w1, w.w3, w.w2, w.shared_w1, w.shared_w3, w.shared_w2)
    dense = hidden_acts(x, w1, w3) @ w2.t()
    # fp32: the same products summed in another order; the outputs reach ~1e2, so scale atol
    torch.testing.assert_close(moe_forward(x, flat, every), dense, rtol=1e-4, atol=1e-6 * dense.abs().max().item())


def test_router_and_refit_beat_a_random_choice():
    x, w1, w3, w2 = _dense(tokens=1024)
    fit, test = x[:768], x[768:]
    dense = hidden_acts(test, w1, w3) @ w2.t()

    def err(w, rc):
        return ((moe_forward(test, w, rc) - dense).pow(2).sum() / dense.pow(2).sum()).item()

    plain, rc = moefy_mlp(fit, w1, w3, w2, _cfg(refit_down=False))
    refit, _ = moefy_mlp(fit, w1, w3, w2, _cfg())
    gen = torch.Generator().manual_seed(3)
    rand = MoEWeights(torch.randn(plain.router.shape, generator=gen), plain.w1, plain.w3, plain.w2,
                      plain.shared_w1, plain.shared_w3, plain.shared_w2)
    e_rand, e_plain, e_refit = err(rand, rc), err(plain, rc), err(refit, rc)
    assert e_refit < e_plain < e_rand, (e_refit, e_plain, e_rand)
    ids, wts = route(test, refit.router, rc)
    assert ids.unique().numel() == 4                       # every expert gets used


def test_config_is_checked():
    with pytest.raises(ValueError, match="expert_size must be a multiple of 64"):
        MoEfyConfig(expert_size=96)
    with pytest.raises(ValueError, match="shared_size must be 0 or a positive multiple of 64"):
        MoEfyConfig(shared_size=100)
    with pytest.raises(ValueError, match="top_k must be below num_experts=8"):
        MoEfyConfig(num_experts=8, expert_size=192, shared_size=0, top_k=8)
    x, w1, w3, w2 = _dense()
    with pytest.raises(ValueError, match=r"E16x64-S512-k8 partitions 1536 neurons, the MLP has 320"):
        moefy_mlp(x, w1, w3, w2, MoEfyConfig())


def test_balanced_assign_respects_capacity():
    score = torch.tensor([[3.0, 0.0], [2.0, 0.0], [1.0, 0.5], [0.0, 0.1]])
    assert balanced_assign(score, 2).tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="5 items do not fit 2 groups of 2"):
        balanced_assign(torch.zeros(5, 2), 2)
