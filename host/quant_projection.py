"""Quantizer and fit throughput at the expert shapes of real MoE models, and the projected time
of a full default study (`ndpmoe eval` with its default plan) of each on this machine.

A default study (`ndpmoe eval` with no options) quantizes every expert matrix with each of its
quantizers at each bit width (and the higher-precision copies with the last quantizer), and fits
compensators of the top rank: the activation-aware one at every bit width, plain SVD once at the
base width, and at the base width one greedy fit with low-bit factors (model/factor_quant.py) per
factor precision other than fp16. Each of those fit variants whitens every Gram matrix once (w1
and w3 share one), except the float32 activation-aware fits of large matrices, which work from
the Gram matrix and need no whitening. The projection counts exactly those operations from
eval's own defaults, each at the time measured here for that matrix shape. Not counted:
calibration passes, sensitivities and the perplexity passes. Every bit width is charged the time
measured at int3.
"""
from __future__ import annotations

import torch

from ndpmoe.model.compensate import _krylov_is_cheaper, fit_activation_aware_stack, fit_svd_stack, gram, whitening_factors
from ndpmoe.model.contract import QuantFormat
from ndpmoe.model.factor_quant import factor_bits, fit_quantized
from ndpmoe.model.real_configs import expert_shapes
from ndpmoe.model.quantize import quantize_stack

from .devices import peak_memory, timed
from .quant_bench import synthetic_case

STACK_ELEMENTS = 1 << 24          # experts timed together: about this many weights


def study_operations() -> dict[str, int]:
    """Per expert matrix, how many of each operation a default `ndpmoe eval` performs (read from
    eval's own argument defaults, so the two cannot drift apart)."""
    import argparse

    from .cmd_eval import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    a = p.parse_args([])
    quantizers = [q for q in a.quantizers.split(",") if q]
    bits = list(a.bits)
    counts = {"rtn": 0, "hqq": 0, "optimized": 0}
    for q in quantizers:
        counts[q] += len(bits)
    if a.hi_bits and a.hi_bits not in bits:
        counts[quantizers[-1]] += 1
    aware = len(bits)                                   # the base width, and Top-n rows on the others
    factor = sum(1 for f in a.factors if f != "fp16")
    return {**counts, "aware": aware, "svd": 0 if a.no_compare else 1, "factor": factor,
            "factor_bits": [f for f in a.factors if f != "fp16"], "rank": max(a.rank)}


def time_shape(rows: int, cols: int, experts: int, dev, precision: str, rank: int, tokens: int, seed: int,
               fbits: int = 4) -> dict:
    """Seconds per matrix of each operation on a stack of `experts` [rows, cols] matrices (the
    low-bit-factor fit, which works one matrix at a time, on the first of them)."""
    w, x, _ = synthetic_case(rows, cols, tokens, seed, experts)
    h1 = gram(x.to(dev).float()).double()                 # one Gram, shared by the stack (a view)
    h = h1[None].expand(experts, cols, cols)
    fmt = QuantFormat(3, 64)
    out = {}
    for name in ("rtn", "optimized"):
        qs, dt = timed(lambda: quantize_stack(w, fmt, name, h, precision=precision, device=dev), dev)
        out[name] = dt / experts
    err = w - torch.stack([q.dequantize() for q in qs])
    l, dt = timed(lambda: whitening_factors(h1[None], device=dev), dev)
    out["whiten"] = dt
    _, dt = timed(lambda: fit_svd_stack(err, rank, precision=precision, device=dev), dev)
    out["svd"] = dt / experts
    # as the study's parts call it: from the Gram matrices where that needs no whitening (float32,
    # large), else with the whitening factors (counted separately)
    out["aware_whitens"] = not (precision == "float32" and _krylov_is_cheaper(rows, cols, rank))
    hx = h.contiguous()                                   # the study's Gram matrices are one per expert
    if out["aware_whitens"]:
        lx = l.expand(experts, cols, cols)
        fit = lambda: fit_activation_aware_stack(err, None, rank, whiten=lx, precision=precision, device=dev)
    else:
        fit = lambda: fit_activation_aware_stack(err, hx, rank, precision=precision, device=dev)
    _, dt = timed(fit, dev)
    out["aware"] = dt / experts
    # the study keeps these in float64 (float32 breaks the 0.1% rule on one SmolLM2 matrix)
    _, out["factor"] = timed(lambda: fit_quantized(err[0].cpu(), h1.cpu(), rank, fbits, whiten=l[0].cpu()), dev)
    return out


def project_models(models: list[str], dev, precision: str, tokens: int, seed: int) -> None:
    ops = study_operations()
    rank = ops["rank"]
    fbits = factor_bits(ops["factor_bits"][0]) if ops["factor"] else 4
    print(f"\nexpert shapes of real models, {precision} on {dev}: seconds per matrix (matrices per second); "
          f"fits at rank {rank}; whitening per Gram matrix")
    print(f"  a default study per expert matrix: {ops['rtn']} RTN, {ops['optimized']} optimized, {ops['aware']} "
          f"activation-aware fits, {ops['svd']} plain SVD fit, {ops['factor']} fit with low-bit factors "
          f"({', '.join(ops['factor_bits']) or 'none'}; float64 on the CPU, one matrix at a time); "
          f"one whitening per Gram matrix and fit variant that needs one (the float32 activation-aware fits of "
          f"large matrices need none)")
    head = (f"{'model':<17}{'matrix':<14}{'E timed':>8}{'RTN':>15}{'optimized':>15}{'SVD fit':>15}{'aware fit':>15}"
            f"{'factor fit':>15}{'whiten':>8}")
    print(head)
    projections = []
    for name in models:
        s = expert_shapes(name)
        per_layer = 0.0
        for label, (rows, cols), uses in (("w1, w3", (s.intermediate, s.hidden), 2), ("w2", (s.hidden, s.intermediate), 1)):
            n = max(1, min(s.experts, STACK_ELEMENTS // (rows * cols)))
            t = time_shape(rows, cols, n, dev, precision, rank, tokens, seed, fbits)
            cell = lambda v: f"{v:7.3f} ({1 / v:5.1f})"
            print(f"{name:<17}{f'{label} {rows}x{cols}':<14}{n:>8}{cell(t['rtn']):>15}{cell(t['optimized']):>15}"
                  f"{cell(t['svd']):>15}{cell(t['aware']):>15}{cell(t['factor']):>15}{t['whiten']:8.2f}")
            per_matrix = (ops["rtn"] * t["rtn"] + ops["optimized"] * t["optimized"] + ops["aware"] * t["aware"]
                          + ops["svd"] * t["svd"] + ops["factor"] * t["factor"])
            whitenings = ops["factor"] + (ops["aware"] if t["aware_whitens"] else 0)
            per_layer += s.experts * (uses * per_matrix + whitenings * t["whiten"])
        projections.append((name, s, per_layer * s.moe_layers))
    print(f"\nprojected quantization + fits of a full default study on this machine ({precision}, {dev}):")
    for name, s, total in projections:
        target = "  (target: under 1 hour)" if name == "olmoe-1b-7b" else ""
        print(f"  {name:<17} {s.moe_layers} MoE layers x {s.experts} experts x 3 matrices = {s.matrices} matrices: "
              f"{total / 3600:7.2f} h{target}")
    print(peak_memory(dev))
