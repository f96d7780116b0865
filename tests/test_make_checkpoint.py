"""`ndpmoe make-checkpoint`: the tensor names and shapes transformers itself writes for each
family, sharded with an index the loaders accept, and `eval` runs on the result."""
import json
import os
import shutil

import pytest
import torch

from ndpmoe.host.cli import main
from ndpmoe.model.checkpoint import INDEX_NAME, Checkpoint, load_model, load_tokenizer
from ndpmoe.model.make_checkpoint import checkpoint_bytes, disk_layout, make_checkpoint
from ndpmoe.model.real_configs import LIKE_NAMES, config_object, expert_shapes

TINY = dict(hidden=64, intermediate=64, experts=10, vocab=512)


def _transformers_layout(cfg, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    folder = tmp_path / "hf"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    out = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with safe_open(str(folder / name), "pt") as f:
                out.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return out


@pytest.mark.parametrize("like", LIKE_NAMES)
def test_layout_is_what_transformers_writes_and_loaders_read_it(like, tmp_path, one_thread):
    cfg = config_object(like, layers=2, **TINY)
    assert dict(disk_layout(cfg)) == _transformers_layout(cfg, tmp_path)
    out = tmp_path / "ckpt"
    info = make_checkpoint(like, out, layers=2, shard_bytes=200_000, log=lambda *_: None, **TINY)
    assert info["shards"] >= 2                              # sharded, with an index
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == info["bytes"] == checkpoint_bytes(disk_layout(cfg), torch.bfloat16)
    ck = Checkpoint(out)
    assert ck.model_type == cfg.model_type and ck.num_experts == 10 and ck.expert_intermediate == 64
    layer = ck.moe_layers[-1]
    w, rc = ck.moe_layer(layer)
    assert tuple(w.w1.shape) == (10, 64, 64) and tuple(w.w2.shape) == (10, 64, 64)
    assert rc.top_k == cfg.num_experts_per_tok
    assert float(w.w1.std()) == pytest.approx(0.02, rel=0.1)    # random, not zeros


def test_full_size_layout_is_shape_true():
    # Meta device: the real sizes are laid out without allocating them.
    for like in LIKE_NAMES:
        s = expert_shapes(like)
        layout = dict(disk_layout(config_object(like, layers=2)))
        experts = {k: v for k, v in layout.items() if ".experts.0." in k and ".layers.1." in k}
        assert sorted(experts.values()) == sorted([(s.intermediate, s.hidden)] * 2 + [(s.hidden, s.intermediate)]), like
    mixtral = disk_layout(config_object("mixtral-8x7b", layers=1))
    assert ("model.layers.0.block_sparse_moe.experts.7.w1.weight", (14336, 4096)) in mixtral
    # One Mixtral layer: 8 experts x 3 x 4096 x 14336 bf16 weights plus attention, embeddings, head.
    assert checkpoint_bytes(mixtral, torch.bfloat16) > 8 * 3 * 4096 * 14336 * 2


def test_eval_runs_on_a_made_checkpoint(tmp_path, one_thread):
    out = tmp_path / "olmoe"
    assert main(["make-checkpoint", "--like", "olmoe-1b-7b", "--layers", "1", "--out", str(out),
                 "--hidden", "64", "--intermediate", "64", "--experts", "10", "--vocab", "512"]) == 0
    model, _ = load_model(out)
    tok = load_tokenizer(out)
    ids = torch.tensor([tok("a test", add_special_tokens=False)["input_ids"]])
    assert model(ids).logits.shape == (1, ids.shape[1], 512)
    res = tmp_path / "res"
    assert main(["eval", "--model", str(out), "--bits", "3", "--quantizers", "rtn", "--rank", "4", "--topn", "1",
                 "--hi-bits", "0", "--no-compare", "--eval-tokens", "256", "--calib-tokens", "256", "--seq-len", "128",
                 "--budgets", "", "--out", str(res), "--quiet"]) == 0
    rows = json.loads((res / "study.json").read_text())["rows"]
    assert {r["name"] for r in rows} >= {"fp16", "uniform int3 rtn"}


def test_bad_input_fails_before_writing(tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep")
    with pytest.raises(ValueError, match="not an empty folder"):
        make_checkpoint("olmoe-1b-7b", busy, layers=1, **TINY)
    assert os.listdir(busy) == ["x"]
    with pytest.raises(ValueError, match="unknown model 'gpt-4'"):
        make_checkpoint("gpt-4", tmp_path / "a", layers=1)
    with pytest.raises(ValueError, match="experts must exceed top-k = 8"):
        make_checkpoint("olmoe-1b-7b", tmp_path / "b", layers=1, hidden=64, intermediate=64, experts=8, vocab=512)
    with pytest.raises(ValueError, match="too small for the byte tokenizer"):
        make_checkpoint("olmoe-1b-7b", tmp_path / "c", layers=1, hidden=64, intermediate=64, experts=10, vocab=100)
    with pytest.raises(ValueError, match="layers must be a positive integer"):
        make_checkpoint("olmoe-1b-7b", tmp_path / "d", layers=0)
    assert main(["make-checkpoint", "--like", "olmoe-1b-7b", "--layers", "1", "--out", str(busy)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    # Nothing half written: no folder, and no temporary beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


def test_a_checkpoint_larger_than_the_disk_is_refused(tmp_path):
    need = checkpoint_bytes(disk_layout(config_object("mixtral-8x7b", layers=32)), torch.bfloat16)
    if shutil.disk_usage(tmp_path).free > need:
        pytest.skip("this disk could hold a whole Mixtral-8x7B")
    with pytest.raises(ValueError, match=r"needs 9\d\.\d\d GB but .* GB free"):
        make_checkpoint("mixtral-8x7b", tmp_path / "big", layers=32)
    assert list(tmp_path.iterdir()) == []
