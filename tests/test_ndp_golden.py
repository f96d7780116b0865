"""The bit-exact integer model against the dequantized float path, and the unit's validation."""
import pytest
import torch

from dataclasses import replace

from ndpmoe.model.contract import Descriptor, ErrorCode, QuantFormat, get_config, act_row_len
from ndpmoe.model.ndp_golden import NdpGoldenUnit, acc_to_float, act_image, ndp_matmul, quantize_activations
from ndpmoe.model.quantize import quantize_rtn


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_integer_model_equals_dequantized_float(bits, group):
    g = torch.Generator().manual_seed(bits * 7 + group)
    w = torch.randn(48, 512, generator=g) * 0.05
    x = torch.randn(6, 512, generator=g)
    qm = quantize_rtn(w, QuantFormat(bits, group))
    x_q, x_scale = quantize_activations(x)
    y_int = acc_to_float(ndp_matmul(qm, x_q), qm.scale_exp, x_scale)
    y_ref = (x_q.double() * x_scale.double()[:, None]) @ qm.dequantize(torch.float64).t()
    # Both compute the same real number; the only difference is the final float32 rounding of
    # y_int (relative 2^-24 of each output), so 1e-6 of the output scale is a safe bound.
    assert torch.allclose(y_int.double(), y_ref, rtol=0, atol=1e-6 * float(y_ref.abs().max()))


def test_integer_model_is_exact_integers():
    # A hand-checked case: one row, one group of 32, codes 0..31 mod 4, zero 1.5, scale 3.
    from ndpmoe.model.qtensor import QuantizedMatrix
    fmt = QuantFormat(2, 32)
    codes = (torch.arange(32) % 4).to(torch.uint8)[None]
    qm = QuantizedMatrix(fmt, codes, torch.tensor([[3]], dtype=torch.int32), torch.tensor([[24]], dtype=torch.int32), 0)
    x = torch.arange(-16, 16, dtype=torch.int8)[None]
    expect = 3 * sum(16 * int(c) * int(v) - 24 * int(v) for c, v in zip(codes[0], x[0]))
    assert ndp_matmul(qm, x).item() == expect


def test_golden_unit_runs_descriptors_from_memory():
    cfg = get_config("small")
    unit = NdpGoldenUnit(cfg)
    g = torch.Generator().manual_seed(1)
    qm = quantize_rtn(torch.randn(10, 128, generator=g), cfg.fmt(4, 64))
    x_q, _ = quantize_activations(torch.randn(2, 128, generator=g))
    unit.write(0, act_image(x_q, cfg.word_bits))
    unit.write(4096, qm.to_image())
    load = Descriptor.load_act(tokens=2, in_features=act_row_len(128, 64))
    assert unit.execute(load) == [] and unit.error == ErrorCode.NONE
    mm = Descriptor.matmul(cfg.fmt(4, 64), addr=4096, in_features=128, tokens=2, rows=10)
    results = unit.execute(mm)
    acc = ndp_matmul(qm, x_q)
    assert results == [(t, r, int(acc[t, r])) for r in range(10) for t in range(2)]


@pytest.mark.parametrize("fields,code", [
    (dict(opcode=3), ErrorCode.BAD_OPCODE),
    (dict(bits=3), ErrorCode.BAD_BITS),            # the small build has no 3-bit decoder
    (dict(group=3), ErrorCode.BAD_GROUP),
    (dict(in_features=96), ErrorCode.BAD_IN_FEATURES),
    (dict(tokens=0), ErrorCode.BAD_TOKENS),
    (dict(tokens=3), ErrorCode.BAD_TOKENS),
    (dict(rows=0), ErrorCode.BAD_ROWS),
    (dict(addr=4), ErrorCode.MISALIGNED_ADDR),
    (dict(addr=(1 << 20) - 64), ErrorCode.ADDR_RANGE),
    (dict(in_features=256), ErrorCode.ACT_MISMATCH),
])
def test_bad_descriptors_are_refused(fields, code):
    cfg = get_config("small")
    unit = NdpGoldenUnit(cfg)
    unit.execute(Descriptor.load_act(tokens=2, in_features=128))
    d = replace(Descriptor.matmul(QuantFormat(4, 64, cfg.word_bits), in_features=128, tokens=2, rows=4), **fields)
    assert unit.execute(d) == []
    assert unit.error == code
