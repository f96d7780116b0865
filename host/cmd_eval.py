"""`ndpmoe eval`: the accuracy-against-bandwidth study (perplexity vs bytes moved per token)."""
from __future__ import annotations

import json
import time
from pathlib import Path


KIND_STYLE = {  # kind -> (marker, colour, label)
    "fp16": ("*", "black", "fp16"),
    "uniform": ("s", "tab:gray", "uniform low-bit"),
    "topn": ("o", "tab:blue", "Top-n restoration"),
    "randomn": ("x", "tab:red", "random-n restoration"),
    "alloc": ("D", "tab:purple", "Top-n, allocated ranks"),
    "hobbit": ("^", "tab:orange", "HOBBIT-style hi-precision copies"),
    "budgeted": ("P", "tab:green", "budgeted policy"),
}


def add_arguments(p):
    p.add_argument("--model", default="default", help="'default' (MoEfied SmolLM2, built offline), a local "
                   "Hugging Face MoE checkpoint folder (Mixtral, OLMoE, Qwen2/3-MoE, DeepSeek-V2/V3), or a Qwen2/3-MoE .gguf file")
    p.add_argument("--bits", default="2,3,4", help="uniform bit widths")
    p.add_argument("--base-bits", type=int, default=3, help="bit width the restoration sweep runs on")
    p.add_argument("--rank", default="4,16", help="compensator ranks (the largest is stored, the rest are prefixes)")
    p.add_argument("--topn", default="1,2,4", help="n of the Top-n rule")
    p.add_argument("--quantizers", default="rtn,optimized", help="uniform quantizers (the last one is used for restoration)")
    p.add_argument("--hi-bits", type=int, default=8, help="bits of the HOBBIT-style higher-precision copies (0: none)")
    p.add_argument("--budgets", default="0.5,1,2", help="budgeted policy: multiples of the Top-1 top-rank factor bytes")
    p.add_argument("--policy", action="append", default=[], help="extra runtime policy spec (repeatable)")
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--layers", default=None, help="comma list of layers to make MoE and study (a reduced run; the "
                   "default model keeps the others dense, a checkpoint keeps them float); default: all")
    p.add_argument("--text", default=None, help="your own text file (split into calibration and evaluation halves)")
    p.add_argument("--no-compare", action="store_true", help="skip the SVD / random / allocation comparisons")
    p.add_argument("--out", default="results/eval", help="folder for study.json, pareto.png and table.md")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    from .study_workers import add_arguments as add_scale_arguments
    add_scale_arguments(p)


def _ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"expected a comma-separated list of integers, not {s!r}") from None


def load_study_model(name: str, text: str | None, layers: list[int] | None, progress: bool):
    """(DefaultMoE-like object) for 'default' or a local checkpoint folder."""
    from ndpmoe.model.default_moe import DefaultMoE, load_default_moe

    if name == "default":
        return load_default_moe(text=text, layers=layers, progress=progress)
    from ndpmoe.model.checkpoint import load_model, load_tokenizer
    from ndpmoe.model.text import load_text

    model, ckpt = load_model(name)
    blocks = {l: (w, cfg) for l, w, cfg in ckpt.iter_moe_layers()}
    kind = getattr(ckpt, "model_type", None) or getattr(ckpt, "arch", None)
    return DefaultMoE(model, load_tokenizer(name), blocks, load_text(text), {"what": f"local checkpoint {name}", "model_type": kind})


def run(args) -> int:
    from .study_plan import PlanOptions   # torch loads here, not for --help

    opt = PlanOptions(bits=_ints(args.bits), base_bits=args.base_bits, ranks=_ints(args.rank), topn=_ints(args.topn),
                      quantizers=tuple(q for q in args.quantizers.split(",") if q), hi_bits=args.hi_bits,
                      budgets=tuple(float(b) for b in args.budgets.split(",") if b),
                      compare_fits=not args.no_compare, compare_random=not args.no_compare,
                      compare_alloc=not args.no_compare, policies=tuple(args.policy))
    layers = None if args.layers is None else list(_ints(args.layers))
    from .study_workers import ScaleOptions
    scale = ScaleOptions.from_args(args)           # device, Ray address: checked before any work
    rows, info = run_study(args.model, opt, text=args.text, layers=layers, eval_tokens=args.eval_tokens,
                           calib_tokens=args.calib_tokens, seq_len=args.seq_len, progress=not args.quiet, scale=scale)
    write_outputs(Path(args.out), rows, info, opt)
    return 0


def run_study(model: str, opt: PlanOptions, *, text=None, layers=None, eval_tokens=4096, calib_tokens=4096,
              seq_len=512, progress=True, log=print, scale=None):
    from ndpmoe.model.text import token_windows, tokenize

    from .study import Study
    from .study_plan import run_plan

    t0 = time.time()
    if model != "default" and not str(model).endswith(".gguf"):
        from .devices import check_fits
        check_fits(model)                                # fits in host memory (even offloaded), before loading
    dm = load_study_model(model, text, layers, progress)
    ev = token_windows(tokenize(dm.text.eval, dm.tokenizer), seq_len, eval_tokens)
    ca = token_windows(tokenize(dm.text.calib, dm.tokenizer), seq_len, calib_tokens)
    log(f"model {model}: {len(dm.blocks)} MoE layers; evaluation {ev.numel()} tokens ({dm.text.source}), "
        f"calibration {ca.numel()} tokens")
    quant = None if layers is None else [l for l in layers if l in dm.blocks]
    study = Study(dm, ev, ca, progress=progress, quant_layers=quant)
    log(f"calibration statistics in {study.calib_seconds:.0f} s")
    from .study_workers import scale_out
    with scale_out(study, scale, log):                   # device, float32, Ray workers (host/study_workers.py)
        run_plan(study, opt, log=log)
    info = {"model": model, "model_info": dm.info, "eval_tokens": int(ev.numel()), "calib_tokens": int(ca.numel()),
            "seq_len": seq_len, "layers": len(study.layers), "text_source": dm.text.source,
            "seconds": round(time.time() - t0, 1),
            "note": "bytes per token: k experts' low-bit images (weights + metadata) + fp16 factors of restored "
                    "slots, summed over MoE layers; shared expert, attention and embeddings not counted (same "
                    "everywhere). The default model's weights were Q4_1 (groups of 32) upstream, which may flatter "
                    "4-bit requantization."}
    return study.rows, info


def write_outputs(out: Path, rows: list[dict], info: dict, opt: PlanOptions, log=print) -> dict:
    from .study_plan import verdicts

    out.mkdir(parents=True, exist_ok=True)
    q = opt.quantizers[-1]
    found = verdicts(rows, q)
    (out / "study.json").write_text(json.dumps({"info": info, "rows": rows, "verdicts": found}, indent=1))
    table = ["| configuration | perplexity | MB / token | layer-output error |", "| --- | ---: | ---: | ---: |"]
    table += [f"| {r['name']} | {r['ppl']:.3f} | {r['bytes_per_token'] / 1e6:.3f} | {r['layer_err']:.4f} |" for r in rows]
    (out / "table.md").write_text("\n".join(table) + "\n\n" + "\n".join(f"- {v}" for v in found) + "\n")
    plot_pareto(rows, out / "pareto.png", title=f"{info['model']}: {info['layers']} MoE layers, {info['eval_tokens']} eval tokens")
    log("\n" + "\n".join(table))
    log("\nagainst the targets:\n" + "\n".join(f"  - {v}" for v in found))
    log(f"\nwrote {out / 'study.json'}, {out / 'table.md'}, {out / 'pareto.png'} ({info['seconds']:.0f} s in all)")
    return {"verdicts": found}


def plot_pareto(rows: list[dict], path: Path, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for kind, (marker, colour, label) in KIND_STYLE.items():
        pts = [r for r in rows if r.get("kind") == kind]
        if pts:
            ax.scatter([r["bytes_per_token"] / 1e6 for r in pts], [r["ppl"] for r in pts], marker=marker,
                       color=colour, label=label, s=40)
    for q in {r.get("quantizer") for r in rows if r.get("kind") == "uniform"}:
        line = sorted((r for r in rows if r.get("kind") == "uniform" and r.get("quantizer") == q), key=lambda r: r["bytes_per_token"])
        ax.plot([r["bytes_per_token"] / 1e6 for r in line], [r["ppl"] for r in line], color="tab:gray",
                linestyle="--" if q == "rtn" else "-", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("MB moved per token (all MoE layers)")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
