"""The study at scale: parts computed on stacks of experts are the study's own, bit for bit; the
study finds them all in the cache; Ray workers give the same table with 1 and 2 workers; bad
devices, Ray addresses and oversized checkpoints are refused before any work."""
import json
import struct

import pytest
import torch

from ndpmoe.host.cli import main
from ndpmoe.host.study_parts import compensator_part, quantized_part
from ndpmoe.host.study_workers import ScaleOptions, ScaleOut, cache_for_precision
from ndpmoe.model.contract import QuantFormat
from ndpmoe.model.moe import MoEWeights, RouterConfig
from ndpmoe.model.moe_quant import MATRICES, compensate_moe, expert_grams, quantize_moe
from ndpmoe.model.quantize import get_quantizer

TINY = ["--hidden", "64", "--intermediate", "64", "--experts", "10", "--vocab", "512"]
EVAL = ["--bits", "3", "--quantizers", "rtn,optimized", "--rank", "4", "--topn", "1,2", "--hi-bits", "8",
        "--budgets", "1", "--eval-tokens", "256", "--calib-tokens", "256", "--seq-len", "128", "--quiet"]


def _layer(seed=0, e=6, d=128, i=64):
    g = torch.Generator().manual_seed(seed)
    w = MoEWeights(router=torch.randn(e, d, generator=g), w1=torch.randn(e, i, d, generator=g) * 0.05,
                   w3=torch.randn(e, i, d, generator=g) * 0.05, w2=torch.randn(e, d, i, generator=g) * 0.05)
    cfg = RouterConfig(top_k=2)
    return w, cfg, expert_grams(w, cfg, torch.randn(512, d, generator=g))


@pytest.mark.parametrize("quantizer", ["rtn", "optimized"])
def test_stacked_parts_are_the_study_path_bit_for_bit(quantizer, one_thread):
    w, cfg, grams = _layer()
    fmt = QuantFormat(3, 64)
    ref = quantize_moe(w, cfg, fmt, quantizer=get_quantizer(quantizer), grams=grams)
    got = quantized_part(w, grams, fmt, quantizer)
    for ex, q in zip(ref.experts, got):
        for m in MATRICES:
            assert torch.equal(ex.q[m].codes, q[m].codes) and torch.equal(ex.q[m].zero, q[m].zero)
    for fit in ("aware", "svd"):
        comp = compensate_moe(ref, 8, fit, grams)
        for ex, c in zip(comp.experts, compensator_part(w, got, grams, fit, 8)):
            for m in MATRICES:
                assert torch.equal(ex.comp[m].A, c[m].A) and torch.equal(ex.comp[m].B, c[m].B)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "olmoe"
    assert main(["make-checkpoint", "--like", "olmoe-1b-7b", "--layers", "2", "--out", str(out)] + TINY) == 0
    return out


def test_the_study_finds_every_prefetched_part_in_the_cache(tiny_checkpoint, tmp_path, one_thread):
    from ndpmoe.host.cmd_eval import load_study_model
    from ndpmoe.host.study import Study, Variant
    from ndpmoe.model.text import token_windows, tokenize

    dm = load_study_model(str(tiny_checkpoint), None, None, False)
    ev = token_windows(tokenize(dm.text.eval, dm.tokenizer), 128, 256)
    ca = token_windows(tokenize(dm.text.calib, dm.tokenizer), 128, 256)
    study = Study(dm, ev, ca, progress=False, block_rows=64, cache_root=tmp_path)
    ScaleOut(ScaleOptions(), None, log=lambda *_: None).attach(study)
    study.variant(Variant(3, "optimized", "aware", 4, hi_bits=8))
    # q (int3), c (aware r4), q (int8) for 2 layers: all computed ahead, every study read a hit
    assert (study.cache.hits, study.cache.misses) == (6, 0)
    assert study.scale.tasks == 6


def test_float32_parts_have_keys_of_their_own(tmp_path):
    from ndpmoe.host.study_cache import StudyCache

    cache = StudyCache(tmp_path, "model")
    assert cache_for_precision(cache, "float64") is cache
    other = cache_for_precision(cache, "float32")
    assert other.root == cache.root and other.key(0, "q|3") != cache.key(0, "q|3")


def test_one_and_two_workers_give_the_same_table(tiny_checkpoint, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    tables = []
    for n in (1, 2):
        monkeypatch.setenv("NDPMOE_CACHE", str(tmp_path / f"cache{n}"))
        out = tmp_path / f"res{n}"
        assert main(["eval", "--model", str(tiny_checkpoint), "--out", str(out), "--workers", str(n)] + EVAL) == 0
        rows = json.loads((out / "study.json").read_text())["rows"]
        tables.append([(r["name"], r["ppl"], r["bytes_per_token"], r["layer_err"]) for r in rows])
        assert list((tmp_path / f"cache{n}" / "study").glob("*.safetensors"))        # written through the cache
    assert tables[0] == tables[1]


def test_bad_scale_input_is_refused_before_any_work(tiny_checkpoint, tmp_path, capsys):
    base = ["eval", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "r")] + EVAL
    if not torch.cuda.is_available():
        assert main(base + ["--device", "cuda"]) == 2
        assert "--device cuda was asked for, but no CUDA device is available" in capsys.readouterr().err
    assert main(base + ["--workers", "2", "--ray-address", "127.0.0.1:1"]) == 2
    assert "Ray address '127.0.0.1:1' does not answer" in capsys.readouterr().err
    assert main(base + ["--ray-address", "nohost"]) == 2
    assert "is not HOST:PORT" in capsys.readouterr().err
    assert main(base + ["--workers", "-1"]) == 2
    assert "--workers must be a positive integer, not -1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_checkpoint_larger_than_memory_is_refused_before_loading(tmp_path):
    from ndpmoe.host.devices import check_fits, host_memory_available
    from ndpmoe.model.make_checkpoint import disk_layout
    from ndpmoe.model.real_configs import config_object

    # A whole Mixtral-8x7B as a sparse file: the headers are real, the data takes no disk.
    cfg = config_object("mixtral-8x7b")
    header, offset = {}, 0
    for key, shape in disk_layout(cfg):
        n = 2 * torch.Size(shape).numel()
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if 4 * offset // 2 < host_memory_available():
        pytest.skip("this machine could hold Mixtral-8x7B in float32")
    folder = tmp_path / "mixtral"
    folder.mkdir()
    cfg.save_pretrained(folder)
    raw = json.dumps(header).encode()
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    with pytest.raises(ValueError, match=r"46\.\d+B parameters need 18\d\.\d GB in float32, but this machine has"):
        check_fits(folder)
