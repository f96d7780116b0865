"""What packed low-bit compensators keep of the fp16 factors' error reduction, measured through
the runtime: the expert store holds them (host/store.py), the executor runs them on the GPU path
(rows of the packed B and A^T images fetched and dequantized) and on the NDP (B x and A (Bx) as
MATMUL descriptors on the golden model), and the bytes are ExpertSizes'.

Per configuration (Top-n slots restored at rank r) and unit: the layer-output error against the
float block on held-out block inputs, energy summed over the layers (sum ||y - ref||^2 / sum
||ref||^2), and

    kept = (error without compensation - error with it) / (the same reduction by fp16 factors on the GPU)

each unit against its own uncompensated error (the NDP's includes its int8 activations). The
NDP's "fp16" row is the store's int8 factors (what an fp16 store gives the NDP).
"""
from __future__ import annotations

import time

import torch

from ndpmoe.model.contract import get_config
from ndpmoe.model.moe import route, shared_expert

from .backends import TorchGpuBackend
from .cache import ExpertCache
from .execute import LayerExecutor
from .ndp import GoldenNdpBackend, NdpDriver
from .plan import LayerPlanner
from .policy import TopN
from .presets import get_system
from .runtime import ndp_memory_bytes
from .sizes import MATRICES

UNITS = {"gpu": "all-gpu", "ndp": "all-ndp"}


def held_out(dm, layers: list[int], tokens: int) -> tuple[dict, dict]:
    """Float-model block inputs of `layers` at `tokens` held-out positions (drawn with a fixed seed
    from windows of 256 over the evaluation half of the text, at least 1024 tokens), and the float
    blocks' outputs on them."""
    from ndpmoe.model.block import FloatMoE, set_blocks
    from ndpmoe.model.perplexity import collect_mlp_inputs
    from ndpmoe.model.text import token_windows, tokenize

    floats = {l: FloatMoE(w, rc) for l, (w, rc) in dm.blocks.items()}
    set_blocks(dm.model, floats)
    windows = token_windows(tokenize(dm.text.eval, dm.tokenizer), 256, max(tokens, 1024))
    inputs = collect_mlp_inputs(dm.model, windows, max_rows=tokens, layers=layers, progress=False)
    return inputs, {l: floats[l](x) for l, x in inputs.items()}


def layer_errors(ms, dm, data, layers: list[int], precision: str, unit: str, policy, ndp_cfg) -> tuple[float, float]:
    """(sum ||y - ref||^2, sum ||ref||^2) over `layers`, through planner + executor (the NDP: a
    golden unit per layer holding that layer's images)."""
    store = ms.store
    sizes = store.sizes(ndp_cfg, precision)
    cache = ExpertCache(1 << 40)
    planner = LayerPlanner(sizes, cache, policy, system=get_system("gpu-ndp"), placement=UNITS[unit],
                           sensitivity=store.sensitivity, prefetch=False)
    mem = ndp_memory_bytes(sizes, store.manifest.experts, 1)
    num = den = 0.0
    for l in layers:
        sl, (w, cfg) = ms.layer_index[l], dm.blocks[l]
        ndp = NdpDriver(GoldenNdpBackend(ndp_cfg, -(-mem // (1 << 20)) << 20)) if unit == "ndp" else None
        ex = LayerExecutor(store, TorchGpuBackend("cpu"), cache, ndp, factor_precision=precision)
        if ndp is not None:
            ex.place_layer(sl)
        x, ref = data[0][l].float(), data[1][l].float()
        plan = planner.plan(sl, *route(x, w.router, cfg))
        y, _ = ex.run(plan, x, shared=lambda v: shared_expert(v, w))
        num += float((y - ref).square().sum())
        den += float(ref.square().sum())
    return num, den


def run_bench(ms, dm, data, layers: list[int], configs: list[tuple[int, int]], ndp_name: str = "default",
              log=print) -> dict:
    store = ms.store
    ndp_cfg = get_config(ndp_name)
    precisions = store.factor_precisions
    sizes = {p: store.sizes(ndp_cfg, p) for p in precisions}
    expert = sizes["fp16"].weight_bytes("lo")
    out = {"layers": layers, "store": str(store.folder), "stored_rank": store.rank, "fmt": str(store.fmt),
           "expert_bytes": expert, "tokens_per_layer": int(data[0][layers[0]].shape[0]),
           "bytes": {}, "rows": []}
    log(f"store {store.folder.name}: {store.fmt} experts of {expert} B, rank {store.rank}, "
        f"factor precisions {precisions}; layers {layers}, {out['tokens_per_layer']} held-out tokens each")
    log(f"{'factors':8s} {'GPU B/rank':>11s} {'% expert':>9s} {'NDP image B':>12s}   (one expert, w1+w3+w2)")
    for p, s in sizes.items():
        ndp_b = sum(sum(s.ndp_factor_bytes(m)) for m in MATRICES)
        out["bytes"][p] = {"gpu_rank_bytes": s.gpu_rank_bytes, "ndp_image_bytes": ndp_b}
        log(f"{p:8s} {s.gpu_rank_bytes:11d} {100 * s.gpu_rank_bytes / expert:8.2f}% {ndp_b:12d}"
            + ("   (NDP: int8 factors of the fp16 fit)" if p == "fp16" else ""))
    base = {u: layer_errors(ms, dm, data, layers, "fp16", u, TopN(0), ndp_cfg) for u in UNITS}
    log(f"\n{'config':10s} {'factors':8s} " + " ".join(f"{u + ' err':>10s} {u + ' kept':>9s}" for u in UNITS))
    log(f"{'none':10s} {'-':8s} " + " ".join(f"{(n / d) ** 0.5:10.4f} {'':>9s}" for n, d in base.values()))
    for n, r in configs:
        policy = TopN(n, r)
        errs = {(p, u): layer_errors(ms, dm, data, layers, p, u, policy, ndp_cfg) for p in precisions for u in UNITS}
        ref_red = base["gpu"][0] - errs[("fp16", "gpu")][0]
        for p in precisions:
            row = {"n": n, "rank": r, "factors": p}
            cells = []
            for u in UNITS:
                num, den = errs[(p, u)]
                kept = (base[u][0] - num) / ref_red if ref_red > 0 else float("nan")
                row[f"{u}_err"], row[f"{u}_kept"] = (num / den) ** 0.5, kept
                cells.append(f"{(num / den) ** 0.5:10.4f} {kept:9.3f}")
            out["rows"].append(row)
            log(f"{f'top-{n} r{r}':10s} {p:8s} " + " ".join(cells))
    return out


def main(model_layers: list[int], rank: int, configs: list[tuple[int, int]], tokens: int = 128,
         factor_bits=(8, 4, 3), ndp_name: str = "default", log=print) -> dict:
    from .generate import ModelSpec, load_model
    from .generate_store import StoreSettings, model_store

    t0 = time.time()
    dm = load_model(ModelSpec("default"))
    s = StoreSettings(rank=rank, factor_bits=tuple(factor_bits))
    ms = model_store(dm, s, layers=model_layers, log=log)
    data = held_out(dm, model_layers, tokens)
    out = run_bench(ms, dm, data, model_layers, configs, ndp_name, log)
    out["seconds"] = round(time.time() - t0, 1)
    log(f"\n{out['seconds']:.0f} s")
    return out
