"""The study's on-disk cache of quantized experts and compensators: a second study of the same
model and calibration loads identical parts, other calibration or a torn file recomputes."""
import pytest
import torch

from ndpmoe.host.study import Study, Variant
from ndpmoe.model.default_moe import load_default_moe
from ndpmoe.model.moe_quant import MATRICES
from ndpmoe.model.moefy import MoEfyConfig
from ndpmoe.model.text import token_windows, tokenize

LAYERS = [0, 1]                       # shares the reduced model of tests/test_default_moe.py
CFG = MoEfyConfig(calib_tokens=1024)
V = Variant(3, "rtn", "aware", 4)


@pytest.fixture(scope="module")
def parts(one_thread):
    dm = load_default_moe(CFG, layers=LAYERS, progress=False)
    ev = token_windows(tokenize(dm.text.eval, dm.tokenizer), 256, 256)
    ca = token_windows(tokenize(dm.text.calib, dm.tokenizer), 256, 512)
    return dm, ev, ca


def _same(a, b):
    for l in LAYERS:
        for ea, eb in zip(a[l].experts, b[l].experts):
            for m in MATRICES:
                assert torch.equal(ea.q[m].codes, eb.q[m].codes) and ea.q[m].scale_exp == eb.q[m].scale_exp
                assert torch.equal(ea.comp[m].A, eb.comp[m].A) and torch.equal(ea.comp[m].B, eb.comp[m].B)


def test_second_study_loads_what_the_first_stored(parts, tmp_path):
    dm, ev, ca = parts
    first = Study(dm, ev, ca, progress=False, block_rows=128, quant_layers=LAYERS, cache_root=tmp_path)
    made = first.variant(V)
    assert (first.cache.hits, first.cache.misses) == (0, 4)          # 2 layers x (matrices, compensators)
    again = Study(dm, ev, ca, progress=False, block_rows=128, quant_layers=LAYERS, cache_root=tmp_path)
    _same(made, again.variant(V))
    assert (again.cache.hits, again.cache.misses) == (4, 0)
    # A higher rank on the same low-bit experts reuses the cached matrices, fits anew.
    again.variant(Variant(3, "rtn", "aware", 8))
    assert (again.cache.hits, again.cache.misses) == (4, 2)


def test_other_calibration_or_torn_file_recomputes(parts, tmp_path):
    dm, ev, ca = parts
    Study(dm, ev, ca, progress=False, block_rows=128, quant_layers=LAYERS, cache_root=tmp_path).variant(V)
    other = Study(dm, ev, ca[:1], progress=False, block_rows=128, quant_layers=LAYERS, cache_root=tmp_path)
    other.variant(V)
    assert other.cache.hits == 0
    for f in tmp_path.glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:100])
    torn = Study(dm, ev, ca, progress=False, block_rows=128, quant_layers=LAYERS, cache_root=tmp_path)
    fresh = Study(dm, ev, ca, progress=False, block_rows=128, quant_layers=LAYERS, cache_root=None)
    _same(torn.variant(V), fresh.variant(V))
    assert torn.cache.hits == 0
