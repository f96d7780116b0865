"""A pluggable MoE block for a Hugging Face decoder layer.

Every whole-model path (the MoEfied SmolLM2 default, a loaded Mixtral / Qwen / OLMoE / DeepSeek
checkpoint) replaces `model.model.layers[L].mlp` with `MoEBlock(fn)`, where fn maps the hidden states
entering the block, [T, D], to its output [T, D]. fn is the float reference (`FloatMoE`) to start
with; the quantized + compensated + Top-n block is swapped in per layer with `set_block`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .moe import MoEWeights, RouterConfig, moe_forward, route, shared_expert

BlockFn = Callable[[torch.Tensor], torch.Tensor]


class FloatMoE:
    """The float reference block as a callable: x [T, D] -> [T, D].

    masked=True evaluates every expert for every token in three large matmuls and zeroes the
    unselected ones through the routing weights: E/K times the arithmetic of gathering each
    expert's tokens (`moe_forward`), but 3 operations instead of ~8 per expert, which on a few CPU
    cores is several times faster when E/K is small (SmolLM2 default: 20/8). Same result up to fp32
    summation order. None picks masked when E/K <= 4.
    """

    def __init__(self, weights: MoEWeights, cfg: RouterConfig, masked: bool | None = None):
        if not isinstance(weights, MoEWeights):
            raise TypeError(f"weights must be MoEWeights, not {type(weights).__name__}")
        if not isinstance(cfg, RouterConfig):
            raise TypeError(f"cfg must be a RouterConfig, not {type(cfg).__name__}")
        self.weights = weights
        self.cfg = cfg
        self.masked = weights.num_experts <= 4 * cfg.top_k if masked is None else bool(masked)
        if self.masked:
            e, i, d = weights.w1.shape
            self._w1 = weights.w1.float().reshape(e * i, d)                          # [E*I, D]
            self._w3 = weights.w3.float().reshape(e * i, d)
            self._w2 = weights.w2.float().permute(1, 0, 2).reshape(d, e * i)         # [D, E*I]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.masked:
            return moe_forward(x, self.weights, self.cfg)
        w, xf = self.weights, x.float()
        ids, weights = route(xf, w.router, self.cfg)
        gate = torch.zeros(xf.shape[0], w.num_experts).scatter_(1, ids, weights)    # [T, E]
        h = F.silu(xf @ self._w1.t()) * (xf @ self._w3.t())                          # [T, E*I]
        h = (h.view(-1, w.num_experts, w.intermediate) * gate[:, :, None]).flatten(1)
        return h @ self._w2.t() + shared_expert(xf, w)


class MoEBlock(nn.Module):
    """Stands in for a decoder layer's MLP: [B, S, D] -> fn([B*S, D]) -> [B, S, D]."""

    def __init__(self, fn: BlockFn, layer: int | None = None):
        super().__init__()
        if not callable(fn):
            raise TypeError(f"fn must be callable (x [T, D] -> [T, D]), not {type(fn).__name__}")
        self.fn = fn
        self.layer = layer

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        out = self.fn(hidden.reshape(-1, shape[-1]))
        if tuple(out.shape) != (hidden.numel() // shape[-1], shape[-1]):
            raise ValueError(f"layer {self.layer}: block returned shape {tuple(out.shape)}, "
                             f"expected {(hidden.numel() // shape[-1], shape[-1])}")
        return out.reshape(shape).to(hidden.dtype)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, fn={type(self.fn).__name__}"


def set_block(model, layer: int, fn: BlockFn) -> MoEBlock:
    """Replace layer `layer`'s MLP / MoE block of a Hugging Face causal LM with MoEBlock(fn)."""
    layers = model.model.layers
    if not isinstance(layer, int) or not 0 <= layer < len(layers):
        raise ValueError(f"layer must be an integer in 0..{len(layers) - 1}, not {layer!r}")
    block = MoEBlock(fn, layer)
    layers[layer].mlp = block
    return block


def set_blocks(model, fns: dict[int, BlockFn]) -> None:
    """set_block for every {layer: fn}."""
    for layer, fn in fns.items():
        set_block(model, layer, fn)


def block_fns(model) -> dict[int, BlockFn]:
    """{layer: fn} of the layers whose MLP is an MoEBlock."""
    return {i: l.mlp.fn for i, l in enumerate(model.model.layers) if isinstance(l.mlp, MoEBlock)}
