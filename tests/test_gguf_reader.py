"""GGUF MoE reader on tiny files written with the gguf package's own writer."""
import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from ndpmoe.model.gguf_reader import GGUFCheckpoint  # noqa: E402
from ndpmoe.model.moe import RouterConfig  # noqa: E402

D, E, I, S, K, LAYERS = 64, 4, 32, 64, 2, 3


def _write(path, arch="qwen2moe", quant=None, drop=None, leading_dense=0, extra=None, meta_i=I):
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_embedding_length(D)
    w.add_expert_count(E)
    w.add_expert_used_count(K)
    w.add_expert_feed_forward_length(meta_i)
    if arch == "deepseek2":
        w.add_leading_dense_block_count(leading_dense)
        w.add_expert_shared_count(S // I)
        w.add_expert_weights_scale(2.5)
        w.add_expert_weights_norm(True)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    else:
        w.add_expert_shared_feed_forward_length(S)
    for key, value in (extra or {}).items():
        w.add_uint32(key, value)
    src = {}
    for l in range(leading_dense, LAYERS):
        b = f"blk.{l}."
        shapes = {"ffn_gate_inp.weight": (E, D), "ffn_gate_exps.weight": (E, I, D), "ffn_up_exps.weight": (E, I, D),
                  "ffn_down_exps.weight": (E, D, I), "ffn_gate_shexp.weight": (S, D), "ffn_up_shexp.weight": (S, D),
                  "ffn_down_shexp.weight": (D, S)}
        if arch == "qwen2moe":
            shapes["ffn_gate_inp_shexp.weight"] = (D,)
        if arch == "deepseek2":
            shapes["exp_probs_b.bias"] = (E,)
        for name, shape in shapes.items():
            if b + name == drop:
                continue
            a = rng.standard_normal(shape).astype(np.float32) * 0.1
            if quant and name.endswith("exps.weight"):
                q = gguf.quants.quantize(a, quant)
                w.add_tensor(b + name, q, raw_dtype=quant)
                a = gguf.quants.dequantize(q, quant)
            else:
                w.add_tensor(b + name, a)
            src[b + name] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return src


def test_qwen2moe_layers_match_what_was_written(tmp_path):
    path = tmp_path / "tiny.gguf"
    src = _write(path, quant=gguf.GGMLQuantizationType.Q8_0)
    ck = GGUFCheckpoint(path)
    assert ck.moe_layers == [0, 1, 2] and ck.shared_intermediate == S
    w, cfg = ck.moe_layer(1)
    assert cfg == RouterConfig(top_k=K, norm_topk_prob=False)
    assert torch.equal(w.w1, src["blk.1.ffn_gate_exps.weight"])          # the Q8_0 values, dequantized
    assert torch.equal(w.w2, src["blk.1.ffn_down_exps.weight"]) and w.w2.shape == (E, D, I)
    assert torch.equal(w.shared_gate, src["blk.1.ffn_gate_inp_shexp.weight"].reshape(1, D))


def test_deepseek2_routing_and_dense_first_layer(tmp_path):
    path = tmp_path / "ds.gguf"
    src = _write(path, arch="deepseek2", leading_dense=1,
                 extra={"deepseek2.expert_group_count": 2, "deepseek2.expert_group_used_count": 1})
    ck = GGUFCheckpoint(path)
    assert ck.moe_layers == [1, 2]
    w, cfg = ck.moe_layer(2)
    assert (cfg.scoring, cfg.norm_topk_prob, cfg.routed_scaling_factor, cfg.n_group, cfg.topk_group) == \
        ("sigmoid", True, 2.5, 2, 1)
    np.testing.assert_allclose(cfg.score_bias, src["blk.2.exp_probs_b.bias"].tolist(), rtol=1e-6)
    assert w.shared_w1.shape == (S, D) and w.shared_gate is None


def test_bad_files_are_refused(tmp_path):
    path = tmp_path / "cut.gguf"
    _write(path)
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    with pytest.raises(ValueError, match=r"cut\.gguf: truncated: tensor 'blk\.2\.ffn_\w+\.weight' ends at byte"):
        GGUFCheckpoint(path)
    missing = tmp_path / "missing.gguf"
    _write(missing, drop="blk.1.ffn_up_exps.weight")
    with pytest.raises(ValueError, match=r"missing\.gguf: tensor 'blk\.1\.ffn_up_exps\.weight' is missing"):
        GGUFCheckpoint(missing)
    wrong = tmp_path / "wrong.gguf"
    _write(wrong, meta_i=48)
    with pytest.raises(ValueError, match=r"wrong\.gguf: tensor 'blk\.0\.ffn_gate_exps\.weight' has shape \[4, 32, 64\], "
                                         r"the metadata implies \[4, 48, 64\]"):
        GGUFCheckpoint(wrong)
    dense = gguf.GGUFWriter(str(tmp_path / "dense.gguf"), "llama")
    dense.add_block_count(1)
    dense.write_header_to_file()
    dense.write_kv_data_to_file()
    dense.write_tensors_to_file()
    dense.close()
    with pytest.raises(ValueError, match="expert_count is missing or 0: not an MoE model"):
        GGUFCheckpoint(tmp_path / "dense.gguf")


def _write_whole_qwen2moe(path):
    """A whole tiny Qwen2-MoE model in llama.cpp's tensor names (attention, norms, embeddings too)."""
    d, heads, kv_heads, vocab = D, 4, 2, 96
    rng = np.random.default_rng(1)
    w = gguf.GGUFWriter(str(path), "qwen2moe")
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(I)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(E)
    w.add_expert_used_count(K)
    w.add_expert_feed_forward_length(I)
    w.add_expert_shared_feed_forward_length(S)
    w.add_vocab_size(vocab)
    kv = kv_heads * d // heads
    shapes = {"token_embd.weight": (vocab, d), "output_norm.weight": (d,), "output.weight": (vocab, d)}
    for l in range(LAYERS):
        b = f"blk.{l}."
        shapes.update({b + "attn_norm.weight": (d,), b + "attn_q.weight": (d, d), b + "attn_q.bias": (d,),
                       b + "attn_k.weight": (kv, d), b + "attn_k.bias": (kv,), b + "attn_v.weight": (kv, d),
                       b + "attn_v.bias": (kv,), b + "attn_output.weight": (d, d), b + "ffn_norm.weight": (d,),
                       b + "ffn_gate_inp.weight": (E, d), b + "ffn_gate_exps.weight": (E, I, d),
                       b + "ffn_up_exps.weight": (E, I, d), b + "ffn_down_exps.weight": (E, d, I),
                       b + "ffn_gate_inp_shexp.weight": (d,), b + "ffn_gate_shexp.weight": (S, d),
                       b + "ffn_up_shexp.weight": (S, d), b + "ffn_down_shexp.weight": (d, S)})
    for name, shape in shapes.items():
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_whole_gguf_model_runs_our_block_and_matches_transformers(tmp_path):
    """transformers loads the rest of a Qwen2-MoE GGUF (with the MoE sizes it does not read from the
    file set from our reader); our float block reproduces its own MoE block, and the whole model's
    logits are unchanged when every block is ours."""
    from ndpmoe.model.checkpoint import load_model
    from ndpmoe.model.moe import moe_forward

    path = tmp_path / "tiny-qwen2moe.gguf"
    _write_whole_qwen2moe(path)
    theirs, _ = load_model(path, float_blocks=False)
    ours, ck = load_model(path)
    assert type(theirs.model.layers[1].mlp).__name__ == "Qwen2MoeSparseMoeBlock"
    assert type(ours.model.layers[1].mlp).__name__ == "MoEBlock"
    x = torch.randn(10, D, generator=torch.Generator().manual_seed(2))
    w, cfg = ck.moe_layer(1)
    ref = theirs.model.layers[1].mlp(x[None])
    ref = ref[0] if isinstance(ref, tuple) else ref
    assert torch.allclose(moe_forward(x, w, cfg), ref[0], atol=1e-6)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-5)


def test_whole_gguf_model_of_an_architecture_transformers_cannot_load(tmp_path):
    from ndpmoe.model.checkpoint import load_model

    path = tmp_path / "ds.gguf"
    _write(path, arch="deepseek2", leading_dense=1)
    with pytest.raises(ValueError, match=r"cannot load a whole 'deepseek2' model from GGUF"):
        load_model(path)
