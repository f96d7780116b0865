"""The benchmark behind `ndpmoe quant-bench`: quantizer and compensator cost on one Mixtral-size expert matrix (CPU),
and the bytes per weight of every packed format, metadata included."""
from __future__ import annotations

import time

import torch

from ndpmoe.model.compensate import Int8LowRank, fit_activation_aware, fit_svd, gram
from ndpmoe.model.contract import SUPPORTED_BITS, SUPPORTED_GROUPS, QuantFormat
from ndpmoe.model.quantize import QUANTIZERS, groups_of, minmax_params, quantize_rtn


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def run(args) -> int:
    g = torch.Generator().manual_seed(args.seed)
    fmt = QuantFormat(args.bits, args.group)
    print(f"matrix {args.rows} x {args.cols}, {fmt}, torch threads {torch.get_num_threads()}")
    # Heavy-tailed weights (a Student-t draw) and calibration inputs with a decaying spectrum, like
    # real LLM activations; the timings do not depend on the values.
    w = (torch.distributions.StudentT(5.0).sample((args.rows, args.cols)) * 0.01).float()
    mix = torch.randn(args.cols, args.cols, generator=g) * torch.logspace(0, -2, args.cols)
    x = torch.randn(args.calib_tokens, args.cols, generator=g) @ mix
    h, t_gram = _timed(lambda: gram(x))
    print(f"calibration Gram X^T X ({args.calib_tokens} tokens): {t_gram:7.2f} s")
    print(f"\n{'quantizer':<12}{'time s':>9}{'weight rel err':>16}{'output rel err':>16}")
    ref = (w.double() @ x.t().double()).norm()
    results = {}
    for name, quantizer in QUANTIZERS.items():
        qm, dt = _timed(lambda: quantizer(w, fmt, h))
        e = w - qm.dequantize()
        results[name] = qm
        print(f"{name:<12}{dt:9.2f}{float(e.norm() / w.norm()):16.4f}"
              f"{float((e.double() @ x.t().double()).norm() / ref):16.4f}")
    _fixed_point_cost(w, fmt)
    err = w - results["rtn"].dequantize()
    print(f"\ncompensator fit at rank {args.rank} (error of RTN):")
    for label, fit in (("plain SVD", lambda: fit_svd(err, args.rank)),
                       ("activation-aware", lambda: fit_activation_aware(err, h, args.rank))):
        f, dt = _timed(fit)
        left = ((err - f.delta()).double() @ x.t().double()).norm() / (err.double() @ x.t().double()).norm()
        print(f"  {label:<18}{dt:7.2f} s   output error left {float(left):.3f}   fp16 {f.nbytes_fp16() / 1e6:.2f} MB"
              f"   int8 {Int8LowRank.from_lowrank(f).nbytes / 1e6:.2f} MB")
    print(f"\nbytes per weight ({args.rows} x {args.cols}, weights + metadata, as stored):")
    print(f"{'bits':>6}" + "".join(f"{'g' + str(gs):>10}" for gs in SUPPORTED_GROUPS))
    for bits in SUPPORTED_BITS:
        row = [QuantFormat(bits, gs).bits_per_weight(args.rows, args.cols) / 8 for gs in SUPPORTED_GROUPS]
        print(f"{bits:>6}" + "".join(f"{v:10.4f}" for v in row))
    print(f"{'fp16':>6}{2.0:10.4f}")
    if args.real:
        _real_table(list(args.real_layers))
    return 0


def _fixed_point_cost(w: torch.Tensor, fmt: QuantFormat) -> None:
    """What storing the group scale as a 16-bit mantissa (one exponent per matrix) and the zero
    as Q11.4 costs, against keeping both in float64."""
    wg = groups_of(w.double(), fmt)
    scale, zero = minmax_params(wg, fmt.qmax)
    q = torch.round(wg / scale[..., None] + zero[..., None]).clamp(0, fmt.qmax)
    w_float = ((q - zero[..., None]) * scale[..., None]).reshape(w.shape)
    w_fixed = quantize_rtn(w, fmt).dequantize(torch.float64)
    norm = w.double().norm()
    e_float, e_fixed = float((w - w_float).norm() / norm), float((w - w_fixed).norm() / norm)
    print(f"\nfixed-point metadata (RTN): relative weight error {e_float:.5f} with float64 scale/zero, "
          f"{e_fixed:.5f} with uint16 mantissa + Q11.4 zero ({100 * (e_fixed / e_float - 1):+.3f}%)")


def _real_table(layers: list[int]) -> None:
    from ndpmoe.model.quant_report import quantizer_table, smollm_mlp_cases
    print(f"\nSmolLM2 MLP matrices, group 64, relative errors (output error = ||(W - Q(W)) X^T|| / ||W X^T||):")
    print(f"{'layer':>5} {'matrix':<6}{'bits':>5} {'quantizer':<11}{'weight':>9}{'out calib':>11}{'out held-out':>14}")
    for r in quantizer_table(smollm_mlp_cases(layers)):
        print(f"{r['layer']:>5} {r['matrix']:<6}{r['bits']:>5} {r['quantizer']:<11}{r['weight_err']:9.4f}"
              f"{r['output_err_calib']:11.4f}{r['output_err_heldout']:14.4f}")
