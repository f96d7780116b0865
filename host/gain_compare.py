"""Which budgeted policy the runtime should run: the accuracy study's rows at one budget.

    python -m ndpmoe.host.gain_compare [--layers 0,1] [--budget 122880] [--eval-tokens 1024]

On the default model (all MoE layers, or `--layers`), int3 experts, stored rank 16, it prints
perplexity, MB per token and the held-out layer error of: uniform int3, Top-1 rank 16 (the budget
unit), the spectral-proxy policy (`budgeted:BYTES`), and the measured-gain policy
(`gain-budget:BYTES`) over the options the runtime executes in one run (fp16 ranks + int8 copy:
`generate`'s defaults; int4 ranks + int4 copy: `--factors int4 --hi-bits 4`) and over the study's
full option set; with the paired 95 % interval of each measured-gain row's perplexity against
the proxy's (host/paired_stats.py).
"""
from __future__ import annotations

import argparse
import time

from .budget_study import prepare, run_budgeted
from .paired_stats import paired_bootstrap
from .policy import BudgetedPolicy, TopN
from .study import Study, Variant


def compare(layers, budget: float, eval_tokens: int, calib_tokens: int = 2048, log=print) -> list[dict]:
    from ndpmoe.model.default_moe import load_default_moe
    from ndpmoe.model.text import token_windows, tokenize

    t0 = time.time()
    dm = load_default_moe(layers=layers)
    ev = token_windows(tokenize(dm.text.eval, dm.tokenizer), 512, eval_tokens)
    ca = token_windows(tokenize(dm.text.calib, dm.tokenizer), 512, calib_tokens)
    study = Study(dm, ev, ca, progress=False, quant_layers=layers)
    q = "optimized"
    rows = [study.run("uniform int3", Variant(3, q), None),
            study.run("int3 + Top-1 r16", Variant(3, q, "aware", 16), TopN(1, 16))]
    rows.append(study.run(f"budgeted:{budget:g} (spectral proxy)", Variant(3, q, "aware", 16, hi_bits=8),
                          BudgetedPolicy(budget)))
    proxy = len(rows) - 1
    for name, precisions, copies in (("fp16 ranks + int8 copy", ("fp16",), (8,)),
                                     ("int4 ranks + int4 copy", ("int4",), (4,)),
                                     ("study's options: fp16/int4 ranks, int4/int8 copies", ("fp16", "int4"), (4, 8))):
        setup = prepare(study, 3, q, 16, precisions, copies, log=lambda m: None)
        # the runtime values slots at the tables' fitted power (host/gain_policy.py)
        row = run_budgeted(study, setup, f"gain-budget:{budget:g} ({name})", budget, setup.weight_power)
        row["vs_proxy"] = paired_bootstrap(study.token_nlls[-1], study.token_nlls[proxy])
        rows.append(row)
    for r in rows:
        ci = r.get("vs_proxy")
        extra = "" if ci is None else f"  ppl - proxy {ci}"
        log(f"{r['name']:<78} ppl {r['ppl']:.3f}  {r['bytes_per_token'] / 1e6:.2f} MB/token  "
            f"layer error {r.get('layer_err', float('nan')):.4f}{extra}")
    log(f"({time.time() - t0:.0f} s; layers {layers or 'all'}, {ev.numel()} evaluation tokens)")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default=None, help="comma list of MoE layers (default: all)")
    p.add_argument("--budget", type=float, default=122880.0, help="bytes per token and layer")
    p.add_argument("--eval-tokens", type=int, default=1024)
    args = p.parse_args(argv)
    layers = None if args.layers is None else [int(x) for x in args.layers.split(",")]
    compare(layers, args.budget, args.eval_tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
