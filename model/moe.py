"""Float reference of an MoE layer (golden model, layer 1).

Legend: T tokens, D hidden, E experts, I expert intermediate, K top-k, S shared intermediate.
Experts are stacked tensors indexed by expert id, as in gpt-fast, not modules in a loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RouterConfig:
    """How a family turns router logits into top-k weights."""
    top_k: int
    # Mixtral renormalizes the top-k softmax weights; OLMoE / Qwen-MoE expose it as a flag.
    norm_topk_prob: bool = True
    # "softmax" over all experts then top-k (Mixtral, Qwen, OLMoE, DeepSeek-V2);
    # "sigmoid" per expert (DeepSeek-V3).
    scoring: str = "softmax"
    # DeepSeek multiplies the final top-k weights by this (V2 full: 16, V3: 2.5); also lets a
    # MoEfied dense MLP sum its selected experts with weight ~1 each.
    routed_scaling_factor: float = 1.0
    # Group-limited routing (DeepSeek): experts split into n_group equal groups, only the best
    # topk_group groups are eligible. A group scores its best expert (softmax, V2) or the sum of its
    # best two (sigmoid, V3), as transformers does.
    n_group: int = 1
    topk_group: int = 1
    # DeepSeek-V3's e_score_correction_bias [E]: added to the scores to choose experts, not to weigh them.
    score_bias: tuple[float, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be a positive integer, not {self.top_k!r}")
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring must be 'softmax' or 'sigmoid', not {self.scoring!r}")
        if not isinstance(self.n_group, int) or self.n_group < 1:
            raise ValueError(f"n_group must be a positive integer, not {self.n_group!r}")
        if not isinstance(self.topk_group, int) or not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group must be an integer in 1..n_group={self.n_group}, not {self.topk_group!r}")


@dataclass
class MoEWeights:
    """One MoE block's float weights.

    router [E, D]; w1 (gate) [E, I, D]; w3 (up) [E, I, D]; w2 (down) [E, D, I].
    Optional shared expert (Qwen2-MoE, DeepSeek): shared_w1/w3 [S, D], shared_w2 [D, S] and
    an optional sigmoid gate shared_gate [1, D] (Qwen2-MoE).
    """
    router: torch.Tensor
    w1: torch.Tensor
    w3: torch.Tensor
    w2: torch.Tensor
    shared_w1: torch.Tensor | None = None
    shared_w3: torch.Tensor | None = None
    shared_w2: torch.Tensor | None = None
    shared_gate: torch.Tensor | None = None

    def __post_init__(self):
        E, I, D = self.w1.shape
        expect = {"router": (E, D), "w3": (E, I, D), "w2": (E, D, I)}
        for name, shape in expect.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"{name} has shape {got}, expected {shape} (from w1 {tuple(self.w1.shape)})")

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    @property
    def hidden(self) -> int:
        return self.w1.shape[2]

    @property
    def intermediate(self) -> int:
        return self.w1.shape[1]


def route(x: torch.Tensor, router: torch.Tensor, cfg: RouterConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Router: x [T, D] -> (ids [T, K] long, weights [T, K] float), sorted by weight, descending."""
    logits = x.float() @ router.float().t()                       # [T, E]
    if cfg.scoring == "softmax":
        probs = torch.softmax(logits, dim=-1)
    else:
        probs = torch.sigmoid(logits)
    if cfg.score_bias is None and cfg.n_group == 1:
        weights, ids = torch.topk(probs, cfg.top_k, dim=-1)      # sorted descending
    else:
        ids = _choose(probs, cfg)
        weights = probs.gather(1, ids)
        weights, order = weights.sort(dim=-1, descending=True)
        ids = ids.gather(1, order)
    if cfg.norm_topk_prob:
        # the epsilon is DeepSeek-V3's; the others' weights are softmax outputs and never sum to 0
        weights = weights / (weights.sum(dim=-1, keepdim=True) + (1e-20 if cfg.scoring == "sigmoid" else 0.0))
    if cfg.routed_scaling_factor != 1.0:
        weights = weights * cfg.routed_scaling_factor
    return ids, weights


def _choose(probs: torch.Tensor, cfg: RouterConfig) -> torch.Tensor:
    """Expert ids [T, K] under a selection bias and / or group-limited routing (DeepSeek)."""
    t, e = probs.shape
    score = probs
    if cfg.score_bias is not None:
        if len(cfg.score_bias) != e:
            raise ValueError(f"score_bias has {len(cfg.score_bias)} entries, expected one per expert ({e})")
        score = probs + torch.tensor(cfg.score_bias, dtype=probs.dtype)
    if cfg.n_group > 1:
        if e % cfg.n_group:
            raise ValueError(f"{e} experts do not split into n_group={cfg.n_group} equal groups")
        grouped = score.view(t, cfg.n_group, e // cfg.n_group)
        group_score = grouped.max(-1).values if cfg.scoring == "softmax" else grouped.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_score).scatter_(1, group_score.topk(cfg.topk_group, dim=-1).indices, 1.0)
        keep = keep.bool().repeat_interleave(e // cfg.n_group, dim=1)
        score = score.masked_fill(~keep, float("-inf"))
    return score.topk(cfg.top_k, dim=-1).indices


def expert_mlp(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """SwiGLU expert: x [T, D], w1/w3 [I, D], w2 [D, I] -> [T, D]."""
    return (F.silu(x @ w1.t()) * (x @ w3.t())) @ w2.t()


def shared_expert(x: torch.Tensor, w: MoEWeights) -> torch.Tensor:
    if w.shared_w1 is None:
        return torch.zeros_like(x)
    y = expert_mlp(x, w.shared_w1, w.shared_w3, w.shared_w2)
    if w.shared_gate is not None:
        y = torch.sigmoid(x @ w.shared_gate.t()) * y
    return y


def combine(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, expert_fn) -> torch.Tensor:
    """Weighted sum of expert outputs; expert_fn(e, x_rows, slot_mask) -> [rows, D].

    Loops over experts that were selected (at most E), gathering their tokens, so the cost is
    proportional to T*K, not T*E.
    """
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
    for e in torch.unique(ids).tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        y = expert_fn(e, x[tok], tok, slot)
        out.index_add_(0, tok, y.float() * weights[tok, slot, None].float())
    return out


def moe_forward(x: torch.Tensor, w: MoEWeights, cfg: RouterConfig) -> torch.Tensor:
    """Float MoE block: x [T, D] -> [T, D]."""
    ids, weights = route(x, w.router, cfg)
    xf = x.float()
    out = combine(xf, ids, weights, lambda e, xs, tok, slot: expert_mlp(xs, w.w1[e].float(), w.w3[e].float(), w.w2[e].float()))
    return out + shared_expert(xf, w)
