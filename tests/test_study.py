"""The accuracy study end to end on a reduced default model (two MoEfied layers, short text):
the orderings that are robust at this size, measured on held-out layer outputs and perplexity."""
import json
import math

import pytest
import torch

from ndpmoe.host.cli import main
from ndpmoe.host.cmd_eval import write_outputs
from ndpmoe.host.policy import Restoration, TopN
from ndpmoe.host.sizes import ExpertSizes
from ndpmoe.host.study import Study, Variant
from ndpmoe.host.study_plan import PairedVerdicts, PlanOptions, run_plan, verdicts
from ndpmoe.model.default_moe import load_default_moe
from ndpmoe.model.factor_quant import bytes_per_rank
from ndpmoe.model.moe_quant import FULL_RANK
from ndpmoe.model.moefy import MoEfyConfig
from ndpmoe.model.text import token_windows, tokenize

LAYERS = [0, 1]                       # shares the reduced model of tests/test_default_moe.py
CFG = MoEfyConfig(calib_tokens=1024)


class EverySlot:
    """A policy from outside host/policy.py: every slot at all the rank that is stored."""
    name, row_wise, needs_sensitivity = "every slot", True, False

    def decide(self, ids, weights, ctx):
        t, k = ids.shape
        return Restoration(((FULL_RANK,) * k,) * t, ((False,) * k,) * t)


@pytest.fixture(scope="module")
def study():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    dm = load_default_moe(CFG, layers=LAYERS, progress=False)
    ev = token_windows(tokenize(dm.text.eval, dm.tokenizer), 256, 512)
    ca = token_windows(tokenize(dm.text.calib, dm.tokenizer), 256, 1024)
    yield Study(dm, ev, ca, progress=False, block_rows=512)
    torch.set_num_threads(before)


def test_orderings(study, tmp_path):
    k = study.dm.blocks[0][1].top_k
    aware, svd = Variant(3, "optimized", "aware", 8), Variant(3, "optimized", "svd", 8)
    plain = study.run("plain", Variant(3, "optimized"), kind="uniform", bits=3, quantizer="optimized")
    top2 = study.run("top2 aware", aware, TopN(2), kind="topn", bits=3, n=2, rank=8, fit="aware")
    top2_svd = study.run("top2 svd", svd, TopN(2), kind="topn", bits=3, n=2, rank=8, fit="svd")
    topk = study.run("topk", aware, TopN(k), kind="topn", bits=3, n=k, rank=8, fit="aware")
    every = study.run("every slot", aware, EverySlot())
    # Activation-aware below plain SVD at equal rank and bytes; compensated below uncompensated.
    assert top2["bytes_per_token"] == top2_svd["bytes_per_token"] > plain["bytes_per_token"]
    assert top2["layer_err"] < top2_svd["layer_err"]
    assert topk["layer_err"] < top2["layer_err"] < plain["layer_err"]
    # n = k is compensating everything: the same outputs, so the same perplexity and error.
    assert topk["ppl"] == every["ppl"] and topk["layer_err"] == every["layer_err"]
    # Perplexity at this size (2 of 30 layers, 512 tokens) moves by ~0.1%: too little to order
    # the configurations reliably, so only its sanity is asserted: 3-bit stays within 5% of float.
    fp = study.run("fp16", None, kind="fp16")
    for r in (plain, top2, top2_svd, topk):
        assert abs(r["ppl"] / fp["ppl"] - 1) < 0.05
    # The outputs a user gets: JSON, table and a Pareto plot.
    found = write_outputs(tmp_path, study.rows, {"model": "default", "layers": 2, "eval_tokens": 512, "seconds": 0},
                          PlanOptions(quantizers=("optimized",)), log=lambda s: None, nlls=study.token_nlls)
    assert (tmp_path / "pareto.png").stat().st_size > 10_000
    table = (tmp_path / "table.md").read_text()
    assert "top2 aware" in table
    # The aware-vs-SVD verdict carries its paired interval; study.json keeps intervals, not NLLs.
    svd_line = next(v for v in found["verdicts"] if v.startswith("activation-aware vs plain SVD"))
    assert "95% CI" in svd_line and svd_line in table
    saved = json.loads((tmp_path / "study.json").read_text())
    ci = next(i for i in saved["intervals"] if i["rows"] == ["top2 aware", "top2 svd"])
    assert ci["low"] <= ci["diff"] <= ci["high"] and ci["verdict"] in ("wins", "loses", "tie")
    assert (tmp_path / "study.json").stat().st_size < 100_000


def test_configuration_against_itself_is_a_tie_at_zero(study):
    """The same configuration evaluated twice: the same per-token NLLs, so the paired interval of
    its perplexity difference is exactly [0, 0] and the verdict a tie."""
    v = Variant(3, "optimized", "aware", 8)
    a = study.run("top1 aware", v, TopN(1), kind="topn", bits=3, n=1, rank=8, fit="aware")
    b = study.run("top1 aware again", v, TopN(1), kind="topn", bits=3, n=1, rank=8, fit="aware")
    ci = PairedVerdicts(study.rows, study.token_nlls).against("self", a, b)
    assert (ci.diff, ci.low, ci.high, ci.verdict) == (0.0, 0.0, 0.0, "tie")
    assert ci.units == 64 and ci.unit_tokens * 64 <= study.token_nlls[-1].numel()


def test_policy_option_adds_its_row_at_the_group_asked(study):
    """`--policy` rows go through the plan's own decision path and prices: a spec equal to one of
    the plan's rules reproduces its row exactly, a budgeted spec keeps within its budget; and
    every variant is stored at the plan's group."""
    blocks = {l: study.dm.blocks[l] for l in study.layers}
    intermediate, hidden = blocks[0][0].w1.shape[1:]
    per_rank = ExpertSizes(hidden, intermediate, Variant(3).fmt).fp16_bytes_per_rank
    budget = 10 * per_rank                    # one expert at rank 8 (the policy's step) fits
    opt = PlanOptions(bits=(3,), quantizers=("optimized",), ranks=(8,), topn=(2,), hi_bits=0, budgets=(),
                      compare_fits=False, compare_random=False, compare_alloc=False, other_bits_topn=False,
                      group=32, policies=("top-2@r8", f"budgeted:{budget}"), factors=("fp16",))
    first = len(study.rows)
    run_plan(study, opt, log=lambda s: None)
    rows = {r["name"]: r for r in study.rows[first:]}
    fixed, again = rows["int3 top-2 aware r8"], rows["int3 --policy top-2@r8"]
    assert again["kind"] == "policy" and again["spec"] == "top-2@r8"
    assert [again[f] for f in ("ppl", "bytes_per_token", "layer_err")] == [fixed[f] for f in ("ppl", "bytes_per_token", "layer_err")]
    uniform, budgeted = rows["uniform int3 optimized"], rows[f"int3 --policy budgeted:{budget}"]
    assert 0 < budgeted["bytes_per_token"] - uniform["bytes_per_token"] <= budget * len(blocks)
    g32 = sum(ExpertSizes(hidden, intermediate, Variant(3, group=32).fmt).weight_bytes() * rc.top_k
              for w, rc in blocks.values())
    assert uniform["bytes_per_token"] == g32 > sum(ExpertSizes(hidden, intermediate, Variant(3).fmt).weight_bytes()
                                                   * rc.top_k for w, rc in blocks.values())


def test_int4_factors_cost_less_and_keep_most_of_the_reduction(study):
    """A Top-k row with int4 factors against its fp16 twin: exact packed bytes (every slot restored
    at rank 8), below the twin's, and most of the twin's layer-error reduction kept."""
    k = study.dm.blocks[0][1].top_k
    plain = study.run("plain", Variant(3, "optimized"), kind="uniform", bits=3, quantizer="optimized")
    fp16 = study.run("topk fp16 f", Variant(3, "optimized", "aware", 8), TopN(k), kind="topn", bits=3, n=k, rank=8)
    int4 = study.run("topk int4 f", Variant(3, "optimized", "aware", 8, factor="int4"), TopN(k),
                     kind="topn", bits=3, n=k, rank=8, factor="int4")
    intermediate, hidden = study.dm.blocks[0][0].w1.shape[1:]
    rank_bytes = sum(bytes_per_rank(o, i, 4, 64, 64) for o, i in ((intermediate, hidden),) * 2 + ((hidden, intermediate),))
    assert int4["bytes_per_token"] - plain["bytes_per_token"] == len(LAYERS) * k * 8 * rank_bytes
    assert plain["bytes_per_token"] < int4["bytes_per_token"] < fp16["bytes_per_token"]
    kept = (plain["layer_err"] - int4["layer_err"]) / (plain["layer_err"] - fp16["layer_err"])
    assert kept > 0.8, kept


def test_unknown_factor_precision_is_refused(capsys):
    with pytest.raises(ValueError, match="factor precision must be one of .*'fp16', 'int8', 'int4', 'int3'.*'int5'"):
        Variant(3, rank=4, factor="int5")
    with pytest.raises(ValueError, match="fit 'svd'"):
        Variant(3, fit="svd", rank=4, factor="int4")
    with pytest.raises(SystemExit) as exc:       # argparse refuses it before the model loads
        main(["eval", "--factors", "fp16,int5", "--out", "/nonexistent/never-written"])
    assert exc.value.code == 2
    assert "--factors: must be a comma list of fp16, int8, int4, int3, not 'fp16,int5'" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--policy", "best"], "unknown restoration policy 'best'; expected none, top-N"),
    (["--policy", "budgeted:lots"], "policy 'budgeted:lots': the budget must be a non-negative number"),
    (["--policy", "hobbit", "--hi-bits", "0"], "policy 'hobbit' needs higher-precision copies; set --hi-bits"),
    (["--group", "96"], "argument --group: must be one of 32, 64, 128, not '96'"),
    (["--policy", "top-2@r32", "--rank", "4,16"], "policy 'top-2@r32': rank 32 is above the stored rank 16"),
    (["--budgets", "1,-2"], "argument --budgets: must be a finite number in (0, inf), not '-2'"),
    (["--budgets", "lots"], "argument --budgets: expected a number, not 'lots'")])
def test_eval_refuses_bad_options_before_loading(argv, message, capsys):
    try:
        code = main(["eval", *argv, "--out", "/nonexistent/never-written"])
    except SystemExit as exc:                    # argparse's own refusals exit from inside main
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_budgeted_policy_beats_every_fixed_rule_on_its_calibration_objective(study):
    """On the measured option tables (calibration rows), at the bytes of each fixed rule it could
    choose (Top-n at rank r, HOBBIT top-n int4 copies), the policy's objective is at least the rule's."""
    from ndpmoe.host.budget_policy import Option, objective, solve, spent
    from ndpmoe.host.budget_study import prepare
    from ndpmoe.model.moe import route

    setup = prepare(study, 3, "optimized", 8, ("fp16",), (4,), log=lambda s: None)
    p = setup.weight_power
    assert math.isfinite(p) and setup.exponent_fit["samples"] > 1000
    for l in study.layers:
        table, qm = setup.tables[l], setup.base[l]
        assert bool((table.gain[:, table.index(Option("factors", "fp16", 8))] > 0).all())   # measured, positive
        ids, w = route(study.calib_inputs[l], qm.router, qm.cfg)
        rules = [(n, Option("factors", "fp16", r)) for n in (1, 2, 4) for r in (1, 4, 8)]
        rules += [(n, Option("copy", bits=4)) for n in (1, 2)]
        for n, opt in rules:
            fixed = torch.zeros_like(ids)
            fixed[:, :n] = table.index(opt)
            budget = float(spent(table, ids, fixed)[0])
            mine = solve(table, ids, w, budget, p)
            assert bool((spent(table, ids, mine) <= budget + 1e-6).all())
            assert float(objective(table, ids, w, mine, p).sum()) >= float(objective(table, ids, w, fixed, p).sum()), opt


def test_budgeted_power_is_the_one_with_the_lowest_calibration_layer_error(study):
    """The power of w a budgeted row values slots with is chosen on the calibration rows: each
    tried power's error is that policy's layer error there (recomputed here from the float block),
    the row takes the lowest, and the row records what it tried."""
    from ndpmoe.host.budget_policy import MeasuredBudgetPolicy
    from ndpmoe.host.budget_study import BudgetRunner, choose_power, prepare, run_budgeted

    setup = prepare(study, 3, "optimized", 8, ("fp16",), (4,), log=lambda s: None)
    budget = float(setup.tables[study.layers[0]].cost[0].max())          # one int4 copy per token-layer
    best, tried = choose_power(study, setup, budget, grid=(2.0, 64.0))
    for p, err in tried.items():
        sq = []
        for l in study.layers:
            x = study.calib_inputs[l]
            ref = study.float_blocks[l](x)
            y = BudgetRunner(setup, l, MeasuredBudgetPolicy(budget, p)).held_out(x)
            sq.append(float((y - ref).square().sum() / ref.square().sum()))
        assert err == pytest.approx(math.sqrt(sum(sq) / len(sq)), rel=1e-6)
    assert tried[2.0] != tried[64.0]                                     # the power changes the choices here
    assert tried[best] == min(tried.values())
    first = len(study.rows)
    row = run_budgeted(study, setup, "budgeted power check", budget, kind="budgeted", bits=3)
    study.rows[first:], study.token_nlls[first:], study.row_errors[first:] = [], [], []
    errs = {float(p): e for p, e in row["power_calib_error"].items()}
    assert row["weight_power"] == min(errs, key=lambda p: (errs[p], p)) and len(errs) >= 5


def test_budget_runner_block_matches_the_per_expert_reference(study):
    """The budgeted rows' all-experts-at-once block (batched factor prefixes, copies) equals the
    reference loop on the same choices: each slot's option as a rank or a higher-precision copy."""
    from ndpmoe.host.budget_policy import MeasuredBudgetPolicy
    from ndpmoe.host.budget_study import BudgetRunner, prepare
    from ndpmoe.model.moe import route
    from ndpmoe.model.moe_quant import QuantizedMoE, moe_forward_quant

    setup = prepare(study, 3, "optimized", 8, ("fp16",), (4,), log=lambda s: None)
    layer = study.layers[0]
    runner = BudgetRunner(setup, layer, MeasuredBudgetPolicy(1.0, setup.weight_power))
    opts = runner.table.options
    x = study.eval_inputs[layer][:96]
    ids, w = route(x, runner.qm.router, runner.qm.cfg)
    choice = torch.randint(len(opts), ids.shape, generator=torch.Generator().manual_seed(0))
    restore = torch.tensor([o.rank if o.kind == "factors" else 0 for o in opts])[choice]
    hi = torch.tensor([o.kind == "copy" for o in opts])[choice]
    assert bool(hi.any()) and bool((restore > 0).any()) and bool(((restore == 0) & ~hi).any())
    f = setup.factors["fp16"][layer]
    ref_block = QuantizedMoE(f.fmt, f.experts, f.router, f.cfg, f.float_weights, setup.copies[4][layer].experts)
    ref = moe_forward_quant(x, ref_block, restore, hi, routing=(ids, w))
    got = runner.forward(x, ids, w, choice)
    # float32 sums in another order (batched products against per-expert ones)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5), float((got - ref).abs().max())


def test_budgeted_rows_carry_the_envelope_verdict_with_an_interval(study):
    """A budgeted row is compared, at no more bytes, with the lower envelope of the fixed rules
    (layer error, and perplexity with its paired interval)."""
    opt = PlanOptions(bits=(3, 4), quantizers=("optimized",), ranks=(8,), topn=(2,), hi_bits=4, budgets=(1.0,),
                      compare_fits=False, compare_random=False, compare_alloc=False, other_bits_topn=False,
                      factors=("fp16",))
    first = len(study.rows)
    run_plan(study, opt, log=lambda s: None)
    rows, nlls, errs = study.rows[first:], study.token_nlls[first:], study.row_errors[first:]
    bud = next(r for r in rows if r["kind"] == "budgeted")
    assert sum(bud["chosen"].values()) == pytest.approx(1.0, abs=1e-3) and bud["plan_us_per_token_layer"] > 0
    # each row's per-row errors are the ones its layer error was computed from
    for r, e in zip(rows, errs):
        assert r["layer_err"] == pytest.approx(math.sqrt(float((e.sum(1) / study.eval_ref_sq.sum(1)).mean())), rel=1e-12)
    record = []
    found = verdicts(rows, "optimized", nlls, record=record, layer_errors=(errs, study.eval_ref_sq))
    line = next(v for v in found if v.startswith(f"budgeted {bud['name']}"))
    assert "lower envelope" in line and line.count("95% CI") == 2         # layer error and perplexity
    err_ci = next(c for c in record if c.get("metric") == "layer_err" and c["rows"][0] == bud["name"])
    assert err_ci["low"] <= err_ci["diff"] <= err_ci["high"] and err_ci["verdict"] in ("wins", "loses", "tie")
    # Intervals shrink as the evaluation grows: the same two rows on the first quarter, half and
    # all of the evaluation tokens (32 resampling units each).
    from ndpmoe.host.paired_stats import paired_bootstrap
    uni = next(n for r, n in zip(rows, nlls) if r["name"] == "uniform int3 optimized")
    mine = nlls[rows.index(bud)]
    widths = []
    for part in (4, 2, 1):
        n = uni.numel() // part
        ci = paired_bootstrap(mine[:n], uni[:n], units=32)
        widths.append(ci.high - ci.low)
    assert widths[0] > widths[1] > widths[2], widths
