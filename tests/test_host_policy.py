"""Restoration policies: Top-n matches the golden rule, the budgeted policy respects its budget,
spreads rank where gains are concave, buys copies when they pay, and takes cached data for free."""
import pytest
import torch

from ndpmoe.host.policy import BudgetedPolicy, HobbitTopHi, RandomN, RestorationContext, TopN, get_policy
from ndpmoe.host.sensitivity import LayerSensitivity, assumed_sensitivity
from ndpmoe.model.moe_quant import topn_restore

R, RANK_BYTES, HI_EXTRA = 32, 1000, 40_000


def _routing(t=4, k=4, e=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    w = torch.softmax(torch.randn(t, k, generator=g) * 2, -1).sort(-1, descending=True).values
    return ids, w


LO = 30_000


def _ctx(sens=None, **kw):
    return RestorationContext(R, RANK_BYTES, HI_EXTRA, sens or assumed_sensitivity(8, R), lo_bytes=LO, **kw)


def test_topn_is_the_golden_rule():
    ids, w = _routing()
    for n in range(4):
        r = TopN(n).decide(ids, w, _ctx())
        expect = topn_restore(4, 4, n).clamp(max=R)
        assert torch.equal(r.restore_tensor(), expect) and not r.hi_tensor().any()


def test_n_at_least_k_refused():
    ids, w = _routing()
    with pytest.raises(ValueError, match=r"n must be in \[0, k\) = \[0, 4\).*not 4"):
        TopN(4).decide(ids, w, _ctx())
    with pytest.raises(ValueError, match="not 5"):
        get_policy("top-5", top_k=4)
    with pytest.raises(ValueError, match="unknown restoration policy 'best'"):
        get_policy("best", top_k=4)


def test_random_n_restores_n_slots_per_token():
    ids, w = _routing(t=16)
    r = RandomN(2, seed=1).decide(ids, w, _ctx()).restore_tensor()
    assert ((r > 0).sum(1) == 2).all() and (r[:, 0] == 0).any()     # not always the top slot


def test_budget_is_respected_and_spent():
    ids, w = _routing(t=1, k=4)
    ctx = _ctx()
    for budget in (0, 5_000, 16_000, 50_000, 200_000):
        r = BudgetedPolicy(budget).decide(ids, w, ctx)
        spent = r.bytes_moved(ids, ctx)
        assert spent <= budget
        if budget - spent >= 8 * RANK_BYTES:          # unspent: only when nothing is left to buy
            assert all(h or rank == R for h, rank in zip(r.hi[0], r.ranks[0])), (budget, r)


def test_concave_gains_spread_rank_over_experts():
    """With diminishing returns per rank and comparable router weights, a budget of one full rank
    is better spent as lower ranks on several experts than all on the top one."""
    ids = torch.tensor([[0, 1, 2, 3]])
    w = torch.tensor([[0.3, 0.27, 0.23, 0.2]])
    r = BudgetedPolicy(R * RANK_BYTES, allow_hi=False).decide(ids, w, _ctx(assumed_sensitivity(8, R, decay=1.0)))
    ranks = r.restore_tensor()[0]
    assert (ranks > 0).sum() >= 2 and ranks.max() < R and ranks[0] >= ranks[-1]


def test_copy_bought_when_it_pays_per_byte():
    ids = torch.tensor([[0, 1]])
    w = torch.tensor([[0.9, 0.1]])
    sens = LayerSensitivity(assumed_sensitivity(8, R).rank_gain * 0.1, torch.full((8,), 1.0), "test")
    r = BudgetedPolicy(HI_EXTRA).decide(ids, w, _ctx(sens))
    assert r.hi[0] == (True, False) and r.ranks[0][0] == 0


def test_cached_factors_and_copies_are_free():
    ids, w = _routing(t=1, k=4)
    e0 = int(ids[0, 0])
    free = _ctx(cached_rank=lambda e: R if e == e0 else 0)
    r = BudgetedPolicy(0).decide(ids, w, free)
    assert r.ranks[0][0] == R and r.bytes_moved(ids, free) == 0
    sens = LayerSensitivity(assumed_sensitivity(8, R).rank_gain, torch.full((8,), 2.0), "test")
    hi_free = _ctx(sens, hi_cached=lambda e: e == e0)
    r = BudgetedPolicy(0).decide(ids, w, hi_free)
    assert r.hi[0][0] and r.bytes_moved(ids, hi_free) == 0


def test_copy_of_a_cached_expert_costs_all_its_bytes():
    """With the low-bit expert cached, a copy replaces a free hit: the policy pays its full size."""
    ids = torch.tensor([[0, 1]])
    w = torch.tensor([[0.9, 0.1]])
    sens = LayerSensitivity(assumed_sensitivity(8, R).rank_gain * 0.1, torch.full((8,), 1.0), "test")
    cached = _ctx(sens, lo_cached=lambda e: e == 0)
    assert cached.hi_price(0) == HI_EXTRA + LO and cached.hi_price(1) == HI_EXTRA
    r = BudgetedPolicy(HI_EXTRA).decide(ids, w, cached)
    assert not r.hi[0][0]                                  # cannot afford it at the extra's price
    assert r.bytes_moved(ids, cached) <= HI_EXTRA


def test_batch_shares_the_factors_of_a_common_expert():
    ids = torch.tensor([[0, 1], [0, 2], [0, 3]])
    w = torch.tensor([[0.6, 0.4]] * 3)
    r = BudgetedPolicy(R * RANK_BYTES / 3, allow_hi=False).decide(ids, w, _ctx())
    assert [row[0] for row in r.ranks] == [R, R, R]      # one fetch serves all three tokens


def test_hobbit_threshold():
    ids, w = _routing(t=8, k=2)
    r = HobbitTopHi(1, min_weight=float(w[:, 0].median())).decide(ids, w, _ctx()).hi_tensor()
    assert not r[:, 1].any() and r[:, 0].sum() == (w[:, 0] >= w[:, 0].median()).sum()
