"""Compensators stored low-bit: exact bytes, the prefix property, measured gains, and what each
precision keeps of the fp16 factors' error reduction on real quantization errors."""
import pytest
import torch

from ndpmoe.model.compensate import fit_activation_aware, gram, whitening_factor
from ndpmoe.model.contract import QuantFormat
from ndpmoe.model.factor_quant import (bytes_per_rank, factor_bits, fit_quantized, kept_reduction, objective,
                                       rank_share)
from ndpmoe.model.quantize import quantize_rtn

FMT = QuantFormat(3, 64, 64)


def _case(out=64, n_in=576, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g, dtype=torch.float64) * 0.02
    x = torch.randn(2048, n_in, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(0, -1.5, n_in, dtype=torch.float64))
    err = w - quantize_rtn(w.float(), FMT if n_in % 64 == 0 else QuantFormat(3, 32, 64)).dequantize(torch.float64)
    return err, gram(x[:1024]), gram(x[1024:])


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("shape", [(64, 576), (576, 64)])
def test_bytes_are_whole_rows_of_the_packed_images(bits, shape):
    err, h, _ = _case(*shape)
    fq = fit_quantized(err, h, 6, bits)
    per_rank = bytes_per_rank(*shape, bits, 64, 64)
    assert fq.nbytes() == 6 * per_rank
    # the images themselves: rows of whole words, metadata included
    for qm in (fq.B_q, fq.At_q):
        image = qm.to_image()
        assert image.numel() * image.element_size() == qm.nbytes
    assert fq.nbytes(2) == 2 * per_rank and fq.nbytes(0) == 0
    assert bytes_per_rank(*shape, None) == 2 * sum(shape)


def test_every_prefix_is_what_the_fit_built_and_the_gains_are_measured():
    err, h, _ = _case()
    fq = fit_quantized(err, h, 8, 4)
    base = objective(err, h)
    for r in (1, 3, 8):
        left = objective(err, h, fq.lowrank(r).delta())
        assert base - left == pytest.approx(float(fq.spectrum[:r].double().sum()), rel=1e-4)
    assert torch.equal(fq.lowrank(3).B, fq.lowrank(8).B[:3]) and torch.equal(fq.lowrank(3).A, fq.lowrank(8).A[:, :3])
    assert (fq.spectrum > 0).all()


@pytest.mark.parametrize("bits, keeps", [(8, 0.99), (4, 0.95), (3, 0.80)])
def test_quantized_factors_keep_most_of_the_fp16_reduction_held_out(bits, keeps):
    err, h, h_held = _case(seed=3)
    ref = fit_activation_aware(err, h, 8, whiten=whitening_factor(h))
    fq = fit_quantized(err, h, 8, bits)
    assert kept_reduction(err, h_held, fq.lowrank(), ref) >= keeps


def test_the_regime_line_orders_the_models_and_precisions():
    """One rank's bytes over one int3 expert: thin experts pay far more than Mixtral's."""
    default = {p: rank_share(576, 64, FMT, p) for p in ("fp16", "int8", "int4", "int3")}
    mixtral = rank_share(4096, 14336, QuantFormat(3, 64, 128), "fp16")
    assert default["fp16"] > default["int8"] > default["int4"] > default["int3"]
    assert 0.07 < default["fp16"] < 0.09          # DESIGN.md: 7.9 % on the default model
    assert default["int4"] < default["fp16"] / 3
    assert mixtral < 0.002                        # DESIGN.md: 0.14 % on Mixtral


def test_bad_input_is_refused_with_the_allowed_values():
    err, h, _ = _case()
    with pytest.raises(ValueError, match=r"factor precision must be one of \('fp16', 'int8', 'int4', 'int3'\), not 'int5'"):
        factor_bits("int5")
    with pytest.raises(ValueError, match=r"rank must be an integer in \[1, 64\], not 65"):
        fit_quantized(err, h, 65, 4)
    with pytest.raises(ValueError, match=r"factor bits must be one of \(3, 4, 8\), not 2"):
        fit_quantized(err, h, 4, 2)
    fq = fit_quantized(err, h, 4, 4)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 4\], not 5"):
        fq.lowrank(5)
