"""Low-bit compensators on the RTL: B x and A (Bx) are ordinary MATMUL descriptors, so the NdpUnit
runs them bit-exact against the golden unit, with random stalls on every handshake (the bench of
tests/test_rtl_ndp_unit.py), on the images the store holds (model/factor_quant.py)."""
import pytest
import torch

from ndpmoe.model.contract import Descriptor, ErrorCode, act_row_len, get_config
from ndpmoe.model.factor_quant import fit_quantized, ndp_a_image, rank_scales
from ndpmoe.model.ndp_golden import NdpGoldenUnit, act_image, quantize_activations
from ndpmoe.sim.workload import Batch, Step

from test_rtl_ndp_unit import run_unit


def _factor_batch(cfg, bits: int) -> Batch:
    """LOAD x; MATMUL of 2 of the 3 stored B rows; LOAD z = s * (B x); MATMUL of A [64, 32]."""
    g = torch.Generator().manual_seed(bits)
    err = torch.randn(64, 128, generator=g, dtype=torch.float64) * 0.01
    fq = fit_quantized(err, torch.eye(128, dtype=torch.float64), 3, bits, word_bits=cfg.word_bits)
    a_ndp, s = ndp_a_image(fq.At_q), rank_scales(fq.At_q)
    gold = NdpGoldenUnit(cfg, mem=bytearray(1 << 16))
    b_addr, a_addr, x_addr = 0, 4096, 1 << 15
    gold.write(b_addr, fq.B_q.to_image())
    gold.write(a_addr, a_ndp.to_image())
    steps = []

    def run(d: Descriptor) -> list:
        res = gold.execute(d)
        assert gold.error == ErrorCode.NONE, d.describe()
        steps.append(Step(d, ErrorCode.NONE, res, d.words(cfg)))
        return res

    x_q, x_scale = quantize_activations(torch.randn(2, 128, generator=g))
    gold.write(x_addr, act_image(x_q, cfg.word_bits))
    run(Descriptor.load_act(tokens=2, in_features=act_row_len(128, cfg.word_bits), addr=x_addr))
    bx = run(Descriptor.matmul(fq.B_q.fmt, tokens=2, rows=2, in_features=128, addr=b_addr))
    acc = torch.zeros(2, 32, dtype=torch.float64)
    for t, r, v in bx:
        acc[t, r] = v * 2.0 ** -(fq.B_q.scale_exp + 4) * float(x_scale[t]) * float(s[r])
    z_q, _ = quantize_activations(acc.float())
    z_addr = x_addr + 2 * act_row_len(128, cfg.word_bits)
    gold.write(z_addr, act_image(z_q, cfg.word_bits))
    run(Descriptor.load_act(tokens=2, in_features=act_row_len(32, cfg.word_bits), addr=z_addr))
    run(Descriptor.matmul(a_ndp.fmt, tokens=2, rows=64, in_features=32, addr=a_addr))
    return Batch(gold.mem, steps)


@pytest.mark.parametrize("name, bits", [("default", 3), ("small", 4)])
def test_factor_descriptors_bit_exact_on_the_rtl(name, bits):
    cfg = get_config(name)
    batch = _factor_batch(cfg, bits)
    assert {s.descriptor.bits for s in batch.steps if s.descriptor.rows} == {bits}
    assert sum(len(s.results) for s in batch.steps) == 2 * (2 + 64)
    run_unit(cfg, len(batch.steps), seed=5, batches=[batch])
