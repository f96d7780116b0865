"""Lazy reader for MoE checkpoints in llama.cpp's GGUF format (one file, memory-mapped).

Experts are stored fused per layer, as llama.cpp writes them today:
  blk.L.ffn_gate_inp.weight [E, D] router; blk.L.ffn_{gate,up}_exps.weight [E, I, D];
  blk.L.ffn_down_exps.weight [E, D, I]; shared expert blk.L.ffn_{gate,up,down}_shexp.weight;
  Qwen2-MoE's shared gate blk.L.ffn_gate_inp_shexp.weight; DeepSeek-V3's blk.L.exp_probs_b.bias.
Architectures: llama (Mixtral), qwen2moe, qwen3moe, olmoe, deepseek2 (V2 and V3). Quantized
tensors (Q4_1, Q8_0, ...) are dequantized with the `gguf` package when a layer is read.
(Old Mixtral GGUFs with one tensor per expert, blk.L.ffn_gate.E.weight, are not read.)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .moe import MoEWeights, RouterConfig

ARCHS = ("llama", "qwen2moe", "qwen3moe", "olmoe", "deepseek2")
# What transformers does when the file does not say (llama.cpp's own defaults per architecture).
_NORM_DEFAULT = {"llama": True, "qwen2moe": False, "qwen3moe": True, "olmoe": False, "deepseek2": False}


def _reader(path: Path):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

    class CheckedReader(GGUFReader):
        # Name the tensor that runs past the end of a truncated file (the stock reader fails on a
        # reshape with no file or tensor name).
        def _build_tensors(self, start_offs, fields):
            size = len(self.data)
            for field in fields:
                _n, name, _nd, dims, raw_type, offset = field.parts
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type[0])]
                end = int(start_offs + offset[0]) + int(np.prod(dims)) * type_size // block
                if end > size:
                    raise ValueError(f"{path}: truncated: tensor {bytes(name).decode()!r} ends at byte {end}, "
                                     f"the file has {size} bytes")
            super()._build_tensors(start_offs, fields)

    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    try:
        return CheckedReader(path)
    except ValueError as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: unreadable GGUF ({e})") from None
    except (IndexError, KeyError, UnicodeDecodeError, OverflowError) as e:
        raise ValueError(f"{path}: unreadable or truncated GGUF header ({type(e).__name__}: {e})") from None


class GGUFCheckpoint:
    """A GGUF MoE checkpoint, read one layer at a time into MoEWeights + RouterConfig."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.reader = _reader(self.path)
        self.arch = self._field("general.architecture")
        if self.arch not in ARCHS:
            raise ValueError(f"{self.path}: unknown architecture general.architecture={self.arch!r}; "
                             f"supported: {', '.join(ARCHS)}")
        self.tensors = {t.name: t for t in self.reader.tensors}
        if self._meta("expert_count", 0) < 1:
            raise ValueError(f"{self.path}: {self.arch}.expert_count is missing or 0: not an MoE model")
        self._check()

    def _field(self, key: str, default=None):
        f = self.reader.get_field(key)
        return default if f is None else f.contents()

    def _meta(self, name: str, default=None):
        return self._field(f"{self.arch}.{name}", default)

    # -- what the metadata says ----------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self._meta("block_count"))

    @property
    def hidden(self) -> int:
        return int(self._meta("embedding_length"))

    @property
    def num_experts(self) -> int:
        return int(self._meta("expert_count"))

    @property
    def expert_intermediate(self) -> int:
        return int(self._meta("expert_feed_forward_length", self._meta("feed_forward_length")))

    @property
    def shared_intermediate(self) -> int:
        if self.arch == "deepseek2":
            return self.expert_intermediate * int(self._meta("expert_shared_count", 0))
        return int(self._meta("expert_shared_feed_forward_length", 0))

    @property
    def moe_layers(self) -> list[int]:
        first = int(self._meta("leading_dense_block_count", 0))
        return [l for l in range(first, self.num_layers) if f"blk.{l}.ffn_gate_inp.weight" in self.tensors]

    def router_config(self, layer: int | None = None) -> RouterConfig:
        k = int(self._meta("expert_used_count"))
        norm = bool(self._meta("expert_weights_norm", _NORM_DEFAULT[self.arch]))
        if self.arch != "deepseek2":
            return RouterConfig(top_k=k, norm_topk_prob=norm)
        sigmoid = int(self._meta("expert_gating_func", 1)) == 2          # llama.cpp: 1 softmax, 2 sigmoid
        bias = None
        key = f"blk.{layer}.exp_probs_b.bias"
        if layer is not None and key in self.tensors:
            bias = tuple(self._read(key).flatten().tolist())
        return RouterConfig(top_k=k, norm_topk_prob=norm, scoring="sigmoid" if sigmoid else "softmax",
                            routed_scaling_factor=float(self._meta("expert_weights_scale", 1.0)),
                            n_group=int(self._meta("expert_group_count", 1)) or 1,
                            topk_group=int(self._meta("expert_group_used_count", 1)) or 1, score_bias=bias)

    # -- keys and shapes -----------------------------------------------------------------------
    def expected(self, layer: int) -> dict[str, tuple[int, ...]]:
        """Tensor names of one MoE layer and their logical (row-major) shapes."""
        d, e, i, s = self.hidden, self.num_experts, self.expert_intermediate, self.shared_intermediate
        b = f"blk.{layer}."
        out = {b + "ffn_gate_inp.weight": (e, d), b + "ffn_gate_exps.weight": (e, i, d),
               b + "ffn_up_exps.weight": (e, i, d), b + "ffn_down_exps.weight": (e, d, i)}
        if s:
            out.update({b + "ffn_gate_shexp.weight": (s, d), b + "ffn_up_shexp.weight": (s, d),
                        b + "ffn_down_shexp.weight": (d, s)})
        return out

    def _shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self.tensors[key].shape.tolist()))

    def _check(self) -> None:
        for layer in self.moe_layers:
            for key, shape in self.expected(layer).items():
                if key not in self.tensors:
                    raise ValueError(f"{self.path}: tensor {key!r} is missing (layer {layer} is an MoE layer)")
                if self._shape(key) != shape:
                    raise ValueError(f"{self.path}: tensor {key!r} has shape {list(self._shape(key))}, "
                                     f"the metadata implies {list(shape)}")

    def _read(self, key: str) -> torch.Tensor:
        from gguf.quants import dequantize

        t = self.tensors[key]
        # a copy: F32 tensors come back as read-only views of the memory map
        return torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32, copy=True)
                                ).reshape(self._shape(key))

    # -- layers --------------------------------------------------------------------------------
    def moe_layer(self, layer: int) -> tuple[MoEWeights, RouterConfig]:
        if layer not in self.moe_layers:
            raise ValueError(f"layer {layer} is not an MoE layer of {self.path} (MoE layers: {self.moe_layers})")
        b = f"blk.{layer}."
        shared = {}
        if self.shared_intermediate:
            shared = {"shared_w1": self._read(b + "ffn_gate_shexp.weight"),
                      "shared_w3": self._read(b + "ffn_up_shexp.weight"),
                      "shared_w2": self._read(b + "ffn_down_shexp.weight")}
            if b + "ffn_gate_inp_shexp.weight" in self.tensors:
                shared["shared_gate"] = self._read(b + "ffn_gate_inp_shexp.weight").reshape(1, self.hidden)
        w = MoEWeights(router=self._read(b + "ffn_gate_inp.weight"), w1=self._read(b + "ffn_gate_exps.weight"),
                       w3=self._read(b + "ffn_up_exps.weight"), w2=self._read(b + "ffn_down_exps.weight"), **shared)
        return w, self.router_config(layer)

    def iter_moe_layers(self):
        for layer in self.moe_layers:
            w, cfg = self.moe_layer(layer)
            yield layer, w, cfg


# Architectures whose whole model transformers can load from GGUF (its own GGUF support), with the
# config fields transformers does not read from the file (it falls back to Qwen1.5-MoE's sizes).
WHOLE_MODEL = {"qwen2moe": ("qwen2_moe", {"moe_intermediate_size": "expert_intermediate",
                                          "shared_expert_intermediate_size": "shared_intermediate"}),
               "qwen3moe": ("qwen3_moe", {"moe_intermediate_size": "expert_intermediate"})}


def load_gguf_model(path: str | Path):
    """The whole GGUF model as a transformers causal LM (fp32, offline) for the architectures
    transformers reads, its MoE sizes taken from the file. Returns (model, GGUFCheckpoint)."""
    import os

    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt = GGUFCheckpoint(path)
    if ckpt.arch not in WHOLE_MODEL:
        raise ValueError(f"{ckpt.path}: transformers cannot load a whole {ckpt.arch!r} model from GGUF (it can: "
                         f"{', '.join(WHOLE_MODEL)}); its MoE layers still read with GGUFCheckpoint, or convert "
                         f"the model to a Hugging Face safetensors folder")
    os.environ["HF_HUB_OFFLINE"] = "1"
    folder, name = str(ckpt.path.parent), ckpt.path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model_type, sizes = WHOLE_MODEL[ckpt.arch]
    if config.model_type != model_type:
        raise ValueError(f"{ckpt.path}: transformers read model_type={config.model_type!r}, expected {model_type!r}")
    for field, attr in sizes.items():
        setattr(config, field, getattr(ckpt, attr))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config, dtype=torch.float32,
                                                 local_files_only=True)
    model.eval()
    return model, ckpt

