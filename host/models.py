"""Shapes of the MoE models the runtime and the performance model know by name.

Legend: L layers (MoE layers), E routed experts, K top-k, D hidden, I expert intermediate,
S shared-expert intermediate (always resident on the GPU).
Figures are from each model's Hugging Face config.json.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """One MoE model's shape, as far as moving and computing its experts is concerned."""
    name: str
    layers: int                     # decoder layers
    experts: int                    # routed experts per MoE layer
    top_k: int
    hidden: int                     # D
    intermediate: int               # I of one routed expert
    shared_intermediate: int = 0    # S, summed over shared experts (0: none)
    dense_layers: int = 0           # leading layers with a dense MLP instead of an MoE block
    dense_intermediate: int = 0     # their MLP intermediate
    attention_params: int = 0       # per layer, resident on the GPU

    def __post_init__(self):
        for name in ("layers", "experts", "top_k", "hidden", "intermediate"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, not {v!r}")
        if self.top_k >= self.experts:
            raise ValueError(f"top_k {self.top_k} must be below the expert count {self.experts}")

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers

    @property
    def resident_params_per_layer(self) -> float:
        """Parameters every token reads from GPU memory per layer besides its routed experts:
        attention, router and shared experts (dense-MLP layers averaged over all layers)."""
        shared = 3 * self.hidden * self.shared_intermediate
        dense = 3 * self.hidden * self.dense_intermediate * self.dense_layers / self.layers
        return self.attention_params + self.experts * self.hidden + shared + dense


MODELS = {m.name: m for m in (
    # Mixtral-8x7B: GQA with 8 KV heads of 128 (q, o: D x D; k, v: D x 1024).
    ModelSpec("mixtral-8x7b", layers=32, experts=8, top_k=2, hidden=4096, intermediate=14336,
              attention_params=2 * 4096 * 4096 + 2 * 4096 * 1024),
    # Qwen1.5-MoE-A2.7B: 60 routed experts of 1408, one shared expert of 5632, MHA.
    ModelSpec("qwen1.5-moe-a2.7b", layers=24, experts=60, top_k=4, hidden=2048, intermediate=1408,
              shared_intermediate=5632, attention_params=4 * 2048 * 2048),
    # DeepSeek-V2-Lite: 64 routed + 2 shared experts of 1408, first layer dense (10944), MLA
    # attention (q 2048x3072, kv_a 2048x576, kv_b 512x4096, o 2048x2048).
    ModelSpec("deepseek-v2-lite", layers=27, experts=64, top_k=6, hidden=2048, intermediate=1408,
              shared_intermediate=2 * 1408, dense_layers=1, dense_intermediate=10944,
              attention_params=2048 * 3072 + 2048 * 576 + 512 * 4096 + 2048 * 2048),
    # OLMoE-1B-7B: 64 experts of 1024, top-8, MHA.
    ModelSpec("olmoe-1b-7b", layers=16, experts=64, top_k=8, hidden=2048, intermediate=1024,
              attention_params=4 * 2048 * 2048),
)}


# SmolLM2-135M attention: D 576, 9 query heads and 3 KV heads of 64 (q, o: D x D; k, v: D x 192).
_SMOLLM2_ATTENTION = 2 * 576 * 576 + 2 * 576 * 192


def default_model_spec() -> ModelSpec:
    """The offline default model (SmolLM2-135M MoEfied, model/default_moe.py), shaped by its
    current configuration; ValueError while that model does not exist yet."""
    try:
        from ndpmoe.model.default_moe import DEFAULT_CONFIG
    except ImportError as exc:
        raise ValueError(f"model 'default' is not available yet ({exc})") from None
    c = DEFAULT_CONFIG
    return ModelSpec("default", layers=30, experts=c.num_experts, top_k=c.top_k, hidden=576,
                     intermediate=c.expert_size, shared_intermediate=c.shared_size,
                     attention_params=_SMOLLM2_ATTENTION)


def get_model(name: str) -> ModelSpec:
    if name == "default":
        return default_model_spec()
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS) + ['default']}") from None
