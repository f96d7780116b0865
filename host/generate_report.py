"""The end-of-run report of `ndpmoe generate` (host/generate.py): measured time per forward pass
and its split, the NDP unit's cycles, bytes per link and kind (planned and executed), the cache."""
from __future__ import annotations

from .generate import MB, GenerateResult

_ROWS = (("planning", "planning_s"), ("routing (router matmul, top-k)", "routing_s"),
         ("expert compute (GPU backend, combine, NDP operand packing)", "expert_compute_s"),
         ("fetch (store reads + unpacking fetched experts)", "fetch_s"),
         ("upload (host -> device copies)", "upload_s"),
         ("NDP backend (host time running the unit's model)", "ndp_backend_s"),
         ("next-layer prefetch (guess, stage: host time)", "prefetch_s"),
         ("rest of the model (attention, dense layers, LM head)", "other_model_s"))


def _mean(steps, attr: str) -> float:
    return sum(getattr(s, attr) for s in steps) / len(steps) if steps else 0.0


def format_report(r: GenerateResult) -> str:
    """The end-of-run report: time per token and its split, NDP cycles, bytes per link, cache."""
    o = r.options
    lines = [f"model {r.model}; {o.bits}-bit experts, policy {o.policy}, placement {o.placement}, NDP {o.ndp}"
             f" ({o.ndp_config}), cache {o.cache_mb:g} MB {o.eviction}, device {r.device}; system {r.system}"]
    if r.interrupted:
        lines.append(r.interrupted)
    pre = r.steps[0] if r.steps else None
    dec = r.decode_steps
    if pre is not None:
        lines.append(f"prompt {r.prompt_tokens} tokens: prefill {pre.wall_s * 1e3:.0f} ms; "
                     f"{len(r.tokens)} tokens generated")
    if dec:
        lines.append(f"decode: {r.tokens_per_s:.2f} tokens/s ({_mean(dec, 'wall_s') * 1e3:.1f} ms per token, "
                     f"mean of {len(dec)} tokens after the first), measured wall time on this machine")
    lines.append("")
    head = f"  {'per forward pass, ms':<58}{'prefill':>10}{'decode mean':>13}{'share':>8}"
    lines.append(head)
    total = _mean(dec, "wall_s")
    for label, attr in _ROWS:
        p = getattr(pre, attr) * 1e3 if pre else 0.0
        d = _mean(dec, attr) * 1e3
        share = f"{d / (total * 1e3):7.0%}" if total else ""
        lines.append(f"  {label:<58}{p:>10.2f}{d:>13.2f}{share:>8}")
    lines.append(f"  {'total (wall)':<58}{(pre.wall_s * 1e3 if pre else 0):>10.2f}{total * 1e3:>13.2f}")
    moe = max((s.moe_layers for s in r.steps), default=0)
    if dec and moe:
        lines.append(f"  planning per token-layer: {_mean(dec, 'planning_s') / moe * 1e6:.0f} us ({moe} MoE layers), "
                     f"{_mean(dec, 'planning_decide_s') / moe * 1e6:.0f} us of it deciding (the launch waits for it; "
                     f"the cache bookkeeping after it can overlap the layer)")
    if o.ndp != "none" and r.steps:
        measured = all(s.ndp_cycles_measured for s in r.steps)
        src = "measured on the RTL" if measured else "cost model RTL_COSIM (golden backend)"
        clock = r.ndp_clock_mhz or 0
        lines.append("")
        lines.append(f"NDP unit ({src}), at {clock:g} MHz:")
        if pre is not None:
            lines.append(f"  prefill: {pre.ndp_descriptors} descriptors, {pre.ndp_cycles:.0f} cycles = "
                         f"{pre.ndp_cycles / clock:.1f} us")
        if dec:
            lines.append(f"  decode: {_mean(dec, 'ndp_descriptors'):.0f} descriptors, {_mean(dec, 'ndp_cycles'):.0f} "
                         f"cycles per token = {_mean(dec, 'ndp_cycles') / clock:.1f} us")
    lines.append("")
    lines.append("bytes moved per token (decode mean), by link and kind: planned / executed")
    kinds = sorted({k for s in r.steps for k in (*s.link_planned, *s.link_executed)})
    for k in kinds:
        p = sum(s.link_planned[k] for s in dec) / len(dec) if dec else 0
        e = sum(s.link_executed[k] for s in dec) / len(dec) if dec else 0
        pp = pre.link_planned[k] if pre else 0
        lines.append(f"  {k:<18} {p:>12,.0f} / {e:>12,.0f}   (prefill {pp:,})")
    lines.append(f"  executed equal to planned in every pass: {'yes' if r.link_equal() else 'NO'}; "
                 f"unplanned uploads: {sum(s.unplanned_uploads for s in r.steps)}")
    lines += _prefetch_lines(r, pre, dec)
    c = r.cache
    rates = ", ".join(f"{k} {v:.1%}" for k, v in c["hit_rate"].items())
    lines.append(f"expert cache: {c['capacity_bytes'] / MB:g} MB ({c['eviction']}), {c['entries']} entries, "
                 f"{c['used_bytes'] / MB:.2f} MB used; hit rate {rates or 'n/a'}; evictions "
                 f"{sum(c['evictions'].values())}")
    s = r.setup_s
    lines.append(f"setup: model {s.get('model_load_s', 0):.1f} s, store {s.get('store_s', 0):.1f} s "
                 f"({'built' if r.store['built'] else 'reused'}: {r.store['folder']}), NDP image placement "
                 f"{s.get('ndp_placement_s', 0):.1f} s")
    return "\n".join(lines)


def _prefetch_lines(r: GenerateResult, pre, dec) -> list[str]:
    """Demand fetches always; with the next-layer prefetch, its guesses and bytes."""
    n = len(dec)
    fetches = sum(s.fetches for s in dec) / n if n else 0.0
    demand = sum(s.demand_fetches for s in dec) / n if n else 0.0
    lines = [f"device fetches per token (decode mean): {fetches:.1f}, of them on demand {demand:.1f} "
             f"(prefill {pre.fetches if pre else 0}, on demand {pre.demand_fetches if pre else 0})"]
    p = r.extra.get("prefetch")
    if p is None:
        lines.append(f"next-layer prefetch: off (--prefetch {r.options.prefetch})")
        return lines
    acc = p["accuracy"]
    total = p["staged_bytes"] or 1
    lines.append(f"next-layer prefetch: on, staging buffer {p['budget_bytes']:,} bytes; {p['predictions']} layers "
                 f"guessed, {p['predicted_selected']} of their {p['selected']} selected experts guessed "
                 f"({'n/a' if acc is None else f'{acc:.1%}'})")
    if dec:
        guess = sum(s.prefetch.get("guess_s", 0.0) for s in dec) / n * 1e3
        lines.append(f"  host time per token: {_mean(dec, 'prefetch_s') * 1e3:.1f} ms, of it guessing {guess:.1f} ms "
                     f"(the rest reads and unpacks what it stages: fetch work done earlier)")
    lines.append(f"  staged {p['staged_bytes']:,} bytes: used {p['used_bytes']:,} ({p['used_bytes'] / total:.1%}), "
                 f"wasted {p['wasted_bytes']:,} (link traffic beyond the plans'), "
                 f"{sum(s.staged_fetches for s in r.steps)} of {sum(s.fetches for s in r.steps)} fetches staged")
    return lines
