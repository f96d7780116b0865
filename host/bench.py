"""The benchmark behind `ndpmoe bench`: modeled decode throughput and bytes per token of a named MoE model on a named
system, for fp16 offloading with LRU, uniform low-bit, HOBBIT-style mixed precision at the bytes of
Top-1, Top-n restoration at each n, and the budgeted adaptive policy at the bytes of each Top-n.
Expert selection replays a routing trace (which one is printed); the planning cost of the runtime
itself is measured and printed per token per layer."""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

from ndpmoe.model.contract import QuantFormat

from .cmd_bench import ROWS
from .models import get_model
from .policy import BudgetedPolicy, HobbitTopHi, TopN
from .presets import get_system
from .routing_trace import RoutingTrace, synthetic_trace, text_trace, trace_for
from .sensitivity import assumed_sensitivity
from .simulate import simulate
from .sizes import ExpertSizes

PLANNING_GOAL_US = 50.0


def _topn_values(spec: str, k: int) -> list[int]:
    if spec == "all":
        return list(range(1, k))
    out = []
    for part in spec.split(","):
        if not part.strip().isdigit():
            raise ValueError(f"--topn must be 'all' or comma-separated integers, not {spec!r}")
        n = int(part)
        if not 1 <= n < k:
            raise ValueError(f"--topn {n}: n must be in [1, k) = [1, {k}) for {k}-way routing")
        out.append(n)
    return out


def _trace(args, spec) -> RoutingTrace:
    if args.trace == "auto":
        return trace_for(spec.experts, spec.top_k, spec.moe_layers, args.tokens, default_model=spec.name == "default")
    if args.trace == "text":
        return text_trace(spec.experts, spec.top_k, spec.moe_layers, args.tokens)
    if args.trace == "synthetic":
        return synthetic_trace(spec.experts, spec.top_k, spec.moe_layers, args.tokens)
    t = RoutingTrace.load(args.trace)
    if t.num_experts != spec.experts or t.top_k != spec.top_k:
        raise ValueError(f"trace {args.trace!r} routes top-{t.top_k} of {t.num_experts}, model {spec.name!r} "
                         f"needs top-{spec.top_k} of {spec.experts}")
    return t


def _cpu_reference_s() -> float:
    """CPU seconds of a fixed pure-Python loop, best of three: planning costs scale with it."""
    best = math.inf
    for _ in range(3):
        t0 = time.process_time()
        sum(range(10 ** 7))
        best = min(best, time.process_time() - t0)
    return best


def _hobbit_threshold(trace: RoutingTrace, fraction: float) -> float:
    """Router weight above which the top slot gets its copy, so a `fraction` of tokens do."""
    if fraction >= 1.0:
        return 0.0
    top = torch.cat([w[:, 0] for w in trace.weights]).double()
    return float(torch.quantile(top, 1.0 - fraction)) if fraction > 0 else math.inf


def run(args) -> int:
    spec = get_model(args.model)
    system = get_system(args.system, gpu=args.gpu, link=args.link, ndp=args.ndp)
    rows = [r.strip() for r in args.policy.split(",") if r.strip()]
    for r in rows:
        if r not in ROWS:
            raise ValueError(f"unknown --policy row {r!r}; expected some of {ROWS}")
    if args.cache_policy not in ("lru", "lfu"):
        raise ValueError(f"unknown --cache-policy {args.cache_policy!r}; expected lru or lfu")
    ns = _topn_values(args.topn, spec.top_k)
    word_bits = system.ndp.ndp_config.word_bits if system.ndp else 128
    ndp_cfg = system.ndp.ndp_config if system.ndp else None
    sizes = ExpertSizes(spec.hidden, spec.intermediate, QuantFormat(args.bits, args.group, word_bits),
                        QuantFormat(args.hi_bits, args.group, word_bits), args.rank, ndp_cfg)
    fp16_sizes = ExpertSizes(spec.hidden, spec.intermediate, None, None, 0, ndp_cfg)
    cache_bytes = int(args.cache_gb * 1e9)
    if not 0.0 <= args.factor_share < 0.5:
        raise ValueError(f"--factor-share must be in [0, 0.5), not {args.factor_share}")
    if cache_bytes < sizes.weight_bytes("lo"):
        raise ValueError(f"--cache-gb {args.cache_gb} ({cache_bytes} bytes) is smaller than one "
                         f"{sizes.fmt} expert of {spec.name} ({sizes.weight_bytes('lo')} bytes)")
    trace = _trace(args, spec)
    sens = assumed_sensitivity(spec.experts, args.rank)
    top_bytes = {n: n * args.rank * sizes.fp16_bytes_per_rank for n in ns}

    print(f"model {spec.name}: {spec.moe_layers} MoE layers, {spec.experts} experts, top-{spec.top_k}, "
          f"D {spec.hidden}, I {spec.intermediate}; {sizes.fmt} expert {sizes.weight_bytes('lo') / 1e6:.1f} MB, "
          f"fp16 {fp16_sizes.weight_bytes('fp16') / 1e6:.1f} MB, int{args.hi_bits} copy "
          f"{sizes.weight_bytes('hi') / 1e6:.1f} MB, rank-{args.rank} fp16 factors {sizes.factor_bytes_fp16(args.rank) / 1e6:.2f} MB")
    ndp_desc = (f", NDP {system.ndp.name}: {system.ndp.units} x {system.ndp.ndp_config.word_bits}-bit units at "
                f"{system.ndp.clock_mhz:.0f} MHz = {system.ndp.peak_gbps:.1f} GB/s" if system.ndp else "")
    print(f"system {system.name}: GPU {system.gpu.name}, link {system.link.name} {system.link.gbps} GB/s, "
          f"memory {system.memory.name} {system.memory.gbps} GB/s{ndp_desc}")
    if system.ndp:
        print(f"NDP cycles: {system.ndp.cost.source}")
    print(f"trace: {trace.source}")
    print(f"sensitivity (adaptive choices only): {sens.source}")
    print(f"cache {args.cache_gb} GB" + (f" ({args.factor_share:.0%} of it a separate factor pool for restoring rows)"
                                        if args.factor_share else " (experts and factors share it)")
          + f", {args.tokens} tokens, batch {args.batch}, placement {args.placement}")

    lo = (args.cache_policy, sizes)
    print("MB/tok: 'moved' = over the link + read by the NDP units; then the link's share by kind "
          "('weights' includes prefetches, 'ndp io' activations and results), then the NDP's reads.")
    print("Equal-bytes rows (adaptive, hobbit) are calibrated to the measured bytes of the Top-n row they name.")
    header = (f"{'configuration':<52} {'moved':>8} {'link':>8} {'weights':>8} {'factors':>7} {'hi':>7} "
              f"{'ndp io':>7} {'NDP read':>8} {'GPU hit':>7} {'tok/s':>7} {'plan us':>7}")
    print(header)
    print("-" * len(header))
    results = []

    def run_row(label, policy, variant, eviction, sz, show=True) -> float:
        restores = isinstance(policy, BudgetedPolicy) or (isinstance(policy, TopN) and policy.n > 0)
        res = simulate(label, spec, system, sz, policy, trace, cache_bytes=cache_bytes, eviction=eviction,
                       weight_variant=variant, batch=args.batch, placement=args.placement, sensitivity=sens,
                       factor_cache_bytes=int(args.factor_share * cache_bytes) if restores else 0)
        s = res.summary
        lb = s["link_bytes_per_token"]
        ndp_read = s["ndp_words_per_token"] * (system.ndp.ndp_config.word_bytes if system.ndp else 0)
        moved = s["total_link_bytes_per_token"] + ndp_read
        if not show:
            return moved
        weights = lb.get("weights", 0) + lb.get("fp16_weights", 0) + lb.get("prefetch", 0)
        ndp_io = lb.get("act_to_ndp", 0) + lb.get("results_from_ndp", 0)
        print(f"{label:<52} {moved / 1e6:>8.2f} {s['total_link_bytes_per_token'] / 1e6:>8.2f} {weights / 1e6:>8.2f} "
              f"{lb.get('factors', 0) / 1e6:>7.2f} {lb.get('hi_weights', 0) / 1e6:>7.2f} {ndp_io / 1e6:>7.2f} "
              f"{ndp_read / 1e6:>8.2f} {res.cache_hit_rate:>7.1%} {s['tokens_per_s']:>7.2f} "
              f"{res.planning_us_per_token_layer:>7.1f}", flush=True)
        results.append({"label": label, "policy": policy.name, "eviction": eviction, **s,
                        "ndp_read_bytes_per_token": ndp_read, "moved_bytes_per_token": moved,
                        "gpu_hit_rate": res.cache_hit_rate,
                        "planning_us_per_token_per_layer": res.planning_us_per_token_layer})
        return moved

    def at_equal_bytes(make_label, make_policy, x0: float, target: float, limit: float = math.inf) -> None:
        """Run make_policy(x) with x rescaled once so its extra bytes over uniform low-bit match
        `target` (bytes moved depend on the cache, so the nominal x only starts the search)."""
        x = min(x0, limit)
        extra = run_row("", make_policy(x), "lo", *lo, show=False) - base
        if extra > 0:
            x = min(limit, x * target / extra)
        run_row(make_label(x), make_policy(x), "lo", *lo)

    if "fp16-lru" in rows:
        run_row("fp16 + LRU", TopN(0), "fp16", "lru", fp16_sizes)
    base = run_row(f"uniform int{args.bits}", TopN(0), "lo", *lo, show="uniform" in rows)
    top = {}
    for n in (ns if "topn" in rows or "adaptive" in rows else ns[:1]):
        top[n] = run_row(f"ours top-{n} r{args.rank}", TopN(n), "lo", *lo, show="topn" in rows) - base
    if "adaptive" in rows:
        for n in ns:
            at_equal_bytes(lambda b, n=n: f"ours adaptive, {b / 1e3:.0f} kB/tok/layer (= top-{n} bytes)",
                           BudgetedPolicy, top_bytes[n], top[n])
    if "hobbit" in rows and ns:
        # HOBBIT-style: the higher-precision copy of the top expert for a share of the tokens (those
        # with the largest top router weight), at the bytes Top-1 restoration adds.
        at_equal_bytes(lambda f: f"hobbit int{args.hi_bits} top-1, {f:.1%} of tokens (= top-{ns[0]} bytes)",
                       lambda f: HobbitTopHi(1, _hobbit_threshold(trace, f)),
                       top_bytes[ns[0]] / sizes.hi_extra_bytes, top[ns[0]], limit=1.0)
    worst = max((r["planning_us_per_token_per_layer"] for r in results), default=0.0)
    ref = _cpu_reference_s()
    print(f"planning cost: at most {worst:.1f} us per token per layer (goal < {PLANNING_GOAL_US:.0f} us), CPU time, "
          f"median over decode steps; for scale, sum(range(10**7)) takes {ref:.3f} s of CPU here")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": spec.name, "system": system.name, "trace": trace.source,
                       "cpu_reference_s": ref, "planning_goal_us": PLANNING_GOAL_US,
                       "ndp_cost": system.ndp.cost.source if system.ndp else None,
                       "sensitivity": sens.source, "cache_gb": args.cache_gb, "rows": results}, f, indent=1)
    return 0
