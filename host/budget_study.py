"""The measured-gain budgeted policy in the accuracy study: option tables measured on calibration
data, the router-weight exponent checked against measurement, the block that runs any option per
slot, and the study rows it makes.

Gains. For every layer, expert e and option o (host/budget_policy.py), the expert runs on the
calibration rows routed to it (`Study.calib_inputs`, disjoint from the held-out rows the layer
error is measured on) as the low-bit expert, and as the low-bit expert under o; gain[e, o] is the
mean over those rows of ||f_lo(x) - f(x)||^2 - ||f_o(x) - f(x)||^2 (f: the float expert), the full
SwiGLU run, nothing inferred from spectra.

Router weight. A slot with weight w changes the layer's squared error by
||E||^2 - ||E + w d||^2 = w^2 (||e_s||^2 - ||e_o||^2) - 2 w <E - w e_s, d> (E: the layer's error
with every slot low-bit, e_s / e_o: the slot's own error before / after, d = f_o - f_lo). The first
term is w^2 x gain; the second vanishes when slots' errors are independent. `weight_exponent`
measures it: it takes (w, actual reduction, gain) for every calibration (row, slot) under each of
the expert's options, divides out each token's own scale (which cannot change a token's choice),
bins them by w and fits log(sum reduction / sum gain) against log w.

Which power the policy uses. The fit says how one slot's reduction grows with w; it leaves out how
the slots of one token interact, and the exponent that spends a budget best is not the fitted one
at every budget (on the default model a higher power wins at 0.5x, 1x and 4x Top-1's bytes and
loses at 2x, where int4 copies for every slot fill the budget). So the power is chosen, per
budget, by the policy's own layer error on the calibration rows the gains were measured on
(`choose_power`: the RMS over layers of the relative output error, as the held-out layer error is
computed), over POWER_GRID; the held-out rows never take part.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ndpmoe.model.moe import expert_mlp, route, shared_expert
from ndpmoe.model.moe_quant import MATRICES, QuantizedMoE
from ndpmoe.model.moe_quant_masked import MaskedQuantMoE, StackedFactors
from ndpmoe.model.threads import torch_threads

from .budget_policy import COPY_BITS, MeasuredBudgetPolicy, Option, OptionTable, objective, option_list, spent
from .paired_stats import layer_error_of
from .sizes import ExpertSizes

WEIGHT_BINS = 8
POWER_GRID = (2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)   # powers of w choose_power tries


@dataclass
class BudgetSetup:
    """What the policy's rows need, per layer: the low-bit block, each precision's compensators,
    each copy, and the option table; plus the measured router-weight exponent."""
    base: dict[int, QuantizedMoE]
    factors: dict[str, dict[int, QuantizedMoE]]       # precision -> layer -> block holding those factors
    copies: dict[int, dict[int, QuantizedMoE]]        # bits -> layer -> block of copies
    tables: dict[int, OptionTable]
    lo_bytes: int
    weight_power: float
    exponent_fit: dict
    seconds: float
    _stacks: dict = field(default_factory=dict, repr=False)
    _calib: dict = field(default_factory=dict, repr=False)      # layer -> (runner, float output on calib rows)

    def stacked(self, precision: str, layer: int) -> StackedFactors:
        """The layer's compensators at `precision`, stacked for the batched corrections (built once)."""
        key = (precision, layer)
        if key not in self._stacks:
            self._stacks[key] = StackedFactors(self.factors[precision][layer])
        return self._stacks[key]


def option_costs(options, sizes: ExpertSizes, copy_sizes: dict[int, ExpertSizes]) -> list[int]:
    """Bytes each option moves beyond the low-bit expert (exact, from the contract sizes)."""
    out = []
    for o in options:
        if o.kind == "factors":
            out.append(sum(sizes.matrix_factor_bytes(m, o.rank, o.precision) for m in MATRICES))
        elif o.kind == "copy":
            out.append(copy_sizes[o.bits].weight_bytes("lo") - sizes.weight_bytes("lo"))
        else:
            out.append(0)
    return out


def _prefix_outputs(ex_lo, comps: dict, x: torch.Tensor, a1: torch.Tensor, a3: torch.Tensor, ranks) -> dict:
    """{rank: the low-bit expert's output with the rank prefix of `comps` ({matrix: LowRank})
    applied}, sharing B x across the prefixes (a1 / a3: the low-bit x W1^T and x W3^T)."""
    p = {m: x @ comps[m].B.t() for m in ("w1", "w3") if m in comps}
    w2 = ex_lo.weight("w2")
    out = {}
    for r in ranks:
        b1, b3 = a1, a3
        if "w1" in p:
            k = min(r, comps["w1"].rank)
            b1 = a1 + p["w1"][:, :k] @ comps["w1"].A[:, :k].t()
        if "w3" in p:
            k = min(r, comps["w3"].rank)
            b3 = a3 + p["w3"][:, :k] @ comps["w3"].A[:, :k].t()
        h = F.silu(b1) * b3
        y = h @ w2.t()
        if "w2" in comps:
            k = min(r, comps["w2"].rank)
            y = y + (h @ comps["w2"].B[:k].t()) @ comps["w2"].A[:, :k].t()
        out[r] = y
    return out


def measure_layer(base: QuantizedMoE, factors: dict[str, QuantizedMoE], copies: dict[int, QuantizedMoE],
                  options: tuple[Option, ...], x: torch.Tensor) -> tuple[torch.Tensor, list[tuple], tuple]:
    """gain [E, O] on rows x [N, D], and for the exponent check (w, reduction, option gain x the
    token's scale) per (row, slot, option), as tensors per (expert, option); and (sum of measured
    reductions, sum of w^2 x gain) over them."""
    w = base.float_weights
    ids, weights = route(x, base.router, base.cfg)
    xf = x.float()
    e_num, o_num = base.num_experts, len(options)
    gain = torch.zeros(e_num, o_num, dtype=torch.float64)
    outs = {}                                             # e -> (rows, slot, f_ref, f_lo, {o: f_o})
    layer_err = torch.zeros_like(xf)                      # E: every selected slot low-bit
    for e in range(e_num):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        xs = xf[tok]
        ref = expert_mlp(xs, w.w1[e].float(), w.w3[e].float(), w.w2[e].float())
        lo = base.experts[e].forward(xs)
        err_lo = (lo - ref).square().sum(1)
        layer_err.index_add_(0, tok, (lo - ref) * weights[tok, slot, None])
        f_opt = {}
        ex = base.experts[e]
        a1, a3 = xs @ ex.weight("w1").t(), xs @ ex.weight("w3").t()
        prefix = {p: _prefix_outputs(ex, f.experts[e].comp, xs, a1, a3,
                                     sorted({o.rank for o in options if o.precision == p}))
                  for p, f in factors.items()}
        for i, o in enumerate(options):
            if o.kind == "factors":
                f_opt[i] = prefix[o.precision][o.rank]
            elif o.kind == "copy":
                f_opt[i] = copies[o.bits].experts[e].forward(xs)
            else:
                continue
            gain[e, i] = float((err_lo - (f_opt[i] - ref).square().sum(1)).double().mean())
        outs[e] = (tok, slot, lo, f_opt)
    samples = []
    for e, (tok, slot, lo, f_opt) in outs.items():
        ww = weights[tok, slot].double()
        big = layer_err[tok].double()
        for i, f in f_opt.items():
            d = (f - lo).double() * ww[:, None]
            red = big.square().sum(1) - (big + d).square().sum(1)
            samples.append((ww, red, torch.full_like(ww, float(gain[e, i])), tok))
    # A token's own scale (its input's norm, how hard it is) multiplies every slot's reduction
    # alike and cannot change its choice: divide it out, so the fit sees how the reduction
    # depends on w between the slots of one token.
    num = torch.zeros(x.shape[0], dtype=torch.float64)
    den = torch.zeros(x.shape[0], dtype=torch.float64)
    for ww, red, g, tok in samples:
        num.index_add_(0, tok, red)
        den.index_add_(0, tok, ww.square() * g)
    scale = torch.where(den > 0, num / den.clamp_min(1e-30), torch.ones_like(num))
    totals = (float(num.sum()), float(den.sum()))
    return gain, [(ww, red, g * scale[tok]) for ww, red, g, tok in samples], totals


def weight_exponent(samples: list[tuple], totals: tuple[float, float] = (math.nan, math.nan),
                    bins: int = WEIGHT_BINS) -> dict:
    """Fit reduction ~ c w^p x gain on (w, reduction, gain) samples binned by w quantiles."""
    w = torch.cat([s[0] for s in samples])
    red = torch.cat([s[1] for s in samples])
    g = torch.cat([s[2] for s in samples])
    keep = (g > 0) & (w > 0)
    w, red, g = w[keep], red[keep], g[keep]
    edges = torch.quantile(w.float(), torch.linspace(0, 1, bins + 1)).double()
    xs, ys, table = [], [], []
    for b in range(bins):
        m = (w >= edges[b]) & ((w < edges[b + 1]) if b < bins - 1 else (w <= edges[b + 1]))
        if m.sum() < 10:
            continue
        ratio = float(red[m].sum() / g[m].sum())
        mw = float(w[m].mean())
        table.append((round(mw, 4), round(ratio, 5)))
        if ratio > 0:
            xs.append(math.log(mw))
            ys.append(math.log(ratio))
    if len(xs) < 2:
        return {"p": 2.0, "bins": table, "note": "too few bins with a positive reduction; p = 2 assumed"}
    xm, ym = sum(xs) / len(xs), sum(ys) / len(ys)
    p = sum((a - xm) * (b - ym) for a, b in zip(xs, ys)) / sum((a - xm) ** 2 for a in xs)
    # share of the measured reduction that the independent-slot term w^2 x gain accounts for
    share = totals[1] / totals[0] if totals[0] > 0 else math.nan
    return {"p": round(p, 3), "c": round(math.exp(ym - p * xm), 4), "bins": table,
            "w2_share": round(share, 4), "samples": int(w.numel())}


def measure_tables(blocks, options: tuple[Option, ...], costs: list[int], inputs: dict[int, torch.Tensor],
                   on_layer=None, threads: int | None = None) -> tuple[dict[int, OptionTable], dict]:
    """Every layer's option table and the router-weight fit (weight_exponent) over all of them.
    blocks(layer) -> (low-bit block, {precision: block with those factors}, {bits: block of
    copies}), asked one layer at a time; inputs: calibration rows per layer; costs: bytes per
    option (option_costs); on_layer(i, layer, seconds) after each layer (progress); threads: torch's
    thread count while measuring (None: unchanged; 1 for small experts, model/threads.py)."""
    tables, samples, tot = {}, [], [0.0, 0.0]
    for i, l in enumerate(inputs):
        t0 = time.time()
        base, factors, copies = blocks(l)
        with torch_threads(threads):
            gain, s, (red, pred) = measure_layer(base, factors, copies, options, inputs[l])
        tot[0] += red
        tot[1] += pred
        cost = torch.tensor(costs, dtype=torch.float64).expand(gain.shape[0], -1).clone()
        tables[l] = OptionTable(options, cost, gain)
        samples += s
        if on_layer is not None:
            on_layer(i, l, time.time() - t0)
    return tables, weight_exponent(samples, tuple(tot))


def prepare(study, bits: int, quantizer: str, stored_rank: int, precisions, copy_bits=COPY_BITS, group: int = 64,
            weight_power: float | None = None, log=print) -> BudgetSetup:
    """Build (or reuse) the variants the options need and measure every layer's option table.
    weight_power: the exponent of w the policy values a slot's gain with; None takes the one
    fitted on the calibration rows (weight_exponent), 2 is the independent-slot term."""
    from .study import Variant, block_sizes

    t0 = time.time()
    copy_bits = tuple(b for b in copy_bits if b > bits)
    base = study.variant(Variant(bits, quantizer, group=group))
    factors = {p: study.variant(Variant(bits, quantizer, "aware", stored_rank, group=group, factor=p))
               for p in precisions}
    copies = {b: study.variant(Variant(b, quantizer, group=group)) for b in copy_bits}
    options = option_list(precisions, stored_rank, copy_bits)
    l0 = study.layers[0]
    sizes = block_sizes(factors[precisions[0]][l0]) if precisions else block_sizes(base[l0])
    copy_sizes = {b: block_sizes(copies[b][l0]) for b in copy_bits}
    costs = option_costs(options, sizes, copy_sizes)
    blocks = lambda l: (base[l], {p: f[l] for p, f in factors.items()}, {b: c[l] for b, c in copies.items()})
    tables, fit = measure_tables(blocks, options, costs, study.calib_inputs, threads=study.part_threads)
    log(f"  measured gains of {len(options)} options x {base[l0].num_experts} experts x {len(study.layers)} layers; "
        f"router weight: reduction ~ w^{fit['p']} x gain (w^2 x gain is {fit.get('w2_share', math.nan):.1%} of the "
        f"measured reduction) in {time.time() - t0:.0f} s")
    power = float(fit["p"]) if weight_power is None else float(weight_power)
    return BudgetSetup(base, factors, copies, tables, sizes.weight_bytes("lo"), power, fit, time.time() - t0)


class BudgetRunner:
    """The block function of one layer under the measured-budget policy; tallies bytes, options
    and the policy's predicted gain as it runs."""

    def __init__(self, setup: BudgetSetup, layer: int, policy: MeasuredBudgetPolicy):
        self.setup, self.layer, self.policy = setup, layer, policy
        self.qm = setup.base[layer]
        self.cfg = self.qm.cfg
        self.table = setup.tables[layer]
        self.masked = MaskedQuantMoE(self.qm)
        opts = self.table.options
        # each option's rank per factor precision (0: the option applies none of that precision's)
        self.factors = {p: (setup.stacked(p, layer),
                            torch.tensor([o.rank if o.kind == "factors" and o.precision == p else 0 for o in opts]))
                        for p in setup.factors}
        self.kind = torch.tensor([{"none": 0, "factors": 1, "copy": 2}[o.kind] for o in opts])
        self.bytes = 0.0
        self.tokens = 0
        self.chosen = Counter()
        self.plan_seconds = 0.0

    def choose(self, x: torch.Tensor):
        ids, weights = route(x, self.qm.router, self.cfg)
        t0 = time.perf_counter()
        choice = self.policy.decide(ids, weights, self.table)
        self.plan_seconds += time.perf_counter() - t0
        return ids, weights, choice

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights, choice = self.choose(x)
        self.bytes += float(spent(self.table, ids, choice).sum()) + self.setup.lo_bytes * ids.numel()
        self.tokens += x.shape[0]
        self.chosen.update(choice.flatten().tolist())
        return self.forward(x, ids, weights, choice)

    def held_out(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights, choice = self.choose(x)
        return self.forward(x, ids, weights, choice)

    def forward(self, x, ids, weights, choice) -> torch.Tensor:
        """x [T, D]; choice [T, K] option indices into the table."""
        qm, mq, size, opts = self.qm, self.masked, self.masked.intermediate, self.table.options
        t = ids.shape[0]
        xf, weights = x.float(), weights.float()
        kind = self.kind[choice]
        gate = torch.zeros(t, qm.num_experts).scatter_(1, ids, torch.where(kind == 2, 0.0, weights))
        a1, a3 = xf @ mq.w1.t(), xf @ mq.w3.t()
        ranks = {p: (stacked, stacked.ranks(ids, rank_of[choice])) for p, (stacked, rank_of) in self.factors.items()}
        for stacked, rank in ranks.values():
            a1, a3 = stacked.add_inputs(a1, a3, xf, rank)
        h = F.silu(a1) * a3
        out = (h.view(t, -1, size) * gate[:, :, None]).flatten(1) @ mq.w2.t()
        for stacked, rank in ranks.values():
            out = stacked.add_output(out, h, rank, gate)
        cp = kind == 2
        for e, o, tok, slot in _slot_groups(cp, ids, choice):
            copy = self.setup.copies[opts[o].bits][self.layer].experts[e]
            out.index_add_(0, tok, copy.forward(xf[tok]) * weights[tok, slot, None])
        return out + shared_expert(xf, qm.float_weights)


def _slot_groups(mask: torch.Tensor, ids: torch.Tensor, choice: torch.Tensor):
    """(expert, option, tokens, slots) for each distinct (expert, option) among the [T, K] slots
    `mask` selects, so each expert's option runs once over all its tokens."""
    if not mask.any():
        return
    tok_all, slot_all = mask.nonzero(as_tuple=True)
    e_all, o_all = ids[tok_all, slot_all], choice[tok_all, slot_all]
    for e, o in torch.unique(torch.stack([e_all, o_all], 1), dim=0).tolist():
        sel = (e_all == e) & (o_all == o)
        yield e, o, tok_all[sel], slot_all[sel]


def calibration_error(study, setup: BudgetSetup, policy: MeasuredBudgetPolicy) -> float:
    """The policy's layer error on the calibration rows its gains were measured on: RMS over
    layers of ||block(x) - float block(x)|| / ||float block(x)|| (Study.layer_error's formula)."""
    err, den = [], []
    with torch_threads(study.part_threads):          # small per-expert products (model/threads.py)
        for l in study.layers:
            if l not in setup._calib:
                x = study.calib_inputs[l]
                setup._calib[l] = (BudgetRunner(setup, l, policy), study.float_blocks[l](x))
            runner, ref = setup._calib[l]
            runner.policy = policy
            err.append((runner.held_out(study.calib_inputs[l]) - ref).double().square().sum())
            den.append(ref.double().square().sum())
    return float(layer_error_of(torch.stack(err), torch.stack(den)))


def choose_power(study, setup: BudgetSetup, budget: float, grid=POWER_GRID) -> tuple[float, dict]:
    """The power of w (module text) whose policy has the lowest calibration layer error at
    `budget`, and every tried power's error {p: error}. Ties go to the smaller power."""
    tried = {}
    for p in grid:
        tried[float(p)] = calibration_error(study, setup, MeasuredBudgetPolicy(budget, p))
    best = min(tried, key=lambda p: (tried[p], p))
    return best, tried


def run_budgeted(study, setup: BudgetSetup, name: str, budget: float, weight_power: float | None = None,
                 **meta) -> dict:
    """One study row of the measured-budget policy at `budget` bytes per token and layer, valuing
    slots at w^weight_power (None: the one choose_power picks on the calibration rows)."""
    tried, t0 = None, time.time()
    if weight_power is None:
        weight_power, tried = choose_power(study, setup, budget)
    policy = MeasuredBudgetPolicy(budget, weight_power)
    meta["weight_power"] = weight_power
    if tried is not None:
        meta["power_calib_error"] = {f"{p:g}": round(e, 6) for p, e in tried.items()}
        meta["power_seconds"] = round(time.time() - t0, 1)
    runners = {l: BudgetRunner(setup, l, policy) for l in study.layers}
    row = study.run_runners(name, runners, budget_bytes=budget * len(study.layers), **meta)
    total = Counter()
    for r in runners.values():
        total.update(r.chosen)
    n = sum(total.values())
    opts = setup.tables[study.layers[0]].options
    row["chosen"] = {opts[i].label: round(c / n, 4) for i, c in total.most_common()}
    slots = sum(r.tokens for r in runners.values())
    row["plan_us_per_token_layer"] = round(1e6 * sum(r.plan_seconds for r in runners.values()) / max(slots, 1), 2)
    row["gain_check"] = gain_check(study, setup, policy)
    return row


def gain_check(study, setup: BudgetSetup, policy: MeasuredBudgetPolicy) -> dict:
    """On the held-out rows: the layers' squared-error reduction the policy's choices predict
    (sum of w^2 x gain, the independent-slot estimate) against the reduction measured."""
    pred = real = 0.0
    for l in study.layers:
        runner = BudgetRunner(setup, l, policy)
        x, ref = study.eval_inputs[l], study.eval_refs[l]
        ids, weights, choice = runner.choose(x)
        none = torch.zeros_like(choice)
        lo = runner.forward(x, ids, weights, none)
        y = runner.forward(x, ids, weights, choice)
        real += float((lo - ref).square().sum() - (y - ref).square().sum()) / x.shape[0]
        pred += float(objective(runner.table, ids, weights, choice, 2.0).sum()) / x.shape[0]
    return {"predicted": round(pred, 6), "measured": round(real, 6),
            "ratio": round(real / pred, 4) if pred > 0 else None}
