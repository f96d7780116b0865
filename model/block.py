"""A pluggable MoE block for a Hugging Face decoder layer.

Every whole-model path (the MoEfied SmolLM2 default, a loaded Mixtral / Qwen / OLMoE / DeepSeek
checkpoint) replaces `model.model.layers[L].mlp` with `MoEBlock(fn)`, where fn maps the hidden states
entering the block, [T, D], to its output [T, D]. fn is the float reference (`FloatMoE`) to start
with; the quantized + compensated + Top-n block is swapped in per layer with `set_block`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .moe import MoEWeights, RouterConfig, moe_forward

BlockFn = Callable[[torch.Tensor], torch.Tensor]


class FloatMoE:
    """The float reference block as a callable: x [T, D] -> [T, D]."""

    def __init__(self, weights: MoEWeights, cfg: RouterConfig):
        if not isinstance(weights, MoEWeights):
            raise TypeError(f"weights must be MoEWeights, not {type(weights).__name__}")
        if not isinstance(cfg, RouterConfig):
            raise TypeError(f"cfg must be a RouterConfig, not {type(cfg).__name__}")
        self.weights = weights
        self.cfg = cfg

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return moe_forward(x, self.weights, self.cfg)


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
