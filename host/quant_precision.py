"""float32 against the float64 reference, on SmolLM2's real MLP matrices and activations: how
much each quantizer and fit changes the held-out output error ||(W - Q(W) - A B) X^T||, and how
much of the exact SVD's error reduction the large fits (block Krylov) keep. The rule the
arithmetic follows: float32 wherever the change is under 0.1% relative."""
from __future__ import annotations

import os

import torch

from ndpmoe.model.compensate import (_krylov_is_cheaper, fit_activation_aware_stack, fit_svd_stack, gram,
                                     whitening_factor)
from ndpmoe.model.contract import QuantFormat
from ndpmoe.model.factor_quant import fit_quantized
from ndpmoe.model.quantize import QUANTIZER_NAMES, quantize_rtn, quantize_stack

LIMIT = 1e-3           # 0.1% relative
RANK = 16


def precision_check(layers: list[int], bits=(2, 3, 4, 8)) -> None:
    """Prints the table; float32 runs with the fused kernels large stacks use (unless NDPMOE_COMPILE=0)."""
    before = os.environ.get("NDPMOE_COMPILE")
    if before != "0":
        os.environ["NDPMOE_COMPILE"] = "1"
    try:
        _precision_check(layers, bits)
    finally:
        if before is None:
            os.environ.pop("NDPMOE_COMPILE", None)
        else:
            os.environ["NDPMOE_COMPILE"] = before


def _precision_check(layers: list[int], bits) -> None:
    from ndpmoe.model.quant_report import smollm_mlp_cases

    cases = smollm_mlp_cases(layers, calib_tokens=4096, eval_tokens=2048)
    print(f"\nfloat32 against float64 on SmolLM2's MLP matrices (layers {layers}, gate/up/down, group 64): change of "
          f"the held-out output error, largest over matrices and over all of them together "
          f"({'fused kernels' if os.environ.get('NDPMOE_COMPILE') == '1' else 'eager'})")
    rows, starts = {}, []
    for _, _, w, xc, xh in cases:
        h = gram(xc)[None]
        out = lambda e: float((e.double() @ xh.t().double()).square().sum())
        for b in bits:
            fmt = QuantFormat(b, 64)
            for name in QUANTIZER_NAMES:
                pair = [out(w - quantize_stack(w[None], fmt, name, h, precision=p)[0].dequantize())
                        for p in ("float64", "float32")]
                rows.setdefault((name, b), []).append(pair)
        err = w - quantize_stack(w[None], QuantFormat(3, 64), "optimized", h, precision="float64")[0].dequantize()
        for label, fit in (("SVD fit", lambda p: fit_svd_stack(err[None], RANK, precision=p)),
                           ("aware fit", lambda p: fit_activation_aware_stack(err[None], h, RANK, precision=p)),
                           ("int4 factor fit", lambda p: [fit_quantized(err, h[0], RANK, 4, precision=p).lowrank()])):
            rows.setdefault((label, 3), []).append([out(err - fit(p)[0].delta()) for p in ("float64", "float32")])
        # the study's float64 factor fit: its block Krylov start directions against exact ones
        starts.append([out(err - fit_quantized(err, h[0], RANK, 4, exact_starts=e).lowrank().delta()) for e in (True, False)]
                      + [out(err)])
    print(f"{'':<20}{'bits':>5}{'largest':>12}{'all':>12}   arithmetic")
    for (name, b), pairs in rows.items():
        worst = max(abs((f32 / f64) ** 0.5 - 1) for f64, f32 in pairs)
        total = (sum(f32 for _, f32 in pairs) / sum(f64 for f64, _ in pairs)) ** 0.5 - 1
        label = name if name in QUANTIZER_NAMES else f"{name} r{RANK}"
        print(f"{label:<20}{b:>5}{100 * worst:11.4f}%{100 * total:+11.4f}%   "
              f"{'float32' if worst < LIMIT else 'float64 needed'}")
    worst = max(abs((new / exact) ** 0.5 - 1) for exact, new, _ in starts)
    total = (sum(new for _, new, _ in starts) / sum(exact for exact, _, _ in starts)) ** 0.5 - 1
    kept = min((base - new) / (base - exact) for exact, new, base in starts)
    print(f"\nint4 factor fit r{RANK} (float64, as the study runs it), start directions from block Krylov against a "
          f"full eigendecomposition: held-out output error change {100 * worst:.4f}% largest, {100 * total:+.4f}% all; "
          f"error reduction kept {100 * kept:.3f}% at least")
    _krylov_accuracy(cases)


def _krylov_accuracy(cases) -> None:
    """The large fits' share of the exact optimum's error reduction, on real quantization errors."""
    from ndpmoe.model.smollm import load_smollm

    model, _ = load_smollm(num_layers=29)
    errs = []
    for layer in (1, 15, 28):
        w = model.model.layers[layer].mlp.down_proj.weight.detach().float()
        errs.append(w - quantize_rtn(w, QuantFormat(3, 64)).dequantize())
    err = torch.cat(errs)
    print(f"\nblock Krylov against the exact SVD (share of the exact rank-r error reduction kept):")
    total = float(err.double().square().sum())
    s = torch.linalg.svdvals(err.double())
    for r in (16, 32):
        assert _krylov_is_cheaper(*err.shape, r)
        f = fit_svd_stack(err[None], r)[0]
        got = total - float((err - f.delta()).double().square().sum())
        print(f"  plain fit, SmolLM2 down-projection errors of layers 1/15/28 stacked ({err.shape[0]} x {err.shape[1]}), "
              f"rank {r}: {100 * got / float((s[:r] ** 2).sum()):.2f}%")
    _, name, w, xc, _ = next(c for c in cases if c[1] == "up")
    err = w - quantize_rtn(w, QuantFormat(3, 64)).dequantize()
    h = gram(xc)
    m = err.double() @ whitening_factor(h)
    best = float((torch.linalg.svdvals(m)[:RANK] ** 2).sum())
    f = fit_activation_aware_stack(err[None], h[None], RANK)[0]
    got = float(m.square().sum()) - float(((err - f.delta()).double() @ whitening_factor(h)).square().sum())
    print(f"  activation-aware fit, {name} matrix ({err.shape[0]} x {err.shape[1]}), rank {RANK}: {100 * got / best:.2f}%")
