"""The study's Pareto plot: perplexity (with paired interval bars) and held-out layer error
against MB moved per token; colour per kind of configuration, marker per factor precision, the
lower envelope of the fixed rules and the budgeted policy's frontier as lines."""
from __future__ import annotations

from pathlib import Path

KIND_STYLE = {  # kind -> (colour, label)
    "fp16": ("black", "fp16"),
    "uniform": ("tab:gray", "uniform low-bit"),
    "topn": ("tab:blue", "Top-n restoration"),
    "randomn": ("tab:red", "random-n restoration"),
    "alloc": ("tab:purple", "Top-n, allocated ranks"),
    "hobbit": ("tab:orange", "HOBBIT-style copies"),
    "budgeted": ("tab:green", "budgeted policy (measured gains)"),
    "policy": ("tab:brown", "--policy rows"),
}
FACTOR_MARKER = {"fp16": "o", "int8": "s", "int4": "^", "int3": "v"}    # compensated rows
OTHER_MARKER = {"fp16": "*", "uniform": "D", "hobbit": "X", "budgeted": "P", "policy": "h"}
FIXED = ("uniform", "topn", "hobbit")


def _marker(row: dict) -> str:
    if row.get("kind") in ("topn", "alloc", "randomn"):
        return FACTOR_MARKER.get(row.get("factor", "fp16"), "o")
    return OTHER_MARKER.get(row.get("kind"), "o")


def lower_envelope(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The staircase of the lowest value reached at no more bytes: (bytes, value) corners."""
    out, best = [], float("inf")
    for b, v in sorted(points):
        if v < best:
            if out:
                out.append((b, best))
            out.append((b, v))
            best = v
    return out


def intervals_against(rows: list[dict], nlls: list | None, base: dict | None) -> dict[int, tuple[float, float]]:
    """id(row) -> (low, high) of its perplexity: the paired 95 % interval of ppl_row - ppl_base,
    shifted onto the row's own perplexity (the uncertainty of its place against the base)."""
    from .paired_stats import DEFAULT_UNITS, MIN_UNITS, paired_bootstrap

    if nlls is None or base is None:
        return {}
    by_id = {id(r): n for r, n in zip(rows, nlls)}
    ref = by_id.get(id(base))
    if ref is None or ref.numel() < MIN_UNITS:
        return {}
    out = {}
    for r in rows:
        n = by_id.get(id(r))
        if n is None or r is base or n.numel() != ref.numel():
            continue
        ci = paired_bootstrap(n, ref, units=min(DEFAULT_UNITS, n.numel()))
        out[id(r)] = (r["ppl"] + ci.low - ci.diff, r["ppl"] + ci.high - ci.diff)
    return out


def plot_pareto(rows: list[dict], path: Path, title: str = "", nlls: list | None = None,
                base_bits: int | None = None, quantizer: str | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next((r for r in rows if r.get("kind") == "uniform" and r.get("bits") == base_bits
                 and r.get("quantizer") == quantizer), None)
    bars = intervals_against(rows, nlls, base)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, key, label in ((axes[0], "ppl", "perplexity"), (axes[1], "layer_err", "held-out layer-output error")):
        pts = [r for r in rows if not (key == "layer_err" and r.get("kind") == "fp16")]
        seen = set()
        for r in pts:
            colour, kind_label = KIND_STYLE.get(r.get("kind"), ("tab:brown", str(r.get("kind") or "other")))
            x, y = r["bytes_per_token"] / 1e6, r[key]
            tag = (r.get("kind"), _marker(r))
            name = kind_label + (f" ({r.get('factor', 'fp16')} factors)" if r.get("kind") in ("topn", "alloc", "randomn") else "")
            ax.scatter([x], [y], marker=_marker(r), color=colour, s=40, label=None if tag in seen else name, zorder=3)
            seen.add(tag)
            if key == "ppl" and id(r) in bars:
                lo, hi = bars[id(r)]
                # a percentile interval need not contain its point estimate: never a negative bar
                ax.errorbar([x], [y], yerr=[[max(y - lo, 0.0)], [max(hi - y, 0.0)]], color=colour, alpha=0.5,
                            linewidth=0.8, capsize=2)
        fixed = [(r["bytes_per_token"] / 1e6, r[key]) for r in pts
                 if r.get("kind") in FIXED and (r.get("kind") != "uniform" or r.get("quantizer") == quantizer)]
        env = lower_envelope(fixed)
        if env:
            ax.plot(*zip(*env), color="tab:gray", linewidth=1.2, label="lower envelope of fixed rules")
        bud = sorted((r["bytes_per_token"] / 1e6, r[key]) for r in pts if r.get("kind") == "budgeted")
        if bud:
            ax.plot(*zip(*bud), color="tab:green", linewidth=1.5, label="budgeted policy frontier")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("MB moved per token (all MoE layers)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title(title + (f"\nbars: paired 95% CI against {base['name']}" if base is not None and bars else ""),
                      fontsize=9)
    axes[1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
