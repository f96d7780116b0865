"""The pluggable MoE block and the float reference callable."""
import pytest
import torch

from ndpmoe.model.block import FloatMoE, MoEBlock, block_fns, set_block
from ndpmoe.model.moe import MoEWeights, RouterConfig, moe_forward


def _weights(e=6, i=64, d=32, s=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) / shape[-1] ** 0.5  # noqa: E731
    return MoEWeights(r(e, d), r(e, i, d), r(e, i, d), r(e, d, i), r(s, d), r(s, d), r(d, s), r(1, d))


@pytest.mark.parametrize("cfg", [RouterConfig(top_k=2), RouterConfig(top_k=3, norm_topk_prob=False),
                                 RouterConfig(top_k=4, routed_scaling_factor=4.0),
                                 RouterConfig(top_k=2, scoring="sigmoid", n_group=3, topk_group=2,
                                              score_bias=(0.1, -0.2, 0.0, 0.3, 0.0, -0.1))])
def test_masked_and_gathered_evaluation_agree(cfg):
    w = _weights()
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(1))
    masked, gathered = FloatMoE(w, cfg, masked=True), FloatMoE(w, cfg, masked=False)
    assert masked.masked and not gathered.masked
    torch.testing.assert_close(gathered(x), moe_forward(x, w, cfg), rtol=0, atol=0)
    # the same products, zeroed by the gate before the down projection instead of after: fp32 rounding
    # of sums whose terms are ~1 (eps 1.2e-7 each, a few dozen terms; seen 1.2e-6 with this CPU's BLAS)
    torch.testing.assert_close(masked(x), gathered(x), rtol=1e-5, atol=4e-6)


def test_block_reshapes_and_checks():
    w, cfg = _weights(), RouterConfig(top_k=2)
    block = MoEBlock(FloatMoE(w, cfg), layer=3)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(block(x), moe_forward(x.reshape(10, 32), w, cfg).reshape(2, 5, 32))
    with pytest.raises(ValueError, match=r"layer 3: block returned shape \(10, 7\), expected \(10, 32\)"):
        MoEBlock(lambda t: t[:, :7], layer=3)(x)
    with pytest.raises(TypeError, match="fn must be callable"):
        MoEBlock(42)
    with pytest.raises(TypeError, match="weights must be MoEWeights"):
        FloatMoE({"router": 1}, cfg)


def test_set_block_on_a_decoder():
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = torch.nn.Identity()

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList([Layer(), Layer()])

    m = Model()
    fn = FloatMoE(_weights(), RouterConfig(top_k=2))
    set_block(m, 1, fn)
    assert block_fns(m) == {1: fn}
    with pytest.raises(ValueError, match="layer must be an integer in 0..1, not 2"):
        set_block(m, 2, fn)
