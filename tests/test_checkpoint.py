"""Checkpoint loaders on tiny random checkpoints that transformers writes offline, one per family."""
import json
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

from ndpmoe.model.block import FloatMoE, MoEBlock, set_block  # noqa: E402
from ndpmoe.model.checkpoint import Checkpoint, load_model, read_header  # noqa: E402

D, E, I, K = 64, 4, 32, 2
COMMON = dict(vocab_size=96, hidden_size=D, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
              max_position_embeddings=64, tie_word_embeddings=False, eos_token_id=1, bos_token_id=0, pad_token_id=0)
MLA = dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)


def _configs():
    t = transformers
    return {
        "mixtral": (t.MixtralConfig(intermediate_size=I, num_local_experts=E, num_experts_per_tok=K, **COMMON),
                    t.MixtralForCausalLM),
        "qwen2_moe": (t.Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=I, shared_expert_intermediate_size=40,
                                       num_experts=E, num_experts_per_tok=K, norm_topk_prob=False, **COMMON),
                      t.Qwen2MoeForCausalLM),
        "qwen3_moe": (t.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K,
                                       norm_topk_prob=True, head_dim=16, mlp_only_layers=[1], **COMMON),
                      t.Qwen3MoeForCausalLM),
        "olmoe": (t.OlmoeConfig(intermediate_size=I, num_experts=E, num_experts_per_tok=K, **COMMON), t.OlmoeForCausalLM),
        "deepseek_v2": (t.DeepseekV2Config(intermediate_size=48, moe_intermediate_size=I, n_routed_experts=E,
                                           n_shared_experts=2, num_experts_per_tok=K, first_k_dense_replace=1,
                                           routed_scaling_factor=1.5, **MLA, **COMMON), t.DeepseekV2ForCausalLM),
        "deepseek_v3": (t.DeepseekV3Config(intermediate_size=48, moe_intermediate_size=I, n_routed_experts=E,
                                           n_shared_experts=1, num_experts_per_tok=K, first_k_dense_replace=1,
                                           n_group=2, topk_group=1, **MLA, **COMMON), t.DeepseekV3ForCausalLM),
    }


FAMILIES = list(_configs())


pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py


def _write(folder, family, shard_size=None):
    cfg, cls = _configs()[family]
    torch.manual_seed(0)
    model = cls(cfg)
    with torch.no_grad():
        # Zero-initialized routers would tie every expert; random ones make routing matter.
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if p.is_floating_point() and ("gate" in name or "experts" in name or "bias" in name):
                p.normal_(0, 0.3)
    kw = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(folder, **kw)
    return folder


# Every family sharded; two also as a single file (the error tests use those too).
CASES = [(f, True) for f in FAMILIES] + [("mixtral", False), ("deepseek_v2", False)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{(family, sharded): folder}, written once per test module."""
    out = {}
    for family, sharded in CASES:
        folder = tmp_path_factory.mktemp(f"{family}_{'sharded' if sharded else 'single'}")
        out[family, sharded] = _write(folder, family, "60KB" if sharded else None)
    return out


@pytest.mark.parametrize("family,sharded", CASES, ids=[f"{f}-{'sharded' if s else 'single'}" for f, s in CASES])
def test_our_blocks_reproduce_the_original(tiny, family, sharded):
    folder = tiny[family, sharded]
    assert (folder / "model.safetensors.index.json").is_file() == sharded
    model, ckpt = load_model(folder, float_blocks=False)
    assert ckpt.model_type == family
    expect_moe = {"deepseek_v2": [1, 2], "deepseek_v3": [1, 2], "qwen3_moe": [0, 2]}.get(family, [0, 1, 2])
    assert ckpt.moe_layers == expect_moe
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (2, 12), generator=gen)
    with torch.no_grad():
        ref_logits = model(ids).logits
    for layer, w, cfg in ckpt.iter_moe_layers():
        x = torch.randn(2, 9, D, generator=gen)
        with torch.no_grad():
            ref = model.model.layers[layer].mlp(x)
        got = FloatMoE(w, cfg)(x.reshape(-1, D)).reshape(ref.shape)
        # fp32 rounding: the same products summed in another order (FloatMoE gates before the down
        # projection, transformers after; sorted vs unsorted top-k slots): 1e-5 of the output scale
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        assert ref.abs().max() > 1e-3          # not a comparison between two zeros
        set_block(model, layer, FloatMoE(w, cfg))
    # the whole model with every MoE block replaced by ours gives the same logits
    assert all(isinstance(model.model.layers[l].mlp, MoEBlock) for l in ckpt.moe_layers)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref_logits, rtol=1e-5, atol=1e-5)


def test_load_model_swaps_in_our_blocks(tiny):
    model, ckpt = load_model(tiny["deepseek_v2", False])
    assert [type(l.mlp).__name__ for l in model.model.layers] == ["DeepseekV2MLP", "MoEBlock", "MoEBlock"]


def test_reads_one_layer_at_a_time(tiny):
    ckpt = Checkpoint(tiny["mixtral", True])
    w, cfg = ckpt.moe_layer(2)
    assert (w.num_experts, w.intermediate, w.hidden) == (E, I, D) and cfg.top_k == K and cfg.norm_topk_prob
    with pytest.raises(ValueError, match="layer 7 is not an MoE layer"):
        ckpt.moe_layer(7)


def _shards(folder):
    return sorted(p for p in folder.iterdir() if p.suffix == ".safetensors")


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_truncated_shard_is_refused(tiny, tmp_path):
    folder = _copy(tiny["qwen2_moe", True], tmp_path / "ckpt")
    victim = _shards(folder)[-1]
    assert read_header(victim)                                         # whole before the cut
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated") as err:
        Checkpoint(folder)
    assert victim.name in str(err.value) and "tensor '" in str(err.value)


def test_missing_shard_is_refused(tiny, tmp_path):
    folder = _copy(tiny["olmoe", True], tmp_path / "ckpt")
    victim = _shards(folder)[0]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name) as err:
        Checkpoint(folder)
    assert "maps tensor '" in str(err.value)


def test_wrong_shape_is_refused(tiny, tmp_path):
    folder = _copy(tiny["deepseek_v2", False], tmp_path / "ckpt")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["moe_intermediate_size"] = I * 2
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.1\.mlp\.experts\.0\.gate_proj\.weight' "
                                         r"has shape \[32, 64\], config\.json implies \[64, 64\]"):
        Checkpoint(folder)


def test_missing_tensor_is_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file
    folder = _copy(tiny["mixtral", False], tmp_path / "ckpt")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.1\.block_sparse_moe\.experts\.3\.w2\.weight' is missing"):
        Checkpoint(folder)


def test_unknown_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"config\.json: unknown architecture model_type='llama'"):
        Checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a Hugging Face checkpoint folder"):
        Checkpoint(tmp_path / "nowhere")
