"""The measured-gain budgeted policy's solver on synthetic option tables: within its budget, close
to the exact knapsack optimum, never below a fixed rule it could have chosen; and its bad input."""
import math

import pytest
import torch

from ndpmoe.host.budget_policy import (MeasuredBudgetPolicy, Option, OptionTable, objective, option_list, solve,
                                       solve_exact, spent, upper_hull)


def random_table(seed: int, experts: int = 6, stored_rank: int = 8) -> OptionTable:
    """Concave-ish rank curves at two precisions plus two copies, with expert-dependent scales."""
    g = torch.Generator().manual_seed(seed)
    options = option_list(("fp16", "int4"), stored_rank)
    cost, gain = [], []
    for _ in range(experts):
        scale = float(torch.rand(1, generator=g)) + 0.2
        spec = torch.sort(torch.rand(stored_rank, generator=g, dtype=torch.float64), descending=True).values * scale
        curve = spec.cumsum(0).tolist()
        row_c, row_g = [], []
        for o in options:
            if o.kind == "none":
                row_c.append(0.0), row_g.append(0.0)
            elif o.kind == "factors":
                per = 3840.0 if o.precision == "fp16" else 1020.0
                keep = 1.0 if o.precision == "fp16" else 0.9
                row_c.append(per * o.rank), row_g.append(keep * curve[o.rank - 1])
            else:
                row_c.append(25600.0 if o.bits == 4 else 76800.0)
                row_g.append(curve[-1] * (1.1 if o.bits == 4 else 1.6))
        cost.append(row_c), gain.append(row_g)
    return OptionTable(options, torch.tensor(cost, dtype=torch.float64), torch.tensor(gain, dtype=torch.float64))


def routing(seed: int, tokens: int, experts: int, k: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    w = torch.softmax(torch.randn(tokens, k, generator=g), 1).sort(1, descending=True).values
    return ids, w


@pytest.mark.parametrize("budget", [0.0, 5000.0, 20000.0, 60000.0, 200000.0])
def test_within_budget_and_near_the_exact_optimum(budget):
    table = random_table(1)
    ids, w = routing(2, 40, 6, 3)
    choice = solve(table, ids, w, budget)
    assert bool((spent(table, ids, choice) <= budget + 1e-6).all())
    got = objective(table, ids, w, choice).tolist()
    exact = [solve_exact(table, i, ww, budget) for i, ww in zip(ids.tolist(), w.tolist())]
    assert all(g <= e + 1e-9 for g, e in zip(got, exact))          # the exact optimum bounds it
    # Lagrangian greedy + one-slot repairs: at most one hull step short of the optimum per token;
    # summed over tokens within 2 % here (measured 0.0-0.6 %).
    assert sum(got) >= 0.98 * sum(exact), (sum(got), sum(exact))


def test_never_below_a_fixed_rule_at_its_bytes():
    """Top-n at rank r and precision p, and HOBBIT top-n copies, cost the same every token: at that
    budget the policy's objective (its own calibration objective) is at least theirs."""
    table = random_table(3)
    ids, w = routing(4, 200, 6, 4)
    rules = [(n, Option("factors", p, r)) for n in (1, 2, 4) for p in ("fp16", "int4") for r in (1, 2, 4, 8)]
    rules += [(n, Option("copy", bits=b)) for n in (1, 2) for b in (4, 8)]
    for n, opt in rules:
        fixed = torch.zeros_like(ids)
        fixed[:, :n] = table.index(opt)
        budget = float(spent(table, ids, fixed)[0])
        mine = solve(table, ids, w, budget)
        assert float(objective(table, ids, w, mine).sum()) >= float(objective(table, ids, w, fixed).sum()) - 1e-9, opt


def test_hull_keeps_only_options_a_lagrangian_can_pick():
    cost = [0, 1, 2, 3, 4, 4]
    gain = [0, 5, 6, 9, 9.5, 1]
    assert upper_hull(cost, gain) == [0, 1, 3, 4]            # 2 is under the chord 1..3; 5 costs 4 for little


def test_weight_power_zero_ignores_the_router():
    table = random_table(5)
    ids, w = routing(6, 10, 6, 3)
    flat = solve(table, ids, torch.ones_like(w), 10000.0)
    assert torch.equal(solve(table, ids, w, 10000.0, weight_power=0.0), flat)


@pytest.mark.parametrize("budget,shown", [(-1.0, "-1.0"), (math.nan, "nan"), ("1e5", "'1e5'"), (math.inf, "inf"),
                                          (True, "True")])
def test_bad_budget_is_refused_naming_it(budget, shown):
    with pytest.raises(ValueError, match=rf"budget must be a finite number of bytes per token and layer >= 0, not {shown}"):
        MeasuredBudgetPolicy(budget)


def test_unsupported_precision_and_unstored_rank_are_refused():
    with pytest.raises(ValueError, match=r"factor precision must be one of \('fp16', 'int8', 'int4', 'int3'\), not 'int2'"):
        option_list(("fp16", "int2"), 8)
    with pytest.raises(ValueError, match=r"factor precision must be one of .*not 'bf16'"):
        Option("factors", "bf16", 4)
    with pytest.raises(ValueError, match=r"rank 32 is not stored: ranks must be integers in \[1, 16\]"):
        option_list(("fp16",), 16, ranks=(4, 32))
    with pytest.raises(ValueError, match=r"copy bits must be one of \(4, 8\), not 6"):
        option_list(("fp16",), 4, copy_bits=(6,))


@pytest.mark.parametrize("seed", [1, 4, 7])
def test_one_token_path_decides_as_the_batched_path(seed):
    """Batch-1 decode takes a plain-Python path through the same steps: every token's choice
    equals its row of the batched solve (ties included: a copy as good as a rank, zero-gain
    experts, budgets on a step's boundary)."""
    table = random_table(seed, experts=8)
    table.gain[5] = 0.0                                   # an expert no calibration row reached
    table.gain[6, -1] = table.gain[6, 8]                  # a copy worth exactly rank 8 at fp16
    ids, w = routing(seed + 10, 200, 8, 4)
    for budget in (0.0, 3840.0, 7680.0, 25600.0 + 3840.0, 50000.0, 400000.0):
        for power in (2.0, 28.3):
            batched = solve(table, ids, w, budget, power)
            for t in range(ids.shape[0]):
                one = solve(table, ids[t:t + 1], w[t:t + 1], budget, power)
                assert torch.equal(one, batched[t:t + 1]), (budget, power, t)


def test_an_option_that_pays_back_is_the_hulls_start():
    """A copy packed smaller than the low-bit expert (the default model's int4 copy at a 128-bit
    port) costs less than nothing and gains more: every slot takes it, and the budget it frees
    buys what else fits; both paths agree and stay within the budget."""
    table = random_table(2, experts=6)
    copy = table.options.index(Option("copy", bits=4))
    table.cost[:, copy] = -3072.0
    table = OptionTable(table.options, table.cost, table.gain)          # hulls again
    assert all(h[0] == copy for h in table.hull.tolist())
    ids, w = routing(5, 60, 6, 3)
    for budget in (0.0, 3000.0, 80000.0):
        choice = solve(table, ids, w, budget)
        assert bool((spent(table, ids, choice) <= budget + 1e-6).all())
        if budget == 0.0:
            assert bool((choice == copy).all())
        for t in range(ids.shape[0]):
            assert torch.equal(solve(table, ids[t:t + 1], w[t:t + 1], budget), choice[t:t + 1])
