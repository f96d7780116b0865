"""Quantizer and fit throughput at the expert shapes of real MoE models, and the projected time
of a full default study (`ndpmoe eval` with its default plan) of each on this machine.

A default study quantizes every expert matrix with each of its quantizers at each bit width (and
the higher-precision copies with the last quantizer), and fits compensators of the top rank: the
activation-aware one at every bit width, plain SVD once at the base width. The projection counts
exactly those operations from the plan's defaults (host/study_plan.PlanOptions), each at the time
measured here for that matrix shape, plus one whitening per Gram matrix (w1 and w3 share one).
Not counted: calibration passes, sensitivities and the perplexity passes. Every bit width is
charged the time measured at int3.
"""
from __future__ import annotations

import torch

from ndpmoe.model.compensate import fit_activation_aware_stack, fit_svd_stack, gram, whitening_factors
from ndpmoe.model.contract import QuantFormat
from ndpmoe.model.real_configs import expert_shapes
from ndpmoe.model.quantize import quantize_stack

from .devices import peak_memory, timed
from .quant_bench import synthetic_case

STACK_ELEMENTS = 1 << 24          # experts timed together: about this many weights


def study_operations() -> dict[str, int]:
    """Per expert matrix, how many of each operation the default `ndpmoe eval` plan performs."""
    from .study_plan import PlanOptions

    o = PlanOptions()
    q_best = o.quantizers[-1]
    counts = {"rtn": 0, "hqq": 0, "optimized": 0}
    for q in o.quantizers:
        counts[q] += len(o.bits)
    if o.hi_bits:
        counts[q_best] += 1
    aware = 1 + (len(o.bits) - 1 if getattr(o, "other_bits_topn", True) else 0)
    return {**counts, "aware": aware, "svd": 1 if o.compare_fits else 0, "rank": max(o.ranks)}


def time_shape(rows: int, cols: int, experts: int, dev, precision: str, rank: int, tokens: int, seed: int) -> dict:
    """Seconds per matrix of each operation on a stack of `experts` [rows, cols] matrices."""
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
    lx = l.expand(experts, cols, cols)
    _, dt = timed(lambda: fit_activation_aware_stack(err, None, rank, whiten=lx, precision=precision, device=dev), dev)
    out["aware"] = dt / experts
    return out


def project_models(models: list[str], dev, precision: str, tokens: int, seed: int) -> None:
    ops = study_operations()
    rank = ops["rank"]
    print(f"\nexpert shapes of real models, {precision} on {dev}: seconds per matrix (matrices per second); "
          f"fits at rank {rank}; whitening per Gram matrix")
    print(f"  a default study per expert matrix: {ops['rtn']} RTN, {ops['optimized']} optimized, {ops['aware']} "
          f"activation-aware fits, {ops['svd']} plain SVD fit")
    head = f"{'model':<17}{'matrix':<14}{'E timed':>8}{'RTN':>16}{'optimized':>16}{'SVD fit':>16}{'aware fit':>16}{'whiten':>9}"
    print(head)
    projections = []
    for name in models:
        s = expert_shapes(name)
        per_layer = 0.0
        for label, (rows, cols), uses in (("w1, w3", (s.intermediate, s.hidden), 2), ("w2", (s.hidden, s.intermediate), 1)):
            n = max(1, min(s.experts, STACK_ELEMENTS // (rows * cols)))
            t = time_shape(rows, cols, n, dev, precision, rank, tokens, seed)
            cell = lambda v: f"{v:8.3f} ({1 / v:5.1f})"
            print(f"{name:<17}{f'{label} {rows}x{cols}':<14}{n:>8}{cell(t['rtn']):>16}{cell(t['optimized']):>16}"
                  f"{cell(t['svd']):>16}{cell(t['aware']):>16}{t['whiten']:9.2f}")
            per_matrix = (ops["rtn"] * t["rtn"] + ops["optimized"] * t["optimized"] + ops["aware"] * t["aware"]
                          + ops["svd"] * t["svd"])
            per_layer += s.experts * (uses * per_matrix + t["whiten"])
        projections.append((name, s, per_layer * s.moe_layers))
    print(f"\nprojected quantization + fits of a full default study on this machine ({precision}, {dev}):")
    for name, s, total in projections:
        target = "  (target: under 1 hour)" if name == "olmoe-1b-7b" else ""
        print(f"  {name:<17} {s.moe_layers} MoE layers x {s.experts} experts x 3 matrices = {s.matrices} matrices: "
              f"{total / 3600:7.2f} h{target}")
    print(peak_memory(dev))
