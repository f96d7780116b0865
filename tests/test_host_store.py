"""Expert store: exact round trip of every stored tensor, and refusal of broken stores."""
import json

import pytest
import torch

from ndpmoe.host.store import MANIFEST, TENSORS, StoreError, open_store, write_store
from ndpmoe.model.compensate import Int8LowRank
from ndpmoe.model.contract import QuantFormat
from ndpmoe.model.moe_quant import MATRICES

from host_block import FMT, HI_FMT, RANK, make_store


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    path = tmp_path_factory.mktemp("store")
    cfg, blocks, x, store = make_store(path)
    return path, blocks, store


def test_round_trip_is_exact(stored):
    path, blocks, store = stored
    _, qm, _ = blocks[0]
    assert store.fmt == FMT and store.hi_fmt == HI_FMT and store.rank == RANK
    for e in (0, 5):
        for m in MATRICES:
            q = store.matrix(0, e, m)
            assert torch.equal(q.codes, qm.experts[e].q[m].codes)
            assert torch.equal(q.scale, qm.experts[e].q[m].scale) and torch.equal(q.zero, qm.experts[e].q[m].zero)
            assert q.scale_exp == qm.experts[e].q[m].scale_exp
            assert torch.equal(store.matrix(0, e, m, "hi").codes, qm.hi_experts[e].q[m].codes)
            a, b = store.factors_fp16(0, e, m)
            assert a.dtype == torch.float16 and torch.equal(a, qm.experts[e].comp[m].A.half())
            ref8 = Int8LowRank.from_lowrank(qm.experts[e].comp[m], FMT.word_bits)
            got8 = store.factors_int8(0, e, m)
            assert torch.equal(got8.A_q.codes, ref8.A_q.codes) and got8.A_q.scale_exp == ref8.A_q.scale_exp
            assert torch.equal(got8.B_q.codes, ref8.B_q.codes) and got8.B_q.scale_exp == ref8.B_q.scale_exp


def test_sizes_match_stored_tensors(stored):
    """The contract-derived sizes the planner counts are the sizes of the tensors on disk."""
    _, _, store = stored
    sizes = store.sizes()
    for m in MATRICES:
        assert store.image(0, 1, m).numel() == sizes.matrix_bytes("lo", m)
        assert store.image(0, 1, m, "hi").numel() == sizes.matrix_bytes("hi", m)
        a8, b8 = store.factor_images(0, 1, m)
        assert (a8.numel(), b8.numel()) == sizes.int8_factor_bytes(m)
    fp16 = sum(t.numel() * 2 for m in MATRICES for t in store.factors_fp16(0, 1, m))
    assert fp16 == sizes.factor_bytes_fp16(RANK)


def test_sensitivity_is_stored_and_concave(stored):
    _, _, store = stored
    s = store.sensitivity(0)
    assert s.rank_gain.shape == (6, RANK + 1) and (s.rank_gain[:, 0] == 0).all()
    steps = s.rank_gain.diff(dim=1)
    assert (steps >= 0).all() and (steps.diff(dim=1) <= 1e-9).all()     # prefix sums of a sorted spectrum
    assert (s.hi_gain > 0).all()                                          # 8-bit copies beat 3-bit


def _copy(src, dst):
    dst.mkdir()
    for name in (MANIFEST, TENSORS):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_truncated_store_refused(stored, tmp_path):
    d = _copy(stored[0], tmp_path / "s")
    data = (d / TENSORS).read_bytes()
    (d / TENSORS).write_bytes(data[:len(data) // 2])
    with pytest.raises(StoreError, match="truncated"):
        open_store(d)


def test_corrupted_store_refused(stored, tmp_path):
    d = _copy(stored[0], tmp_path / "s")
    data = bytearray((d / TENSORS).read_bytes())
    data[-100] ^= 0xFF
    (d / TENSORS).write_bytes(bytes(data))
    with pytest.raises(StoreError, match="corrupted"):
        open_store(d)


def test_bad_manifest_refused(stored, tmp_path):
    d = _copy(stored[0], tmp_path / "s")
    (d / MANIFEST).write_text("{ not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        open_store(d)


def test_other_format_version_refused(stored, tmp_path):
    d = _copy(stored[0], tmp_path / "s")
    raw = json.loads((d / MANIFEST).read_text())
    raw["format_version"] = 99
    (d / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(StoreError, match="format version 99"):
        open_store(d)


def test_stale_store_refused(stored):
    with pytest.raises(StoreError, match="stale"):
        open_store(stored[0], expect_source="another-checkpoint")
    with pytest.raises(StoreError, match="int4-g64"):
        open_store(stored[0], expect_fmt=QuantFormat(4, 64))


def test_missing_store_refused(tmp_path):
    with pytest.raises(StoreError, match="manifest.json is missing"):
        open_store(tmp_path)


def test_rewrite_is_atomic_and_leaves_no_temporaries(stored, tmp_path):
    d = _copy(stored[0], tmp_path / "s")
    _, blocks, _ = stored
    write_store(d, [blocks[0][1]], source="rewritten")
    assert sorted(p.name for p in d.iterdir()) == sorted([MANIFEST, TENSORS])
    assert open_store(d).manifest.source == "rewritten"


def test_mixed_ranks_refused(stored, tmp_path):
    _, blocks, _ = stored
    qm = blocks[0][1]
    comp = qm.experts[0].comp
    saved = comp["w2"]
    comp["w2"] = saved.truncate(4)
    try:
        with pytest.raises(ValueError, match=r"same rank, found ranks \[4, 16\]"):
            write_store(tmp_path / "m", [qm], source="x")
    finally:
        comp["w2"] = saved
