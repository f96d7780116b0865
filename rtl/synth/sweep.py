"""A sweep of NDP configurations over port width, bit widths, T_max (and tokens per cycle):
each point is an NdpConfig derived from a base one; results become a table and a plot.

The sweep's parameters are this module's business, not the contract's: a point is only
`dataclasses.replace(base, ...)` of fields NdpConfig already has.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ndpmoe.model.contract import SUPPORTED_BITS, NdpConfig
from ndpmoe.rtl.synth.report import SynthResult


@dataclass(frozen=True)
class SweepAxes:
    word_bits: tuple[int, ...] = (64, 128, 256)
    bits: tuple[tuple[int, ...], ...] = ((2, 3, 4, 8), (2, 4, 8), (4, 8))
    t_max: tuple[int, ...] = (2, 8, 32)
    tokens_parallel: tuple[int, ...] = ()     # empty: the base configuration's value only


def point_name(cfg: NdpConfig) -> str:
    return (f"p{cfg.word_bits}-b{''.join(map(str, cfg.bits))}-t{cfg.t_max}"
            + f"-tp{cfg.tokens_parallel}"
            + (f"-in{cfg.max_in_features}" if cfg.max_in_features != 4096 else ""))


def derive(base: NdpConfig, **changes) -> NdpConfig:
    """`base` with `changes`, renamed after its parameters; unless changed, the activation
    buffer keeps its depth, rounded up to a whole number of port words."""
    word_bits = changes.get("word_bits", base.word_bits)
    changes.setdefault("max_in_features", -(-base.max_in_features // word_bits) * word_bits)
    cfg = dataclasses.replace(base, **changes)
    return dataclasses.replace(cfg, name=point_name(cfg))


def sweep_points(base: NdpConfig, axes: SweepAxes, grid: bool = False) -> list[NdpConfig]:
    """The base point plus every axis value varied alone (grid=False), or the full product."""
    base_values = dict(word_bits=base.word_bits, bits=base.bits, t_max=base.t_max,
                       tokens_parallel=base.tokens_parallel)
    axis_values = {k: tuple(getattr(axes, k)) or (base_values[k],) for k in base_values}
    if grid:
        combos = [dict(zip(axis_values, vals)) for vals in itertools.product(*axis_values.values())]
    else:
        combos = [dict(base_values)]
        for axis, values in axis_values.items():
            combos += [dict(base_values, **{axis: v}) for v in values if v != base_values[axis]]
    points = []
    for combo in combos:
        if combo["tokens_parallel"] > combo["t_max"]:
            continue                        # not a valid NdpConfig; skip rather than fail the grid
        cfg = derive(base, **combo)
        if cfg not in points:
            points.append(cfg)
    return points


def parse_bits_sets(text: str) -> tuple[tuple[int, ...], ...]:
    """'2348,248,48' -> ((2, 3, 4, 8), (2, 4, 8), (4, 8)): one digit per bit width."""
    sets = []
    for item in text.split(","):
        if not item or any(c not in "".join(map(str, SUPPORTED_BITS)) for c in item):
            raise ValueError(f"bit-width set {item!r} must be digits from {SUPPORTED_BITS}, e.g. 248")
        sets.append(tuple(sorted({int(c) for c in item})))
    return tuple(sets)


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, not {text!r}") from None


# --- table -------------------------------------------------------------------------------------
_COLUMNS = ("point", "P", "bits", "T_max", "tok/cyc", "DSP map", "LUTs", "FFs", "DSPs", "BRAMs", "Fmax MHz",
            "peak GB/s", "sust. GB/s") + tuple(f"GMAC/s int{b}" for b in SUPPORTED_BITS)


def _cell(value, fmt="{}") -> str:
    return "-" if value is None else fmt.format(value)


def _dsp_map(r: SynthResult) -> str:
    """Which multiplies went to DSPs: Yosys's choice (all), or those with both operands >= N bits."""
    width = r.extra.get("dsp_min_width")
    return "all" if width is None else f">={width} bit"


def table_rows(results: Iterable[tuple[NdpConfig, SynthResult]]) -> list[list[str]]:
    rows = []
    for cfg, r in results:
        tp = r.extra.get("throughput") or {}
        gmacs = {int(k): v for k, v in tp.get("gmacs", {}).items()}
        fmax = _cell(r.fmax_mhz, "{:.1f}") if r.fits else "no fit"
        rows.append([cfg.name, str(cfg.word_bits), "".join(map(str, cfg.bits)), str(cfg.t_max),
                     str(cfg.tokens_parallel), _dsp_map(r), _cell(r.luts), _cell(r.ffs), _cell(r.dsps),
                     _cell(r.brams), fmax, _cell(tp.get("peak_gbps"), "{:.2f}"),
                     _cell(tp.get("sustained_gbps"), "{:.2f}")]
                    + [_cell(gmacs.get(b), "{:.1f}") for b in SUPPORTED_BITS])
    return rows


def markdown_table(results: list[tuple[NdpConfig, SynthResult]]) -> str:
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    return "\n".join(lines)


# --- plot --------------------------------------------------------------------------------------
def plot(results: list[tuple[NdpConfig, SynthResult]], path: Path, title: str,
         freq_target_mhz: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [cfg.name for cfg, _ in results]
    xs = range(len(names))

    def values(attr):
        return [getattr(r, attr) or 0 for _, r in results]

    fig, axes = plt.subplots(1, 3, figsize=(max(12, 1.6 * len(names) * 3 / 2), 4.5))
    w = 0.4
    axes[0].bar([x - w / 2 for x in xs], values("luts"), w, label="LUTs")
    axes[0].bar([x + w / 2 for x in xs], values("ffs"), w, label="FFs")
    axes[0].set_title("logic")
    axes[1].bar([x - w / 2 for x in xs], values("dsps"), w, label="DSPs")
    axes[1].bar([x + w / 2 for x in xs], values("brams"), w, label="block RAMs")
    axes[1].set_title("hard blocks")
    fmax = [r.fmax_mhz if r.fits and r.fmax_mhz else 0 for _, r in results]
    axes[2].bar(xs, fmax, 0.6, color=["tab:green" if f >= freq_target_mhz else "tab:red" for f in fmax])
    axes[2].axhline(freq_target_mhz, color="k", ls="--", label=f"target {freq_target_mhz:g} MHz")
    for x, (f, (_, r)) in enumerate(zip(fmax, results)):
        axes[2].text(x, f + 2, f"{f:.0f}" if f else ("no fit" if not r.fits else "?"), ha="center", fontsize=8)
    axes[2].set_title("Fmax after routing (MHz)")
    for ax in axes:
        ax.set_xticks(list(xs), names, rotation=45, ha="right", fontsize=8)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
