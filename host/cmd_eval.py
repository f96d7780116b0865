"""`ndpmoe eval`: the accuracy-against-bandwidth study (perplexity vs bytes moved per token)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from ndpmoe.model.errors import NdpmoeError


DEFAULT_TOPN = (1, 2, 4)
DEFAULT_SEQ_LEN = 512


def factor_list(text: str) -> tuple[str, ...]:
    """--factors: a comma list of factor precisions."""
    import argparse

    from ndpmoe.model.factor_quant import FACTOR_PRECISIONS
    out = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in out if p not in FACTOR_PRECISIONS]
    if not out or bad:
        raise argparse.ArgumentTypeError(f"must be a comma list of {', '.join(FACTOR_PRECISIONS)}, not {text!r}")
    return out


def add_arguments(p):
    from ndpmoe.model.cli_args import (BITS, BITS_LIST, GROUP, float_list, hi_bits, input_file, int_in, int_list,
                                       output_dir)

    p.add_argument("--model", default="default", help="'default' (MoEfied SmolLM2, built offline), a local "
                   "Hugging Face MoE checkpoint folder (Mixtral, OLMoE, Qwen2/3-MoE, DeepSeek-V2/V3), or a Qwen2/3-MoE .gguf file")
    p.add_argument("--bits", type=BITS_LIST, default="2,3,4", help="uniform bit widths")
    p.add_argument("--base-bits", type=BITS, default=3, help="bit width the restoration sweep runs on")
    p.add_argument("--rank", type=int_list(lo=1), default="4,16",
                   help="compensator ranks (the largest is stored, the rest are prefixes; 1,2,4,16 covers the "
                        "thin-expert regime at more rows)")
    p.add_argument("--topn", type=int_list(lo=1), default=None,
                   help=f"n of the Top-n rule, 1..top-k (default: those of {DEFAULT_TOPN} the model allows)")
    p.add_argument("--quantizers", default="rtn,optimized", help="uniform quantizers (the last one is used for restoration)")
    p.add_argument("--hi-bits", type=hi_bits, default=8, help="bits of the HOBBIT-style higher-precision copies (0: none)")
    p.add_argument("--budgets", type=float_list(allow_empty=True), default="0.5,1,2,4",
                   help="measured-gain budgeted policy (host/budget_policy.py): multiples of Top-1's bytes, the "
                        "fp16 factor bytes of one expert at the top rank, per token and layer ('' for none)")
    p.add_argument("--policy", action="append", default=[], help="one more row, restored by this runtime policy "
                   "on the base-bits experts (repeatable): none, top-N[@rR], random-N[@rR], hobbit, or budgeted:BYTES "
                   "(bytes per token and layer)")
    p.add_argument("--factors", type=factor_list, default="fp16,int4",
                   help="factor precisions of the compensated Top-n rows (fp16, int8, int4, int3: packed rows; "
                        "each adds a Top-n x rank grid of rows)")
    p.add_argument("--group", type=GROUP, default=64, help="quantization group size of every configuration")
    p.add_argument("--eval-tokens", type=int_in(2), default=2048)
    p.add_argument("--calib-tokens", type=int_in(2), default=4096)
    p.add_argument("--seq-len", type=int_in(2), default=None,
                   help=f"tokens per evaluation window (default: {DEFAULT_SEQ_LEN}, or the model's context if shorter)")
    p.add_argument("--layers", type=int_list(lo=0), default=None, help="comma list of layers to make MoE and study (a "
                   "reduced run; the default model keeps the others dense, a checkpoint keeps them float); default: all")
    p.add_argument("--text", type=input_file, default=None,
                   help="your own text file (split into calibration and evaluation halves)")
    p.add_argument("--encoding", default=None, help="encoding of --text (default: UTF-8; e.g. latin-1, utf-16)")
    p.add_argument("--no-compare", action="store_true", help="skip the SVD / random / allocation comparisons")
    p.add_argument("--out", type=output_dir, default="results/eval", help="folder for study.json, pareto.png and table.md")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    from .study_workers import add_arguments as add_scale_arguments
    add_scale_arguments(p)


def check_against_model(args, outline) -> None:
    """The values that depend on the model, checked on its configuration before it loads;
    --topn and --seq-len left out take the model's own limits."""
    from .outline import layer_list

    k = outline.top_k
    if args.topn is None:
        args.topn = tuple(n for n in DEFAULT_TOPN if n <= k)
    if args.seq_len is None:
        args.seq_len = min(DEFAULT_SEQ_LEN, outline.max_positions)
    bad = [n for n in args.topn if n > k]
    if bad:
        raise NdpmoeError(f"--topn {','.join(map(str, args.topn))}: n must be in 1..{k} (the model routes top-{k}), "
                          f"not {bad[0]}")
    if args.layers is not None:
        wrong = [l for l in args.layers if l not in outline.moe_layers]
        if wrong:
            raise NdpmoeError(f"--layers {','.join(map(str, args.layers))}: layer {wrong[0]} is not an MoE layer of "
                              f"{args.model} (MoE layers: {layer_list(outline.moe_layers)})")
    top = min(outline.hidden, outline.intermediate)
    if max(args.rank) > top:
        raise NdpmoeError(f"--rank {','.join(map(str, args.rank))}: a compensator rank must be at most "
                          f"min(hidden, expert intermediate) = {top}, not {max(args.rank)}")
    if args.seq_len > outline.max_positions:
        raise NdpmoeError(f"--seq-len {args.seq_len}: the model's context is {outline.max_positions} tokens")
    for name, v in (("--eval-tokens", args.eval_tokens), ("--calib-tokens", args.calib_tokens)):
        if v < args.seq_len:
            raise NdpmoeError(f"{name} {v} is less than one window of --seq-len {args.seq_len}")


def load_study_model(name: str, text: str | None, layers: list[int] | None, progress: bool):
    """(DefaultMoE-like object) for 'default' or a local checkpoint folder."""
    from ndpmoe.model.default_moe import DefaultMoE, load_default_moe

    if name == "default":
        return load_default_moe(text=text, layers=layers, progress=progress)
    from ndpmoe.model.checkpoint import load_model, load_tokenizer
    from ndpmoe.model.text import TextSplit, load_text

    text = text if isinstance(text, TextSplit) else load_text(text)
    model, ckpt = load_model(name)
    blocks = {l: (w, cfg) for l, w, cfg in ckpt.iter_moe_layers()}
    kind = getattr(ckpt, "model_type", None) or getattr(ckpt, "arch", None)
    return DefaultMoE(model, load_tokenizer(name), blocks, text, {"what": f"local checkpoint {name}", "model_type": kind})


def run(args) -> int:
    # Everything is checked before the model loads: the values, the policies, the text, the model's
    # shape, and the output folder is created (a study of hours must not fail at its last step).
    from ndpmoe.model.cli_args import prepare_output_dir
    from ndpmoe.model.contract import QuantFormat
    from ndpmoe.model.quantize import get_quantizer   # torch loads here, not for --help
    from ndpmoe.model.text import load_text

    from .outline import model_outline

    quantizers = tuple(q.strip() for q in args.quantizers.split(",") if q.strip())
    if not quantizers:
        raise NdpmoeError(f"--quantizers {args.quantizers!r}: name at least one quantizer")
    for q in quantizers:
        try:
            get_quantizer(q)
        except ValueError as exc:
            raise NdpmoeError(f"--quantizers {args.quantizers!r}: {exc}") from None
    text = None if args.text is None else load_text(args.text, args.encoding)
    check_against_model(args, model_outline(args.model))
    from .study_workers import ScaleOptions
    scale = ScaleOptions.from_args(args)           # device, Ray address: checked before any work
    out = prepare_output_dir(args.out, "--out")

    from .study_plan import PlanOptions, extra_policies

    opt = PlanOptions(bits=args.bits, base_bits=args.base_bits, ranks=args.rank, topn=args.topn,
                      quantizers=quantizers, hi_bits=args.hi_bits, budgets=args.budgets,
                      compare_fits=not args.no_compare, compare_random=not args.no_compare,
                      compare_alloc=not args.no_compare, policies=tuple(args.policy), group=args.group,
                      factors=args.factors)
    QuantFormat(opt.base_bits, opt.group)    # a bad --group or --base-bits is refused before the model loads
    extra_policies(opt)                      # so is a bad --policy
    layers = None if args.layers is None else list(args.layers)
    rows, info, nlls, layer_errors = run_study(args.model, opt, text=text, layers=layers, eval_tokens=args.eval_tokens,
                                               calib_tokens=args.calib_tokens, seq_len=args.seq_len,
                                               progress=not args.quiet, scale=scale)
    write_outputs(out, rows, info, opt, nlls=nlls, layer_errors=layer_errors)
    return 0


def run_study(model: str, opt: PlanOptions, *, text=None, layers=None, eval_tokens=4096, calib_tokens=4096,
              seq_len=512, progress=True, log=print, scale=None):
    from ndpmoe.model.moe_quant import check_block_fits
    from ndpmoe.model.text import token_windows, tokenize

    from .study import Study, Variant
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
    fmt = Variant(opt.base_bits, group=opt.group).fmt
    for l in sorted(dm.blocks) if quant is None else quant:
        check_block_fits(dm.blocks[l][0], fmt, l)    # before the calibration pass, not after it
    study = Study(dm, ev, ca, progress=progress, quant_layers=quant)
    log(f"calibration statistics in {study.calib_seconds:.0f} s")
    from .study_workers import scale_out
    with scale_out(study, scale, log):                   # device, float32, Ray workers (host/study_workers.py)
        regime = run_plan(study, opt, log=log)
    info = {"regime": regime, "router_weight_fit": getattr(study, "budget_fit", None), "model": model, "model_info": dm.info, "eval_tokens": int(ev.numel()), "calib_tokens": int(ca.numel()),
            "seq_len": seq_len, "layers": len(study.layers), "group": opt.group, "text_source": dm.text.source,
            "seconds": round(time.time() - t0, 1),
            "note": "bytes per token: k experts' low-bit images (weights + metadata) + factors of restored "
                    "slots (fp16, or packed int8/int4/int3 rows as the row says), summed over MoE layers; shared expert, attention and embeddings not counted (same "
                    "everywhere). The default model's weights were Q4_1 (groups of 32) upstream, which may flatter "
                    "4-bit requantization.",
            "intervals": "paired 95% intervals of perplexity differences: moving-block bootstrap over 64 contiguous "
                         "blocks of the evaluation's per-token NLLs, the same blocks for every configuration "
                         "(host/paired_stats.py), and of layer-error differences: the same bootstrap over 64 "
                         "contiguous blocks of the held-out rows, every layer recomputed on the drawn rows; a verdict "
                         "is wins / loses only when the interval excludes zero"}
    return study.rows, info, study.token_nlls, (study.row_errors, study.eval_ref_sq)


def write_outputs(out: Path, rows: list[dict], info: dict, opt: PlanOptions, log=print, nlls: list | None = None,
                  layer_errors: tuple | None = None) -> dict:
    """nlls: each row's per-token NLLs (Study.token_nlls), for the verdicts' paired intervals;
    layer_errors: (Study.row_errors, Study.eval_ref_sq), for those of the layer error."""
    from .study_plan import verdicts
    from .study_plot import plot_pareto

    out.mkdir(parents=True, exist_ok=True)
    q = opt.quantizers[-1]
    intervals: list[dict] = []
    found = verdicts(rows, q, nlls, record=intervals, layer_errors=layer_errors)
    (out / "study.json").write_text(json.dumps({"info": info, "rows": rows, "verdicts": found, "intervals": intervals},
                                               indent=1))
    table = ["| configuration | perplexity | MB / token | layer-output error |", "| --- | ---: | ---: | ---: |"]
    table += [f"| {r['name']} | {r['ppl']:.3f} | {r['bytes_per_token'] / 1e6:.3f} | {r['layer_err']:.4f} |" for r in rows]
    (out / "table.md").write_text("\n".join(table) + "\n\n" + "\n".join(f"- {v}" for v in found) + "\n")
    plot_pareto(rows, out / "pareto.png", title=f"{info['model']}: {info['layers']} MoE layers, {info['eval_tokens']} eval tokens",
                nlls=nlls, base_bits=opt.base_bits, quantizer=q)
    log("\n" + "\n".join(table))
    log("\nagainst the targets:\n" + "\n".join(f"  - {v}" for v in found))
    log(f"\nwrote {out / 'study.json'}, {out / 'table.md'}, {out / 'pareto.png'} ({info['seconds']:.0f} s in all)")
    return {"verdicts": found, "intervals": intervals}
