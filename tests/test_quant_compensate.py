"""Quantizers, compensators and rank allocation: behaviour and bad input."""
import math

import pytest
import torch

from ndpmoe.model.compensate import (Int8LowRank, fit_activation_aware, fit_svd, gram, quantize_int8_symmetric)
from ndpmoe.model.contract import QuantFormat, NdpConfig
from ndpmoe.model.moe import RouterConfig
from ndpmoe.model.qtensor import QuantizedMatrix
from ndpmoe.model.quantize import get_quantizer, quantize_hqq, quantize_optimized, quantize_rtn, row_output_error
from ndpmoe.model.rank_alloc import allocate_ranks


def _anisotropic(seed=0, d=256, n=2048, o=192):
    g = torch.Generator().manual_seed(seed)
    # Realistic activations: a decaying spectrum (two decades) and a few outlier channels.
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d)
    x = torch.randn(n, d, generator=g) @ mix
    x[:, :4] *= 20
    w = torch.randn(o, d, generator=g) * 0.02
    return w, x


def test_activation_aware_fit_beats_plain_svd():
    w, x = _anisotropic()
    err = w - quantize_rtn(w, QuantFormat(3, 64)).dequantize()
    h = gram(x)
    out = lambda e: float((e.double() @ x.t().double()).norm())
    base = out(err)
    for rank in (4, 16, 32):
        plain = out(err - fit_svd(err, rank).delta()) / base
        aware = out(err - fit_activation_aware(err, h, rank).delta()) / base
        # "Clearly more": the aware fit removes at least twice the output error plain SVD removes.
        assert (1 - aware) > 2 * (1 - plain), (rank, plain, aware)


def test_prefix_of_factors_is_the_lower_rank_fit():
    w, x = _anisotropic(1)
    err = w - quantize_rtn(w, QuantFormat(2, 64)).dequantize()
    h = gram(x)
    big, small = fit_activation_aware(err, h, 24), fit_activation_aware(err, h, 8)
    # Same objective, same whitening: the rank-8 prefix reproduces the rank-8 fit (float32 storage).
    assert torch.allclose(big.truncate(8).delta(), small.delta(), atol=1e-6 * float(err.abs().max()) + 1e-7)
    assert torch.all(big.spectrum[:-1] >= big.spectrum[1:])


def test_int8_factors_close_to_float():
    w, x = _anisotropic(2)
    err = w - quantize_rtn(w, QuantFormat(3, 64)).dequantize()
    f = fit_activation_aware(err, gram(x), 16)
    i8 = Int8LowRank.from_lowrank(f)
    # Per-group int8 of each factor: relative error of the product well under 2% (8-bit codes).
    rel = (i8.dequantize().delta() - f.delta()).norm() / f.delta().norm()
    assert rel < 0.02
    assert i8.A_q.in_features == 32                 # rank padded to the NDP's 32-column groups


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_optimized_never_worse_than_rtn_on_calibration(bits):
    w, x = _anisotropic(3)
    h = gram(x)
    fmt = QuantFormat(bits, 64)
    rtn = row_output_error(w, quantize_rtn(w, fmt), h)
    opt = row_output_error(w, quantize_optimized(w, fmt, h), h)
    assert torch.all(opt <= rtn + 1e-12)
    assert opt.sum() < rtn.sum()


def test_hqq_refines_zero_only():
    w, _ = _anisotropic(4)
    fmt = QuantFormat(2, 32)
    a, b = quantize_rtn(w, fmt), quantize_hqq(w, fmt)
    assert torch.equal(a.scale, b.scale) and a.scale_exp == b.scale_exp
    assert not torch.equal(a.zero, b.zero)


def test_rank_allocation_greedy_is_optimal_and_respects_budget():
    gains = {"a": torch.tensor([10.0, 5.0, 1.0]), "b": torch.tensor([8.0, 7.0, 6.0])}
    assert allocate_ranks(gains, {"a": 1, "b": 1}, 3) == {"a": 1, "b": 2}
    assert allocate_ranks(gains, {"a": 1, "b": 2}, 4) == {"a": 2, "b": 1}
    assert allocate_ranks(gains, {"a": 1, "b": 1}, 0) == {"a": 0, "b": 0}
    assert allocate_ranks(gains, {"a": 1, "b": 1}, 100) == {"a": 3, "b": 3}


# ----------------------------------------------------------------------------- bad input ----
@pytest.mark.parametrize("bits", [1, 5, 16])
def test_unsupported_bits(bits):
    with pytest.raises(ValueError, match=rf"bits must be one of .* not {bits}"):
        QuantFormat(bits, 64)


def test_unsupported_group_and_types():
    with pytest.raises(ValueError, match="group_size must be one of .* not 48"):
        QuantFormat(4, 48)
    with pytest.raises(TypeError, match="bits must be an integer"):
        QuantFormat(4.0, 64)


def test_input_not_divisible_by_group():
    with pytest.raises(ValueError, match="multiple of the group size 64, not 100"):
        quantize_rtn(torch.randn(4, 100), QuantFormat(4, 64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_weights(bad):
    w = torch.randn(4, 64)
    w[2, 5] = bad
    with pytest.raises(ValueError, match=r"NaN or Inf \(first at index \[2, 5\]\)"):
        quantize_rtn(w, QuantFormat(4, 64))


def test_wrong_shape_and_dtype():
    with pytest.raises(TypeError, match="2-D float tensor"):
        quantize_rtn(torch.randint(0, 3, (4, 64)), QuantFormat(4, 64))
    with pytest.raises(TypeError, match="2-D float tensor"):
        quantize_rtn(torch.randn(64), QuantFormat(4, 64))
    with pytest.raises(ValueError, match="h has shape"):
        quantize_optimized(torch.randn(4, 64), QuantFormat(4, 64), torch.eye(32))
    qm = quantize_rtn(torch.randn(4, 64), QuantFormat(4, 64))
    with pytest.raises(ValueError, match="scale has shape"):
        QuantizedMatrix(qm.fmt, qm.codes, qm.scale[:, :0], qm.zero, 0)


def test_rank_too_large():
    err = torch.randn(8, 64)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, min\(out, in\) = 8\], not 9"):
        fit_svd(err, 9)
    with pytest.raises(ValueError, match="Gram matrix has shape"):
        fit_activation_aware(err, torch.eye(8), 4)


def test_unknown_quantizer_and_bad_configs():
    with pytest.raises(ValueError, match="unknown quantizer 'gptq'"):
        get_quantizer("gptq")
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        RouterConfig(top_k=0)
    with pytest.raises(ValueError, match="t_max must be an integer"):
        NdpConfig("x", t_max=0)
