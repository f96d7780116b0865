"""Which configurations the study runs, and what its results say against the targets.

The plan is data (a list of steps), so the default `ndpmoe eval`, the demo's reduced study and the
test suite's tiny one differ only in their lists and sizes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ndpmoe.model.factor_quant import FACTOR_PRECISIONS, factor_bits, rank_share

from .paired_stats import DEFAULT_UNITS, MIN_UNITS, PairedInterval, paired_contrast, paired_layer_error
from .policy import HobbitTopHi, RandomN, TopN, get_policy
from .study import Study, Variant, block_sizes


@dataclass(frozen=True)
class PlanOptions:
    bits: tuple[int, ...] = (2, 3, 4)
    base_bits: int = 3
    ranks: tuple[int, ...] = (4, 16)
    topn: tuple[int, ...] = (1, 2, 4)
    quantizers: tuple[str, ...] = ("rtn", "optimized")
    hi_bits: int = 8
    budgets: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)  # x the factor bytes of Top-1 at the top rank
    compare_fits: bool = True
    compare_random: bool = True
    compare_alloc: bool = True
    policies: tuple[str, ...] = ()                   # extra runtime policy specs (--policy), one row each
    other_bits_topn: bool = True                     # Top-n rows on the other base widths too
    group: int = 64                                  # quantization group size of every variant
    # Factor precisions of the compensated Top-n rows (fp16, and packed int8 / int4 / int3 rows).
    factors: tuple[str, ...] = ("fp16", "int8", "int4", "int3")


REGIME_MODELS = ("mixtral-8x7b", "olmoe-1b-7b", "deepseek-v2-lite")


def copy_widths(opt: PlanOptions) -> tuple[int, ...]:
    """Bits of the higher-precision copies the study runs (HOBBIT rows, budgeted options): 4 and
    --hi-bits, those above the base width; none with --hi-bits 0."""
    if not opt.hi_bits:
        return ()
    return tuple(sorted(b for b in {4, opt.hi_bits} if b > opt.base_bits))


def regime_line(hidden: int, intermediate: int, bits: int, group: int, word_bits: int = 64,
                model: str = "this model", factors=FACTOR_PRECISIONS) -> str:
    """Bytes of one rank (w1, w3, w2) at each factor precision over one `bits`-bit expert: small is
    the paper's regime, where ranks are cheap."""
    from ndpmoe.model.contract import QuantFormat
    fmt = QuantFormat(bits, group, word_bits)
    return (f"{model} ({hidden} x {intermediate}, int{bits} experts): one rank = "
            + ", ".join(f"{p} {rank_share(hidden, intermediate, fmt, p):.2%}" for p in factors) + " of an expert")


def regime_lines(hidden: int, intermediate: int, bits: int, group: int, word_bits: int = 64) -> list[str]:
    """The regime line for the model under study and, for scale, the presets' shapes."""
    from .models import get_model
    out = [regime_line(hidden, intermediate, bits, group, word_bits)]
    for name in REGIME_MODELS:
        spec = get_model(name)
        out.append(regime_line(spec.hidden, spec.intermediate, bits, group, word_bits, name))
    return out


def extra_policies(opt: PlanOptions, top_k: int | None = None) -> list:
    """The --policy specs as policy objects, refused with a clear error before anything runs."""
    out = []
    for spec in opt.policies:
        policy = get_policy(spec, top_k)
        if getattr(policy, "needs_gain_tables", False):
            raise ValueError(f"restoration policy {spec!r} decides by a store's gain tables; the study runs the "
                             f"same measured-gain policy as its budgeted rows: use --budgets (multiples of Top-1's bytes)")
        if isinstance(policy, HobbitTopHi) and not opt.hi_bits:
            raise ValueError(f"restoration policy {spec!r} needs higher-precision copies; set --hi-bits above 0")
        rank = getattr(policy, "rank", None)
        if rank is not None and rank > max(opt.ranks):
            raise ValueError(f"restoration policy {spec!r}: rank {rank} is above the stored rank {max(opt.ranks)} "
                             f"(the largest of --rank); ask for a rank in 1..{max(opt.ranks)}")
        out.append(policy)
    return out


def run_plan(study: Study, opt: PlanOptions, log=print) -> list[str]:
    """Runs the plan's rows on the study; returns the regime lines it printed."""
    k = study.dm.blocks[study.layers[0]][1].top_k
    extra = extra_policies(opt, k)
    for p in opt.factors:
        factor_bits(p)                                  # an unknown precision, before anything runs
    w0 = study.dm.blocks[study.layers[0]][0]
    regime = regime_lines(w0.w1.shape[2], w0.w1.shape[1], opt.base_bits, opt.group)
    log("regime (one rank of factors over one expert):\n" + "\n".join(f"  {line}" for line in regime))
    r_top = max(opt.ranks)
    topn = [n for n in opt.topn if 0 < n <= k]
    q_best = opt.quantizers[-1]
    g = opt.group
    say = lambda row: log(f"  {row['name']:<44} ppl {row['ppl']:10.3f}   {row['bytes_per_token'] / 1e6:8.3f} MB/token"
                          f"   layer err {row['layer_err']:.4f}   ({row['seconds']:.0f} s)")

    say(study.run("fp16", None, kind="fp16"))
    for b in opt.bits:
        for qn in opt.quantizers:
            say(study.run(f"uniform int{b} {qn}", Variant(b, qn, group=g), kind="uniform", bits=b, quantizer=qn))

    base = Variant(opt.base_bits, q_best, "aware", r_top, group=g)
    for r in sorted(opt.ranks):
        for n in topn:
            say(study.run(f"int{opt.base_bits} top-{n} aware r{r}", base, TopN(n, r),
                          kind="topn", bits=opt.base_bits, n=n, rank=r, fit="aware"))
    if k not in topn:
        say(study.run(f"int{opt.base_bits} top-{k} (all) aware r{r_top}", base, TopN(k, r_top),
                      kind="topn", bits=opt.base_bits, n=k, rank=r_top, fit="aware"))
    for p in opt.factors:
        if p == "fp16":
            continue
        qv = Variant(opt.base_bits, q_best, "aware", r_top, group=g, factor=p)
        for r in sorted(opt.ranks):
            for n in topn:
                say(study.run(f"int{opt.base_bits} top-{n} aware r{r} {p} factors", qv, TopN(n, r),
                              kind="topn", bits=opt.base_bits, n=n, rank=r, fit="aware", factor=p))
    n_mid = topn[len(topn) // 2] if topn else 1
    if opt.compare_fits:
        svd = Variant(opt.base_bits, q_best, "svd", r_top, group=g)
        for r in sorted(opt.ranks):
            say(study.run(f"int{opt.base_bits} top-{n_mid} svd r{r}", svd, TopN(n_mid, r),
                          kind="topn", bits=opt.base_bits, n=n_mid, rank=r, fit="svd"))
    if opt.compare_random:
        say(study.run(f"int{opt.base_bits} random-{n_mid} aware r{r_top}", base,
                      lambda l: RandomN(n_mid, seed=l, rank=r_top),
                      kind="randomn", bits=opt.base_bits, n=n_mid, rank=r_top, fit="aware"))
    if opt.compare_alloc:
        # The same fp16 factor bytes as storing rank r_min for every matrix, spread by gain per byte.
        r_min = min(opt.ranks)
        qm0 = study.variant(base)[study.layers[0]]
        budget = r_min * block_sizes(qm0).fp16_bytes_per_rank * qm0.num_experts
        alloc = Variant(opt.base_bits, q_best, "aware", r_top, alloc_budget=budget, group=g)
        say(study.run(f"int{opt.base_bits} top-{n_mid} aware alloc(=r{r_min} bytes)", alloc, TopN(n_mid),
                      kind="alloc", bits=opt.base_bits, n=n_mid, rank=r_min, fit="aware", rule="gain"))
        kurt = Variant(opt.base_bits, q_best, "aware", r_top, alloc_budget=budget, group=g, alloc_rule="kurtosis")
        say(study.run(f"int{opt.base_bits} top-{n_mid} aware kurtosis alloc(=r{r_min} bytes)", kurt, TopN(n_mid),
                      kind="alloc", bits=opt.base_bits, n=n_mid, rank=r_min, fit="aware", rule="kurtosis"))
    copy_bits = copy_widths(opt)
    hv = Variant(opt.base_bits, q_best, "aware", r_top, hi_bits=opt.hi_bits, group=g) if opt.hi_bits else None
    for hb in copy_bits:
        hvb = Variant(opt.base_bits, q_best, "aware", r_top, hi_bits=hb, group=g)
        for n in topn[:2]:
            say(study.run(f"int{opt.base_bits} hobbit top-{n} int{hb}", hvb, HobbitTopHi(n),
                          kind="hobbit", bits=opt.base_bits, n=n, hi_bits=hb))
    if opt.budgets:
        from .budget_study import prepare, run_budgeted

        setup = prepare(study, opt.base_bits, q_best, r_top, opt.factors, copy_bits, g, log=log)
        unit = block_sizes(study.variant(base)[study.layers[0]]).fp16_bytes_per_rank * r_top
        for mult in opt.budgets:
            row = run_budgeted(study, setup, f"int{opt.base_bits} budgeted {mult:g}x", mult * unit,
                               kind="budgeted", bits=opt.base_bits, mult=mult)
            say(row)
            top = ", ".join(f"{k} {v:.0%}" for k, v in list(row["chosen"].items())[:5])
            log(f"      chose {top}; slots valued at w^{row['weight_power']:g} (the power with the lowest calibration "
                f"layer error of {len(row['power_calib_error'])} tried, in {row['power_seconds']:.0f} s); planning {row['plan_us_per_token_layer']:.0f} us "
                f"per token-layer; held-out reduction measured / predicted {row['gain_check']['ratio']}")
        study.budget_fit = setup.exponent_fit
    for spec, policy in zip(opt.policies, extra):
        # On the higher-precision variant where there is one: the same low-bit experts and
        # factors, plus the copies a hobbit or budgeted policy may buy.
        say(study.run(f"int{opt.base_bits} --policy {spec}", hv or base, policy,
                      kind="policy", bits=opt.base_bits, spec=spec))
    for b in opt.bits if opt.other_bits_topn else ():
        if b == opt.base_bits:
            continue
        v = Variant(b, q_best, "aware", r_top, group=g)
        for n in (n_mid, k):
            say(study.run(f"int{b} top-{n} aware r{r_top}", v, TopN(n, r_top),
                          kind="topn", bits=b, n=n, rank=r_top, fit="aware"))
    return regime


# ---------------------------------------------------------------------------------------------
# Verdicts against the targets of the accuracy issue
# ---------------------------------------------------------------------------------------------
def _uniform(rows, bits, quantizer):
    return next((r for r in rows if r.get("kind") == "uniform" and r.get("bits") == bits
                 and r.get("quantizer") == quantizer), None)


def _fp16_factors(row: dict) -> bool:
    return row.get("factor", "fp16") == "fp16"


class PairedVerdicts:
    """Paired 95 % intervals of perplexity contrasts between rows evaluated on the same tokens
    (host/paired_stats.py); each one asked for is recorded for study.json."""

    def __init__(self, rows: list[dict], nlls: list | None, layer_errors: tuple | None = None):
        self.nll = {} if nlls is None else {id(r): n for r, n in zip(rows, nlls)}
        # (each row's squared error per held-out row, the reference's per row): Study.row_errors, .eval_ref_sq
        self.row_sq = {} if layer_errors is None else {id(r): e for r, e in zip(rows, layer_errors[0])}
        self.ref_sq = None if layer_errors is None else layer_errors[1]
        self.record: list[dict] = []

    def contrast(self, what: str, terms: list[tuple[dict, float]]) -> PairedInterval | None:
        """sum coeff * ppl over the rows (first row first); None where a row's NLLs are not known."""
        nlls = [self.nll.get(id(r)) for r, _ in terms]
        if any(n is None for n in nlls) or nlls[0].numel() < MIN_UNITS:
            return None
        ci = paired_contrast(nlls, [c for _, c in terms], units=min(DEFAULT_UNITS, nlls[0].numel()))
        self.record.append({"comparison": what, "rows": [r["name"] for r, _ in terms],
                            "coeffs": [c for _, c in terms], **ci.to_json()})
        return ci

    def against(self, what: str, a: dict, b: dict) -> PairedInterval | None:
        return self.contrast(what, [(a, 1.0), (b, -1.0)])

    def layer_contrast(self, what: str, terms: list[tuple[dict, float]]) -> PairedInterval | None:
        """sum coeff * layer error over the rows; None where a row's per-row errors are not known."""
        errs = [self.row_sq.get(id(r)) for r, _ in terms]
        if any(e is None for e in errs) or self.ref_sq.shape[1] < MIN_UNITS:
            return None
        ci = paired_layer_error(errs, self.ref_sq, [c for _, c in terms],
                                units=min(DEFAULT_UNITS, self.ref_sq.shape[1]))
        self.record.append({"comparison": what, "metric": "layer_err", "rows": [r["name"] for r, _ in terms],
                            "coeffs": [c for _, c in terms], **ci.to_json()})
        return ci

    @staticmethod
    def text(ci: PairedInterval | None, wins: str, loses: str, tie: str = "tie", digits: int = 3) -> str:
        """'<diff> [low, high]: <verdict>'; without NLLs, the verdict of the point estimates is not stated."""
        if ci is None:
            return "no interval (per-token values not kept)"
        return f"{ci.describe(digits)} 95% CI: " + {"wins": wins, "loses": loses, "tie": tie}[ci.verdict]


def verdicts(rows: list[dict], quantizer: str, nlls: list | None = None,
             record: list | None = None, layer_errors: tuple | None = None) -> list[str]:
    """The study's statements against the targets. nlls: each row's per-token NLLs (aligned with
    rows), for paired 95 % intervals; a contrast is 'wins' or 'loses' only when its interval
    excludes zero, else 'tie'. layer_errors: (each row's squared error per held-out row, the
    reference's) for the intervals of the budgeted rows' layer error against the envelope.
    record: a list that receives every interval (for study.json)."""
    pv = PairedVerdicts(rows, nlls, layer_errors)
    out = []
    for lo, hi in ((3, 4), (2, 3)):
        a, b = _uniform(rows, lo, quantizer), _uniform(rows, hi, quantizer)
        if a is None or b is None:
            continue
        b0, b1 = a["bytes_per_token"], b["bytes_per_token"]
        inside = [r for r in rows if r.get("kind") in ("topn", "alloc", "budgeted", "hobbit", "policy") and r.get("bits") == lo
                  and b0 < r["bytes_per_token"] < b1]
        t = lambda r: (r["bytes_per_token"] - b0) / (b1 - b0)
        # The chord in perplexity (mixing lo- and hi-bit experts moves bytes linearly); the
        # geometric one (linear in log-perplexity) is stricter and reported beside it.
        lin = [r for r in inside if r["ppl"] < a["ppl"] + (b["ppl"] - a["ppl"]) * t(r)]
        geo = [r for r in inside if math.log(r["ppl"]) < math.log(a["ppl"]) + (math.log(b["ppl"]) - math.log(a["ppl"])) * t(r)]
        cis = {r["name"]: pv.contrast(f"int{lo}..int{hi} chord", [(r, 1.0), (a, -(1 - t(r))), (b, -t(r))]) for r in inside}
        below = [n for n, ci in cis.items() if ci is not None and ci.verdict == "wins"]
        above = [n for n, ci in cis.items() if ci is not None and ci.verdict == "loses"]
        best = min(inside, key=lambda r: r["ppl"])["name"] if inside else "none"
        known = sum(ci is not None for ci in cis.values())
        out.append(f"int{lo}..int{hi} chord ({quantizer}): {len(lin)} of {len(inside)} compensated configurations between "
                   f"the uniform points lie below it ({len(geo)} below the stricter log-ppl chord); best {best}"
                   + (f"; paired 95% CI: {len(below)} of {known} significantly below, {len(above)} above, "
                      f"{known - len(below) - len(above)} tie" if known else ""))
        for n, ci in cis.items():
            if ci is not None:
                out.append(f"  {n} against the int{lo}..int{hi} chord at its bytes: "
                           + pv.text(ci, "below the chord", "above the chord"))
    for r in rows:
        if r.get("kind") == "randomn":
            twin = next((t for t in rows if t.get("kind") == "topn" and t.get("n") == r["n"] and t.get("rank") == r["rank"]
                         and t.get("fit") == "aware" and t.get("bits") == r["bits"] and _fp16_factors(t)), None)
            if twin:
                ci = pv.against(f"top-{r['n']} vs random-{r['n']}", twin, r)
                out.append(f"router-guided top-{r['n']} ppl {twin['ppl']:.3f} vs random-{r['n']} {r['ppl']:.3f} at "
                           f"{twin['bytes_per_token'] / 1e6:.3f} vs {r['bytes_per_token'] / 1e6:.3f} MB/token: "
                           + pv.text(ci, "top-n wins", "random wins"))
        if r.get("kind") == "topn" and r.get("fit") == "svd":
            twin = next((t for t in rows if t.get("kind") == "topn" and t.get("fit") == "aware" and t.get("n") == r["n"]
                         and t.get("rank") == r["rank"] and t.get("bits") == r["bits"] and _fp16_factors(t)), None)
            if twin:
                ci = pv.against(f"aware vs svd top-{r['n']} r{r['rank']}", twin, r)
                out.append(f"activation-aware vs plain SVD (top-{r['n']}, r{r['rank']}, equal bytes): ppl {twin['ppl']:.3f} vs "
                           f"{r['ppl']:.3f}: " + pv.text(ci, "aware wins", "SVD wins"))
        if r.get("kind") == "alloc":
            fixed = [t for t in rows if t.get("kind") == "topn" and t.get("fit") == "aware" and t.get("n") == r["n"]
                     and t.get("bits") == r["bits"] and t["bytes_per_token"] <= r["bytes_per_token"] * 1.05]
            if fixed:
                best = min(fixed, key=lambda t: t["ppl"])
                ci = pv.against(f"rank allocation ({r.get('rule', 'gain')}) vs best fixed rank", r, best)
                out.append(f"rank allocation ({r.get('rule', 'gain')}) ppl {r['ppl']:.3f} at {r['bytes_per_token'] / 1e6:.3f} MB/token vs best fixed rank at "
                           f"<= those bytes ({best['name']}) {best['ppl']:.3f}: "
                           + pv.text(ci, "allocation wins", "fixed rank wins"))
    uni = {r["bits"]: r for r in rows if r.get("kind") == "uniform" and r.get("quantizer") == quantizer}
    fp = next((r for r in rows if r.get("kind") == "fp16"), None)
    if fp:
        for r in rows:
            if r.get("kind") == "topn" and r.get("fit") == "aware" and r.get("bits") in uni:
                u = uni[r["bits"]]
                gap = u["ppl"] - fp["ppl"]
                if gap > 0:
                    ci = pv.against(f"{r['name']} vs uniform int{r['bits']}", r, u)
                    out.append(f"int{r['bits']} top-{r['n']} r{r['rank']} {r.get('factor', 'fp16')} factors: recovers {(u['ppl'] - r['ppl']) / gap:6.1%} of the "
                               f"int{r['bits']}->fp16 gap for +{(r['bytes_per_token'] - u['bytes_per_token']) / 1e6:.3f} MB/token; "
                               f"against uniform int{r['bits']}: " + pv.text(ci, "wins", "loses"))
    for r in rows:
        if r.get("kind") == "hobbit":
            near = [t for t in rows if t.get("kind") in ("topn", "budgeted") and t.get("bits") == r["bits"]
                    and abs(t["bytes_per_token"] - r["bytes_per_token"]) <= 0.1 * r["bytes_per_token"]]
            if near:
                best = min(near, key=lambda t: t["ppl"])
                ci = pv.against(f"{r['name']} vs {best['name']}", r, best)
                out.append(f"HOBBIT {r['name']} ppl {r['ppl']:.3f} at {r['bytes_per_token'] / 1e6:.3f} MB/token vs best Top-n / budgeted "
                           f"(which may buy copies too) within 10% bytes ({best['name']}) {best['ppl']:.3f}: "
                           + pv.text(ci, "HOBBIT wins", "HOBBIT loses"))
    gain_alloc = next((r for r in rows if r.get("kind") == "alloc" and r.get("rule") == "gain"), None)
    for r in rows:
        if r.get("kind") == "alloc" and r.get("rule") == "kurtosis" and gain_alloc is not None:
            ci = pv.against("kurtosis vs measured-gain rank allocation", r, gain_alloc)
            out.append(f"kurtosis-guided rank allocation ppl {r['ppl']:.3f}, layer err {r['layer_err']:.4f} at "
                       f"{r['bytes_per_token'] / 1e6:.3f} MB/token vs measured-gain allocation {gain_alloc['ppl']:.3f}, "
                       f"{gain_alloc['layer_err']:.4f} at {gain_alloc['bytes_per_token'] / 1e6:.3f}: "
                       + pv.text(ci, "kurtosis wins", "kurtosis loses"))
    for r in rows:
        if r.get("kind") == "budgeted":
            env_err = envelope(rows, quantizer, r["bits"], r["bytes_per_token"], "layer_err")
            env_ppl = envelope(rows, quantizer, r["bits"], r["bytes_per_token"], "ppl")
            if env_err is None:
                continue
            env_rms = envelope(rows, quantizer, r["bits"], r["bytes_per_token"], "layer_err", "rms")
            word = lambda env: "at or below" if r["layer_err"] <= env[0] else "above"
            err_ci = pv.layer_contrast(f"{r['name']} vs envelope ({env_err[1]}), layer error", [(r, 1.0)] + env_err[2])
            line = (f"budgeted {r['name']} at {r['bytes_per_token'] / 1e6:.3f} MB/token: layer err {r['layer_err']:.6f} "
                    f"{word(env_err)} the fixed rules' lower envelope {env_err[0]:.6f} ({env_err[1]}): "
                    + pv.text(err_ci, "budgeted wins", "budgeted loses (worse beyond the CI)", "tie (within the CI)", 6)
                    + f"; {word(env_rms)} {env_rms[0]:.4f} with the reachable rms chord ({env_rms[1]})")
            ci = pv.contrast(f"{r['name']} vs envelope ({env_ppl[1]})", [(r, 1.0)] + env_ppl[2])
            line += (f"; ppl {r['ppl']:.3f} vs envelope {env_ppl[0]:.3f} ({env_ppl[1]}): "
                     + pv.text(ci, "budgeted wins", "budgeted loses (worse beyond the CI)", "tie (within the CI)"))
            out.append(line)
    if record is not None:
        record.extend(pv.record)
    return out


FIXED_KINDS = ("topn", "hobbit")


def envelope(rows: list[dict], quantizer: str, bits: int, at_bytes: float, key: str, chord: str = "linear"):
    """The lowest `key` (layer_err or ppl) any fixed configuration reaches at no more than
    `at_bytes`: Top-n x rank x factor precision and HOBBIT rows, the uniform rows, and the
    chord between uniform int{bits} and int{bits+1} (storing a share of the experts at the higher
    width; linear in bytes). chord "linear" interpolates `key` itself (the issue's chord); "rms"
    interpolates its square, what mixing experts of the two widths reaches when their errors add
    independently (the layer error is an RMS). (value, what, contrast terms against it) or None."""
    cands = [(t[key], t["name"], [(t, -1.0)]) for t in rows
             if (t.get("kind") in FIXED_KINDS or (t.get("kind") == "uniform" and t.get("quantizer") == quantizer))
             and t["bytes_per_token"] <= at_bytes * (1 + 1e-9)]
    a, b = _uniform(rows, bits, quantizer), _uniform(rows, bits + 1, quantizer)
    if a is not None and b is not None and a["bytes_per_token"] <= at_bytes <= b["bytes_per_token"]:
        t = (at_bytes - a["bytes_per_token"]) / (b["bytes_per_token"] - a["bytes_per_token"])
        if chord == "rms":
            value = math.sqrt(a[key] ** 2 + (b[key] ** 2 - a[key] ** 2) * t)
        else:
            value = a[key] + (b[key] - a[key]) * t
        cands.append((value, f"int{bits}..int{bits + 1} {chord} chord", [(a, -(1 - t)), (b, -t)]))
    return min(cands, key=lambda c: c[0]) if cands else None
