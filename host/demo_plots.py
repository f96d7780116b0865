"""Plots for the demo's report, beside the Pareto plot: the throughput comparison (modeled
tokens/s per configuration and system, with the bytes each token moves) and the FPGA result
(resources and Fmax, through the sweep's own plot).

`add_plots` finds the steps by what their data holds (a `bench --json` per system; a synthesis
result), so it does not depend on the steps' titles or order.
"""
from __future__ import annotations

from pathlib import Path

THROUGHPUT_PNG = "throughput.png"
FPGA_PNG = "fpga.png"


def _is_bench(data) -> bool:
    return isinstance(data, dict) and bool(data) and all(isinstance(v, dict) and "rows" in v for v in data.values())


def _is_synth(data) -> bool:
    return isinstance(data, dict) and "fmax_mhz" in data and "luts" in data and "config" in data


def add_plots(opt, results) -> None:
    """Draw the plots the results allow and list them under their steps (failed steps: none)."""
    for r in results:
        if not r.ok:
            continue
        if _is_bench(r.data):
            plot_throughput(r.data, opt.out / THROUGHPUT_PNG)
            r.images.append(THROUGHPUT_PNG)
        elif _is_synth(r.data):
            plot_fpga(r.data, opt.out / FPGA_PNG)
            r.images.append(FPGA_PNG)


def plot_throughput(by_system: dict[str, dict], path: Path) -> None:
    """by_system: {system: the JSON `ndpmoe bench --json` writes}. One bar per configuration and
    system (modeled decode tokens/s, log scale), labelled with MB moved per token."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Equal-bytes rows name their calibrated parameter after a comma, which differs per system.
    key = lambda row: row["label"].split(",")[0]
    systems = list(by_system)
    labels = list(dict.fromkeys(key(row) for b in by_system.values() for row in b["rows"]))
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(labels) * len(systems) + 1.5))
    height = 0.8 / len(systems)
    for i, system in enumerate(systems):
        rows = {key(row): row for row in by_system[system]["rows"]}
        ys = [j + (i - (len(systems) - 1) / 2) * height for j in range(len(labels))]
        tps = [rows[l]["tokens_per_s"] if l in rows else 0 for l in labels]
        ax.barh(ys, tps, height * 0.9, label=f"{system} ({by_system[system].get('model', '?')})")
        for y, l, t in zip(ys, labels, tps):
            if l in rows:
                ax.text(t * 1.03, y, f"{t:.1f} tok/s, {rows[l]['moved_bytes_per_token'] / 1e6:.1f} MB/tok",
                        va="center", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("modeled decode tokens/s (log scale); labels: MB moved per token")
    ax.set_xlim(right=ax.get_xlim()[1] * 8)
    ax.grid(True, axis="x", which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("Throughput model: tokens/s and bytes per token per configuration and system", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_fpga(synth: dict, path: Path) -> None:
    """One synthesis result (SynthResult.to_json) as the FPGA sweep draws its points."""
    from ndpmoe.model.contract import get_config
    from ndpmoe.rtl.synth.report import SynthResult
    from ndpmoe.rtl.synth.sweep import plot

    r = SynthResult.from_json(synth)
    plot([(get_config(r.config), r)], path, f"NDP configuration '{r.config}' on {r.target}", r.freq_target_mhz)
