"""The configurations of four real MoE checkpoints, as their config.json files give them, so
shape-true random checkpoints can be made and the study's cost projected without downloading one.

`real_config(name)` is the config.json dictionary; `config_object(name, ...)` builds transformers'
own config class from it, optionally narrowed (hidden, expert intermediate, experts, vocabulary,
layers) for small tests. `expert_shapes(name)` is what quantizing one MoE layer handles.
"""
from __future__ import annotations

from dataclasses import dataclass

REAL_CONFIGS: dict[str, dict] = {
    # mistralai/Mixtral-8x7B-v0.1
    "mixtral-8x7b": dict(
        model_type="mixtral", architectures=["MixtralForCausalLM"], vocab_size=32000, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768, rms_norm_eps=1e-5,
        rope_theta=1e6, sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    # allenai/OLMoE-1B-7B-0924
    "olmoe-1b-7b": dict(
        model_type="olmoe", architectures=["OlmoeForCausalLM"], vocab_size=50304, hidden_size=2048,
        intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
        num_experts=64, num_experts_per_tok=8, norm_topk_prob=False, clip_qkv=None, max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, pad_token_id=1, eos_token_id=50279),
    # deepseek-ai/DeepSeek-V2-Lite (its rope_scaling is YaRN; it changes no tensor, so it is left out)
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], vocab_size=102400, hidden_size=2048,
        intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
        num_key_value_heads=16, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
        first_k_dense_replace=1, moe_layer_freq=1, topk_method="greedy", n_group=1, topk_group=1,
        routed_scaling_factor=1.0, norm_topk_prob=False, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=100000, eos_token_id=100001),
    # Qwen/Qwen3-30B-A3B
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=151936, hidden_size=2048,
        intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_theta=1e6, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645),
}
LIKE_NAMES = tuple(REAL_CONFIGS)


def _check_name(name: str) -> dict:
    if name not in REAL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(LIKE_NAMES)}")
    return REAL_CONFIGS[name]


def _expert_key(c: dict) -> str:
    return "moe_intermediate_size" if "moe_intermediate_size" in c else "intermediate_size"


def _experts_key(c: dict) -> str:
    return next(k for k in ("num_local_experts", "num_experts", "n_routed_experts") if k in c)


@dataclass(frozen=True)
class ExpertShapes:
    """What one checkpoint's expert matrices are: per MoE layer `experts` experts, each with
    w1, w3 [intermediate, hidden] and w2 [hidden, intermediate]."""
    name: str
    moe_layers: int
    experts: int
    top_k: int
    hidden: int
    intermediate: int

    @property
    def matrices(self) -> int:
        return 3 * self.experts * self.moe_layers


def expert_shapes(name: str) -> ExpertShapes:
    c = _check_name(name)
    dense = c.get("first_k_dense_replace", 0) + len(c.get("mlp_only_layers", []))
    return ExpertShapes(name, c["num_hidden_layers"] - dense, c[_experts_key(c)], c["num_experts_per_tok"],
                        c["hidden_size"], c[_expert_key(c)])


def narrowed_config(name: str, layers: int | None = None, hidden: int | None = None,
                    intermediate: int | None = None, experts: int | None = None, vocab: int | None = None) -> dict:
    """The config.json dictionary, with the given sizes replaced (None: the real one). A narrower
    hidden has proportionally fewer heads (at least one KV head, the family's query heads per KV
    head kept); dense MLPs shrink in proportion to the experts."""
    c = dict(_check_name(name))
    for label, v in (("layers", layers), ("hidden", hidden), ("intermediate", intermediate),
                     ("experts", experts), ("vocab", vocab)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ValueError(f"{label} must be a positive integer, not {v!r}")
    if layers is not None:
        c["num_hidden_layers"] = layers
    if vocab is not None:
        c["vocab_size"] = vocab
        # special-token ids past the new vocabulary point at the byte tokenizer's <s> and </s>
        for key, byte_id in (("bos_token_id", 256), ("eos_token_id", 257), ("pad_token_id", None)):
            if isinstance(c.get(key), int) and c[key] >= vocab:
                c[key] = byte_id
    if experts is not None:
        if experts <= c["num_experts_per_tok"]:
            raise ValueError(f"experts must exceed top-k = {c['num_experts_per_tok']} of {name}, not {experts}")
        c[_experts_key(c)] = experts
    if intermediate is not None:
        key = _expert_key(c)
        if key == "moe_intermediate_size":
            c["intermediate_size"] = max(1, round(c["intermediate_size"] * intermediate / c[key]))
        c[key] = intermediate
    if hidden is not None:
        # Fewer KV heads in proportion, the family's query heads per KV head kept.
        heads, kv, old = c["num_attention_heads"], c["num_key_value_heads"], c["hidden_size"]
        new_kv = max(1, kv * hidden // old)
        new_heads = new_kv * (heads // kv)
        if c["model_type"] != "deepseek_v2" and "head_dim" not in c:     # head width = hidden / heads
            if hidden % new_heads or (hidden // new_heads) % 2:
                raise ValueError(f"hidden {hidden} must be an even multiple of the {new_heads} heads "
                                 f"{name} keeps at that width")
        c.update(hidden_size=hidden, num_attention_heads=new_heads, num_key_value_heads=new_kv)
    return c


def config_object(name: str, **sizes):
    """transformers' config class of the family, from the (narrowed) config.json dictionary."""
    from transformers import AutoConfig

    c = narrowed_config(name, **sizes)
    args = {k: v for k, v in c.items() if k not in ("model_type", "rope_theta")}
    cfg = AutoConfig.for_model(c["model_type"], **args)
    if "rope_theta" in c:           # transformers 5 keeps it inside rope_parameters
        rope = dict(getattr(cfg, "rope_parameters", None) or {"rope_type": "default"})
        rope["rope_theta"] = c["rope_theta"]
        cfg.rope_parameters = rope
    return cfg
