"""The measured-gain runtime policy (`gain-budget:BYTES`, host/gain_policy.py) and the gain
tables kept with an expert store (host/gain_tables.py), on the small block of tests/host_block.py.
(Its decisions against the study's, through the whole runtime: tests/test_generate.py.)

- Tables measured on a store are read back as written; the policy keeps every token within its
  budget and is the study's solver over the run's options.
- Bad input: a budget below zero or not a number, a store without tables (the error says how to
  build them), tables of another store configuration, a damaged table file, an unbound policy, a
  factor precision the tables do not hold; an interrupted write leaves the store as it was.
"""
import shutil

import pytest
import torch

from host_block import D, make_store
from ndpmoe.host import gain_tables as gt
from ndpmoe.host.budget_policy import solve, spent
from ndpmoe.host.gain_policy import GainBudgetPolicy
from ndpmoe.host.policy import get_policy, restoration_context
from ndpmoe.host.store import MANIFEST, StoreError, open_store
from ndpmoe.model.moe import route

ROWS = 128


def _inputs(seed: int = 1):
    return {0: torch.randn(ROWS, D, generator=torch.Generator().manual_seed(seed))}


@pytest.fixture(scope="module")
def stores(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("gain")
    cfg, blocks, x, store = make_store(root / "a")
    with_tables, tables = gt.add_gain_tables(store, {0: (blocks[0][0], cfg)}, _inputs(), log=lambda m: None)
    # the same weights stored with int4 factors besides: another configuration
    _, _, _, other = make_store(root / "b", factor_bits=(4,))
    return root, cfg, blocks, x, with_tables, tables, other


def test_tables_read_back_and_policy_is_the_study_solver(stores):
    _, cfg, blocks, x, store, measured, _ = stores
    tables = gt.load_gain_tables(open_store(store.folder))
    assert [o.label for o in tables.options] == [o.label for o in measured.options]
    assert torch.equal(tables.gain[0], measured.gain[0]) and tables.weight_power == measured.weight_power
    assert (tables.gain[0][:, 0] == 0).all() and (tables.gain[0][:, 1:] > 0).any()
    ids, weights = route(x, blocks[0][0].router, cfg)
    ctx = restoration_context(store.sizes(), layer=0)
    table = tables.table(0, "fp16", 8)
    for budget in (0.0, 5000.0, 60000.0):
        policy = GainBudgetPolicy(budget).bind(tables, "fp16", 8)
        res = policy.decide(ids, weights, ctx)
        choice = solve(table, ids, weights, budget, tables.weight_power)
        assert (spent(table, ids, choice) <= budget + 1e-9).all()
        for t in range(ids.shape[0]):
            assert res.bytes_moved(ids[t:t + 1], ctx) == float(spent(table, ids[t:t + 1], choice[t:t + 1]))
        if budget == 0:
            assert not res.restore_tensor().any() and not res.hi_tensor().any()
    assert res.restore_tensor().any() or res.hi_tensor().any()


def test_the_planners_list_path_decides_as_decide(stores):
    """The planner hands the policy its ids as lists (`decide_rows`): a batch gives `decide`'s
    restoration, and each token alone (batch-1 decode, solved on lists end to end) its row of it."""
    _, cfg, blocks, x, store, _, _ = stores
    tables = gt.load_gain_tables(open_store(store.folder))
    ids, weights = route(x, blocks[0][0].router, cfg)
    ctx = restoration_context(store.sizes(), layer=0)
    for budget in (0.0, 3000.0, 20000.0, 60000.0):
        policy = GainBudgetPolicy(budget).bind(tables, "fp16", 8)
        batched = policy.decide(ids, weights, ctx)
        assert policy.decide_rows(ids.tolist(), weights, ctx) == batched
        for t in range(ids.shape[0]):
            one = policy.decide_rows(ids[t:t + 1].tolist(), weights[t:t + 1], ctx)
            assert one.ranks == batched.ranks[t:t + 1] and one.hi == batched.hi[t:t + 1], (budget, t)
    with pytest.raises(ValueError, match=r"ids and weights must both be \[T, K\]"):
        policy.decide_rows(ids[:1].tolist(), weights[:2], ctx)


@pytest.mark.parametrize("bad", ["-1", "abc", "nan", "inf", ""])
def test_bad_budget_refused(bad):
    with pytest.raises(ValueError, match=rf"gain-budget:{bad}'.*non-negative number of bytes per token, not '{bad}'"):
        get_policy(f"gain-budget:{bad}")


def test_store_without_tables_says_how_to_build_them(stores):
    root, *_ = stores
    plain = open_store(root / "b")
    with pytest.raises(StoreError, match=r"has no gain tables; measure them once with `ndpmoe generate --policy "
                                         r"gain-budget:BYTES`"):
        gt.load_gain_tables(plain)


def test_unbound_policy_and_missing_precision_refused(stores):
    _, cfg, blocks, x, store, tables, _ = stores
    ids, weights = route(x, blocks[0][0].router, cfg)
    with pytest.raises(ValueError, match="bind it to them first"):
        get_policy("gain-budget:1000").decide(ids, weights, restoration_context(store.sizes(), layer=0))
    with pytest.raises(ValueError, match=r"hold factor precisions \['fp16'\], not 'int4'"):
        GainBudgetPolicy(1000).bind(tables, "int4", 8)


def test_tables_of_another_store_configuration_refused(stores):
    root, cfg, blocks, _, store, _, _ = stores
    copy = root / "b-copy"
    shutil.copytree(root / "b", copy)
    other = open_store(copy)
    from ndpmoe.model.integrity import read_sealed

    tensors, meta = read_sealed(store.gain_table_file("x"), gt.KIND)
    stolen = gt.attach_gain_tables(other, tensors, gt.KIND, meta)        # named by B's manifest, A's key
    with pytest.raises(StoreError, match=r"measured for another store or by other code \(factor_bits, "
                                         r"store_sha256 differ.*stale"):
        gt.load_gain_tables(open_store(stolen.folder))


def test_damaged_table_file_refused(stores):
    root, *_ = stores
    copy = root / "a-damaged"
    shutil.copytree(root / "a", copy)
    path = copy / "gain_tables.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="is not the file manifest.json names"):
        gt.load_gain_tables(open_store(copy))


def test_interrupted_write_leaves_the_store_as_it_was(stores, monkeypatch):
    root, cfg, blocks, *_ = stores
    copy = root / "b-interrupted"
    shutil.copytree(root / "b", copy)
    before = (copy / MANIFEST).read_bytes()
    import ndpmoe.host.store as store_mod

    def interrupted(folder, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_mod, "_atomic_replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gt.add_gain_tables(open_store(copy), {0: (blocks[0][0], cfg)}, _inputs(), log=lambda m: None)
    assert (copy / MANIFEST).read_bytes() == before
    assert [p.name for p in copy.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(StoreError, match="has no gain tables"):
        gt.load_gain_tables(open_store(copy))


def test_study_refuses_it_as_an_extra_row():
    from ndpmoe.host.study_plan import PlanOptions, extra_policies

    with pytest.raises(ValueError, match=r"'gain-budget:1000' decides by a store's gain tables.*use --budgets"):
        extra_policies(PlanOptions(policies=("gain-budget:1000",)))
