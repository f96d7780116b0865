"""How near-exact and how cheap the measured-gain budgeted policy's planning is, on the option
tables measured on the reduced default model (layers 0 and 1):

    python -m ndpmoe.host.budget_bench [--tokens 48]

prints, per budget (x Top-1's bytes), the policy's objective over the exact knapsack optimum
(host/budget_policy.solve_exact) on calibration tokens, and the planning time per token-layer
when a 512-token window is planned at once and when one token is (batch-1 decode); the last two
lines with the solver's optional pair repairs.
"""
from __future__ import annotations

import argparse
import time

import torch


def main(argv=None) -> int:
    from ndpmoe.model.default_moe import load_default_moe
    from ndpmoe.model.moe import route
    from ndpmoe.model.moefy import MoEfyConfig
    from ndpmoe.model.text import token_windows, tokenize

    from .budget_policy import objective, solve, solve_exact
    from .budget_study import prepare
    from .study import Study, block_sizes

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=48, help="calibration tokens solved exactly per layer and budget")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dm = load_default_moe(MoEfyConfig(calib_tokens=1024), layers=[0, 1], progress=False)
    ev = token_windows(tokenize(dm.text.eval, dm.tokenizer), 256, 512)
    ca = token_windows(tokenize(dm.text.calib, dm.tokenizer), 256, 1024)
    study = Study(dm, ev, ca, progress=False, block_rows=512)
    setup = prepare(study, 3, "optimized", 16, ("fp16", "int4"), (4, 8))
    unit = block_sizes(setup.base[0]).fp16_bytes_per_rank * 16
    pw = setup.weight_power
    print(f"options per expert: {len(setup.tables[0].options)}; hull points per expert: "
          f"{int((setup.tables[0].hull >= 0).sum(1).float().mean())} on average; weight power {pw}")
    for mult, pair in ((0.5, False), (1.0, False), (2.0, False), (4.0, False), (0.5, True), (1.0, True)):
        got = best = 0.0
        batch_us = one_us = 0.0
        for l in study.layers:
            table, qm = setup.tables[l], setup.base[l]
            x = study.calib_inputs[l][:512]
            ids, w = route(x, qm.router, qm.cfg)
            t0 = time.perf_counter()
            choice = solve(table, ids, w, mult * unit, pw, pair_repair=pair)
            batch_us += (time.perf_counter() - t0) * 1e6 / ids.shape[0]
            t0 = time.perf_counter()
            for i in range(64):
                solve(table, ids[i:i + 1], w[i:i + 1], mult * unit, pw, pair_repair=pair)
            one_us += (time.perf_counter() - t0) * 1e6 / 64
            n = args.tokens
            got += float(objective(table, ids[:n], w[:n], choice[:n], pw).sum())
            best += sum(solve_exact(table, i, ww, mult * unit, pw) for i, ww in zip(ids[:n].tolist(), w[:n].tolist()))
        k = len(study.layers)
        print(f"budget {mult:g}x ({mult * unit / 1e3:.1f} kB per token-layer){' with pair repairs' if pair else ''}: objective {got / best:.4%} of the exact "
              f"optimum on {args.tokens} tokens x {k} layers; planning {batch_us / k:.1f} us per token-layer in "
              f"512-token windows, {one_us / k:.0f} us one token at a time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
