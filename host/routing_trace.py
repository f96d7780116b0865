"""Routing traces: the top-k expert ids and weights each token got in each MoE layer. ("Trace"
means this one thing in the project: the per-layer figures of a planned run are its statistics,
host/run_stats.py, and a simulator's signal dump is its waveform.)

Where they come from, best first:
1. the offline default MoE model's real routers on the evaluation text (`default_model_trace`),
   used for a target model only if E and K match (the `default` model of `ndpmoe bench`);
2. real text through a real model with routers fitted to it (`text_trace`): SmolLM2-135M's MLP
   inputs on the evaluation text, and per layer a router whose rows are k-means centroids of its
   calibration-text MLP inputs (so experts own regions of the real activation distribution,
   popularity is as uneven as the clusters and consecutive tokens share experts as text does);
3. any MoEWeights' routers over any activations (`record_routing`), e.g. tests' random blocks.
Every trace carries a `source` string that the bench prints.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from ndpmoe.model.errors import CacheEntryError, NdpmoeError
from ndpmoe.model.integrity import atomic_path, clean_stale_temps, notice, read_sealed, write_sealed
from ndpmoe.model.moe import RouterConfig, route

MLP_INPUTS_KIND = "ndpmoe-smollm2-mlp-inputs"
ROUTER_LOGIT_STD = 1.5      # assumed per-token spread of router logits (a temperature), see text_trace


@dataclass(frozen=True, eq=False)
class RoutingTrace:
    ids: tuple[torch.Tensor, ...]          # per layer [T, K] long, sorted by weight, descending
    weights: tuple[torch.Tensor, ...]      # per layer [T, K] float32
    num_experts: int
    source: str

    def __post_init__(self):
        if not self.ids or len(self.ids) != len(self.weights):
            raise ValueError(f"a trace needs the same non-zero number of id and weight layers, "
                             f"not {len(self.ids)} and {len(self.weights)}")
        shape = tuple(self.ids[0].shape)
        for l, (i, w) in enumerate(zip(self.ids, self.weights)):
            if tuple(i.shape) != shape or tuple(w.shape) != shape:
                raise ValueError(f"layer {l} has ids {tuple(i.shape)} and weights {tuple(w.shape)}, expected {shape}")
            if i.numel() and not 0 <= int(i.min()) <= int(i.max()) < self.num_experts:
                raise ValueError(f"layer {l} has expert ids outside [0, {self.num_experts})")

    @property
    def layers(self) -> int:
        return len(self.ids)

    @property
    def tokens(self) -> int:
        return self.ids[0].shape[0]

    @property
    def top_k(self) -> int:
        return self.ids[0].shape[1]

    def save(self, path: str | Path) -> None:
        tensors = {f"ids.{l}": i.contiguous() for l, i in enumerate(self.ids)}
        tensors |= {f"weights.{l}": w.float().contiguous() for l, w in enumerate(self.weights)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"source": self.source, "num_experts": str(self.num_experts)})

    @classmethod
    def load(cls, path: str | Path) -> "RoutingTrace":
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                t = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as exc:
            raise NdpmoeError(f"{path} is not a routing trace: not a readable safetensors file ({exc})") from None
        if "num_experts" not in meta:
            raise NdpmoeError(f"{path} is not a routing trace (no num_experts in its metadata)")
        n = len([k for k in t if k.startswith("ids.")])
        try:
            return cls(tuple(t[f"ids.{l}"] for l in range(n)), tuple(t[f"weights.{l}"] for l in range(n)),
                       int(meta["num_experts"]), meta.get("source", str(path)))
        except (KeyError, ValueError) as exc:
            raise NdpmoeError(f"{path} is not a whole routing trace ({exc})") from None


def record_routing(hidden: list[torch.Tensor], routers: list[torch.Tensor], router_config: RouterConfig,
                   source: str) -> RoutingTrace:
    """Route each layer's activations [T, D] with its router [E, D] (model.moe.route)."""
    if len(hidden) != len(routers):
        raise ValueError(f"{len(hidden)} layers of activations but {len(routers)} routers")
    out = [route(h.float(), r.float(), router_config) for h, r in zip(hidden, routers)]
    return RoutingTrace(tuple(i for i, _ in out), tuple(w.float() for _, w in out), routers[0].shape[0], source)


def kmeans_router(calib: torch.Tensor, experts: int, seed: int = 0, iters: int = 10) -> torch.Tensor:
    """Router [E, D] whose rows are k-means centroids of calib [N, D] (RMS-normalized), scaled so
    per-token logits have a standard deviation of ROUTER_LOGIT_STD on the calibration tokens."""
    x = calib.float()
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)
    g = torch.Generator().manual_seed(seed)
    cent = x[torch.randperm(x.shape[0], generator=g)[:experts]].clone()
    for _ in range(iters):
        assign = torch.cdist(x, cent).argmin(1)
        for e in range(experts):
            members = x[assign == e]
            if members.shape[0]:
                cent[e] = members.mean(0)
    cent = cent - cent.mean(0, keepdim=True)        # logits compare experts, not the common part
    std = (calib.float() @ cent.t()).std(dim=1).mean().clamp_min(1e-9)
    return cent * (ROUTER_LOGIT_STD / std)


def _trace_cache_dir() -> Path:
    from ndpmoe.model.paths import cache_dir
    return cache_dir()


def smollm_mlp_inputs(tokens: int, log: Callable[[str], None] = print
                      ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], str]:
    """SmolLM2-135M MLP inputs on `tokens` calibration and `tokens` evaluation tokens, per layer
    ({layer: [tokens, 576]} twice) and a description; cached under the project cache folder."""
    from ndpmoe.model.text import load_text, tokenize
    text = load_text()
    key = hashlib.sha256(f"{text.digest}-{tokens}".encode()).hexdigest()[:12]
    path = _trace_cache_dir() / f"smollm2-mlp-inputs-{key}.safetensors"
    desc = f"SmolLM2-135M MLP inputs on {text.source} ({tokens} eval tokens, text {text.digest})"
    clean_stale_temps(path.parent)
    t = None
    if path.is_file():
        try:
            t, _ = read_sealed(path, MLP_INPUTS_KIND, {"text_digest": text.digest, "tokens": tokens})
        except CacheEntryError as exc:
            notice(f"cached MLP inputs failed their check, recording them again: {exc}")
    if t is None:
        from ndpmoe.model.perplexity import collect_mlp_inputs
        from ndpmoe.model.smollm import load_smollm
        log(f"recording SmolLM2 MLP inputs on {2 * tokens} tokens of real text (once, cached) ...")
        model, tok = load_smollm()
        calib_ids, eval_ids = tokenize(text.calib, tok)[:tokens], tokenize(text.eval, tok)[:tokens]
        with torch.no_grad():
            h = collect_mlp_inputs(model, torch.stack([calib_ids, eval_ids]), max_rows=None, progress=False)
        t = {}
        for l, v in h.items():
            v = v.reshape(2, tokens, -1)
            t[f"calib.{l}"], t[f"eval.{l}"] = v[0].half().contiguous(), v[1].half().contiguous()
        try:
            write_sealed(path, t, MLP_INPUTS_KIND, {"text_digest": text.digest, "tokens": tokens})
        except OSError as exc:
            notice(f"could not store MLP inputs in {path.parent} ({exc}); they are recorded again next time")
    n = len([k for k in t if k.startswith("eval.")])
    return ({l: t[f"calib.{l}"].float() for l in range(n)}, {l: t[f"eval.{l}"].float() for l in range(n)}, desc)


def text_trace(experts: int, top_k: int, layers: int, tokens: int = 256, seed: int = 0,
               norm_topk_prob: bool = True, log: Callable[[str], None] = print) -> RoutingTrace:
    """Trace of real text through SmolLM2 with k-means routers of the target's E and K; target
    layer l uses SmolLM2 layer l mod 30."""
    calib, evals, desc = smollm_mlp_inputs(tokens, log)
    n = len(evals)
    routers = [kmeans_router(calib[l % n], experts, seed + l) for l in range(layers)]
    router_config = RouterConfig(top_k=top_k, norm_topk_prob=norm_topk_prob)
    return record_routing([evals[l % n] for l in range(layers)], routers, router_config,
                          f"{desc}, k-means routers E={experts} k={top_k} (logit std {ROUTER_LOGIT_STD}, seed {seed})")


def default_model_trace(tokens: int = 256) -> RoutingTrace:
    """The default MoE model's real routing on the evaluation text (the model is built on first
    use): each MoE block's input on the first `tokens` evaluation tokens
    (model.perplexity.collect_mlp_inputs), routed by that block's own router."""
    from ndpmoe.model.default_moe import load_default_moe
    from ndpmoe.model.perplexity import collect_mlp_inputs
    from ndpmoe.model.text import tokenize

    moe = load_default_moe(progress=False)
    layers = sorted(moe.blocks)
    ids = tokenize(moe.text.eval, moe.tokenizer)[:tokens]
    with torch.no_grad():
        inputs = collect_mlp_inputs(moe.model, ids[None], max_rows=None, layers=layers, progress=False)
    routed = [route(inputs[l].float(), moe.blocks[l][0].router.float(), moe.blocks[l][1]) for l in layers]
    experts = moe.blocks[layers[0]][0].num_experts
    return RoutingTrace(tuple(i for i, _ in routed), tuple(w.float() for _, w in routed), experts,
                        f"default MoE model ({moe.info.get('tag', '?')}) real routers on {moe.text.source} "
                        f"({tokens} eval tokens, text {moe.text.digest})")


def synthetic_trace(experts: int, top_k: int, layers: int, tokens: int, seed: int = 0) -> RoutingTrace:
    """Fallback when no text model is installed: Gaussian activations with a slowly drifting mean
    (so consecutive tokens correlate) through Gaussian routers. Not real routing; labeled so."""
    g = torch.Generator().manual_seed(seed)
    d = 64
    drift = torch.randn(tokens, d, generator=g).cumsum(0) * 0.1
    hidden = [drift + torch.randn(tokens, d, generator=g) for _ in range(layers)]
    routers = [torch.randn(experts, d, generator=g) * (ROUTER_LOGIT_STD / d ** 0.5) for _ in range(layers)]
    return record_routing(hidden, routers, RouterConfig(top_k=top_k),
                          f"SYNTHETIC (no text model installed): drifting Gaussian activations, random routers, seed {seed}")


def trace_for(experts: int, top_k: int, layers: int, tokens: int = 256, seed: int = 0,
              default_model: bool = False, log: Callable[[str], None] = print) -> RoutingTrace:
    """The best available trace for a model shape (see the module docstring for the order).
    `default_model`: the shape is the default MoE model's own, so its real routing applies."""
    try:
        if default_model:
            real = default_model_trace(tokens)
            if real.num_experts == experts and real.top_k == top_k:
                return real
        return text_trace(experts, top_k, layers, tokens, seed, log=log)
    except (ImportError, FileNotFoundError) as exc:
        log(f"note: no text model for routing traces ({exc}); using a synthetic trace")
        return synthetic_trace(experts, top_k, layers, tokens, seed)
