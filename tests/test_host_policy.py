"""Restoration policies: Top-n matches the golden rule, the budgeted policy respects its budget,
spreads rank where gains are concave, buys copies when they pay, and takes cached data for free."""
import pytest
import torch

from ndpmoe.host.policy import (BudgetedPolicy, HobbitTopHi, RandomN, RestorationContext, TopN, decode_restoration,
                                get_policy)
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


def test_n_above_k_refused():
    ids, w = _routing()
    assert torch.equal(TopN(4).decide(ids, w, _ctx()).restore_tensor(), torch.full((4, 4), R))   # n = k: every slot
    with pytest.raises(ValueError, match=r"n must be in \[0, k\] = \[0, 4\].*not 5"):
        TopN(5).decide(ids, w, _ctx())
    with pytest.raises(ValueError, match=r"restoration policy 'top-5': n must be .* not 5"):
        get_policy("top-5", top_k=4)


@pytest.mark.parametrize("spec", ["best", "top-", "top-2@r", "top-x", "hobbit-2", "budgeted"])
def test_bad_spec_refused(spec):
    with pytest.raises(ValueError, match=f"unknown restoration policy '{spec}'.*expected none, top-N"):
        get_policy(spec, top_k=4)


@pytest.mark.parametrize("spec", ["budgeted:", "budgeted:many", "budgeted:-1", "budgeted:nan", "budgeted:inf"])
def test_bad_budget_refused(spec):
    with pytest.raises(ValueError, match=f"policy '{spec}': the budget must be a non-negative number"):
        get_policy(spec)


def test_specs_parse_to_the_policies():
    assert get_policy("none", 4) == TopN(0) and get_policy("top-2", 4) == TopN(2)
    assert get_policy("top-2@r8", 4) == TopN(2, 8) and get_policy("hobbit") == HobbitTopHi(1)
    assert get_policy("budgeted:2500.5") == BudgetedPolicy(2500.5)
    rnd = get_policy("random-3@r4", 4)
    assert isinstance(rnd, RandomN) and (rnd.n, rnd.rank, rnd.name) == (3, 4, "random-3@r4")


def test_random_n_restores_n_slots_per_token():
    ids, w = _routing(t=16)
    r = RandomN(2, seed=1).decide(ids, w, _ctx()).restore_tensor()
    assert ((r > 0).sum(1) == 2).all() and (r[:, 0] == 0).any()     # not always the top slot


def test_random_n_draws_anew_per_call_and_repeats_per_seed():
    """Batch-1 decode calls once per token: the draws must move on (not restart) between calls."""
    ids, w = _routing(t=1)
    first, again = RandomN(1, seed=3), RandomN(1, seed=3)
    picks = [first.decide(ids, w, _ctx()).ranks[0] for _ in range(32)]
    assert len(set(picks)) > 1
    assert picks == [again.decide(ids, w, _ctx()).ranks[0] for _ in range(32)]
    assert RandomN(1, rank=4).decide(ids, w, _ctx()).restore_tensor().max() == 4


def test_random_n_fork_draws_what_the_policy_would_and_leaves_it_as_it_was():
    """A prefetch guess decides on a fork: the same next draws, the policy's own draws untouched."""
    ids, w = _routing(t=1)
    policy, reference = RandomN(1, seed=5), RandomN(1, seed=5)
    for _ in range(3):                                   # somewhere in the middle of its draws
        policy.decide(ids, w, _ctx()), reference.decide(ids, w, _ctx())
    fork = policy.fork()
    forked = [fork.decide(ids, w, _ctx()).ranks[0] for _ in range(16)]
    own = [policy.decide(ids, w, _ctx()).ranks[0] for _ in range(16)]
    assert forked == own == [reference.decide(ids, w, _ctx()).ranks[0] for _ in range(16)]


@pytest.mark.parametrize("policy", [TopN(2, 8), HobbitTopHi(1, 0.2), BudgetedPolicy(20_000)], ids=lambda p: p.name)
def test_decode_restoration_decides_each_token_alone(policy):
    """What batch-1 decode decides: each token as its own batch. Row-wise policies may decide the
    whole batch at once (same result); the budgeted policy shares a budget, so it may not."""
    ids, w = _routing(t=6)
    got = decode_restoration(policy, ids, w, _ctx())
    whole = policy.decide(ids, w, _ctx())
    assert (whole == got) == policy.row_wise        # a shared budget decides a batch differently
    rows = [policy.decide(ids[i:i + 1], w[i:i + 1], _ctx()) for i in range(6)]
    assert got.ranks == tuple(r.ranks[0] for r in rows) and got.hi == tuple(r.hi[0] for r in rows)


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
