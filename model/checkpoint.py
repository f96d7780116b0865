"""Lazy readers for local Hugging Face MoE checkpoints (safetensors, single file or sharded).

Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2 and DeepSeek-V3 folders are read one MoE layer at
a time into `MoEWeights` + `RouterConfig`, so a Mixtral-8x7B never has to fit in memory at once.
Opening a folder checks, from the safetensors headers alone, that every shard is present and whole
and that every MoE tensor exists with the shape config.json implies: a bad folder fails before any
tensor data is read, with the file and key named.

Key patterns on disk (per expert, even though transformers 5 fuses experts in memory):
  Mixtral   model.layers.L.block_sparse_moe.{gate, experts.E.w1/w3/w2}.weight
  others    model.layers.L.mlp.{gate, experts.E.gate_proj/up_proj/down_proj}.weight
  Qwen2-MoE + mlp.shared_expert.{gate,up,down}_proj.weight, mlp.shared_expert_gate.weight
  DeepSeek  + mlp.shared_experts.{gate,up,down}_proj.weight; V3 + mlp.gate.e_score_correction_bias
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .block import FloatMoE, set_block
from .errors import NdpmoeError
from .moe import MoEWeights, RouterConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class Family:
    """Where one architecture keeps its MoE tensors (relative to model.layers.L.)."""
    block: str                       # "mlp" or "block_sparse_moe"
    names: tuple[str, str, str]      # on-disk names of (w1 gate, w3 up, w2 down)
    shared: str | None = None        # shared expert prefix inside the block
    shared_gate: bool = False        # Qwen2-MoE's sigmoid gate on the shared expert
    score_bias: bool = False         # DeepSeek-V3's e_score_correction_bias


_SWIGLU = ("gate_proj", "up_proj", "down_proj")
FAMILIES = {
    "mixtral": Family("block_sparse_moe", ("w1", "w3", "w2")),
    "olmoe": Family("mlp", _SWIGLU),
    "qwen2_moe": Family("mlp", _SWIGLU, shared="shared_expert", shared_gate=True),
    "qwen3_moe": Family("mlp", _SWIGLU),
    "deepseek_v2": Family("mlp", _SWIGLU, shared="shared_experts"),
    "deepseek_v3": Family("mlp", _SWIGLU, shared="shared_experts", score_bias=True),
}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes from a safetensors header; refuses a truncated file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file {str(path)!r} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated: {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise ValueError(f"{path}: truncated: header claims {n} bytes but the file has {size}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: unreadable safetensors header ({e})") from None
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        end = 8 + n + meta["data_offsets"][1]
        if end > size:
            raise ValueError(f"{path}: truncated: tensor {key!r} ends at byte {end}, the file has {size} bytes")
        out[key] = TensorInfo(path, meta["dtype"], tuple(meta["shape"]))
    return out


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object; NdpmoeError naming the file otherwise."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NdpmoeError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise NdpmoeError(f"{path} must hold a JSON object, not a {type(value).__name__}")
    return value


def _cfg(config: dict, *names, default=None):
    """First of several config.json spellings that is present (families and versions differ)."""
    for name in names:
        if config.get(name) is not None:
            return config[name]
    return default


class Checkpoint:
    """A local Hugging Face MoE checkpoint folder, read lazily one layer at a time."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        cfg_path = self.folder / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path} does not exist: not a Hugging Face checkpoint folder")
        self.config = read_json_object(cfg_path)
        self.model_type = self.config.get("model_type")
        if self.model_type not in FAMILIES:
            raise ValueError(f"{cfg_path}: unknown architecture model_type={self.model_type!r}; "
                             f"supported: {', '.join(sorted(FAMILIES))}")
        self.family = FAMILIES[self.model_type]
        self._check_config(cfg_path)
        self.tensors = self._index()
        self._check()

    # -- the folder ---------------------------------------------------------------------------
    def _index(self) -> dict[str, TensorInfo]:
        index = self.folder / INDEX_NAME
        if index.is_file():
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no 'weight_map' object")
            headers: dict[str, dict[str, TensorInfo]] = {}
            for key, shard in weight_map.items():
                if shard not in headers:
                    path = self.folder / shard
                    if not path.is_file():
                        raise FileNotFoundError(f"{path} is missing: {index.name} maps tensor {key!r} to it")
                    headers[shard] = read_header(path)
            out = {}
            for key, shard in weight_map.items():
                if key not in headers[shard]:
                    raise ValueError(f"{self.folder / shard}: tensor {key!r} listed in {index.name} is not in the file")
                out[key] = headers[shard][key]
            return out
        single = self.folder / SINGLE_NAME
        if single.is_file():
            return read_header(single)
        raise FileNotFoundError(f"{self.folder}: neither {INDEX_NAME} nor {SINGLE_NAME} found")

    # -- what config.json says -----------------------------------------------------------------
    def _check_config(self, cfg_path: Path) -> None:
        """The sizes this loader reads are positive integers and top-k fits the experts."""
        c = self.config
        inter = ("intermediate_size",) if self.model_type in ("mixtral", "olmoe") else ("moe_intermediate_size",)
        for names in (("num_hidden_layers",), ("hidden_size",), ("num_local_experts", "num_experts", "n_routed_experts"),
                      ("num_experts_per_tok",), inter):
            v = _cfg(c, *names)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise NdpmoeError(f"{cfg_path}: {' or '.join(names)} must be a positive integer, "
                                  f"{'not ' + repr(v) if v is not None else 'and it is missing'}")
        if self.config["num_experts_per_tok"] > self.num_experts:
            raise NdpmoeError(f"{cfg_path}: num_experts_per_tok {self.config['num_experts_per_tok']} is more than the "
                              f"{self.num_experts} experts")

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def hidden(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def num_experts(self) -> int:
        return int(_cfg(self.config, "num_local_experts", "num_experts", "n_routed_experts"))

    @property
    def expert_intermediate(self) -> int:
        if self.model_type in ("mixtral", "olmoe"):
            return int(self.config["intermediate_size"])
        return int(self.config["moe_intermediate_size"])

    @property
    def shared_intermediate(self) -> int:
        if self.model_type == "qwen2_moe":
            return int(_cfg(self.config, "shared_expert_intermediate_size", default=0))
        if self.model_type.startswith("deepseek"):
            return self.expert_intermediate * int(_cfg(self.config, "n_shared_experts", default=0))
        return 0

    @property
    def moe_layers(self) -> list[int]:
        """Layers whose MLP is an MoE block (DeepSeek and Qwen can keep some layers dense)."""
        c, n = self.config, self.num_layers
        if self.model_type.startswith("deepseek"):
            return list(range(int(_cfg(c, "first_k_dense_replace", default=0)), n))
        if self.model_type in ("qwen2_moe", "qwen3_moe"):
            dense = set(_cfg(c, "mlp_only_layers", default=[]))
            step = int(_cfg(c, "decoder_sparse_step", default=1))
            return [i for i in range(n) if i not in dense and (i + 1) % step == 0]
        return list(range(n))

    def router_config(self, layer: int | None = None) -> RouterConfig:
        """Routing rule as transformers 5.24 implements it for this family (layer: V3's bias)."""
        c, k = self.config, int(self.config["num_experts_per_tok"])
        if self.model_type == "mixtral":
            return RouterConfig(top_k=k, norm_topk_prob=True)
        if self.model_type in ("olmoe", "qwen2_moe", "qwen3_moe"):
            return RouterConfig(top_k=k, norm_topk_prob=bool(_cfg(c, "norm_topk_prob", default=False)))
        scale = float(_cfg(c, "routed_scaling_factor", default=1.0))
        if self.model_type == "deepseek_v2":
            # transformers' DeepSeek-V2 never renormalizes (V2-Lite's norm_topk_prob is false anyway)
            grouped = _cfg(c, "topk_method", default="greedy") == "group_limited_greedy"
            return RouterConfig(top_k=k, norm_topk_prob=False, routed_scaling_factor=scale,
                                n_group=int(_cfg(c, "n_group", default=1)) if grouped else 1,
                                topk_group=int(_cfg(c, "topk_group", default=1)) if grouped else 1)
        bias = None
        if layer is not None:
            bias = tuple(self._read(self._key(layer, "gate.e_score_correction_bias")).tolist())
        return RouterConfig(top_k=k, norm_topk_prob=bool(_cfg(c, "norm_topk_prob", default=True)),
                            scoring="sigmoid", routed_scaling_factor=scale,
                            n_group=int(_cfg(c, "n_group", default=1)), topk_group=int(_cfg(c, "topk_group", default=1)),
                            score_bias=bias)

    # -- keys and shapes -----------------------------------------------------------------------
    def _key(self, layer: int, name: str) -> str:
        return f"model.layers.{layer}.{self.family.block}.{name}"

    def expected(self, layer: int) -> dict[str, tuple[int, ...]]:
        """Every tensor key one MoE layer needs, with the shape config.json implies."""
        f, d, e, i, s = self.family, self.hidden, self.num_experts, self.expert_intermediate, self.shared_intermediate
        w1, w3, w2 = f.names
        out = {self._key(layer, "gate.weight"): (e, d)}
        for x in range(e):
            out[self._key(layer, f"experts.{x}.{w1}.weight")] = (i, d)
            out[self._key(layer, f"experts.{x}.{w3}.weight")] = (i, d)
            out[self._key(layer, f"experts.{x}.{w2}.weight")] = (d, i)
        if f.shared and s:
            out[self._key(layer, f"{f.shared}.gate_proj.weight")] = (s, d)
            out[self._key(layer, f"{f.shared}.up_proj.weight")] = (s, d)
            out[self._key(layer, f"{f.shared}.down_proj.weight")] = (d, s)
        if f.shared_gate and s:
            out[self._key(layer, "shared_expert_gate.weight")] = (1, d)
        if f.score_bias:
            out[self._key(layer, "gate.e_score_correction_bias")] = (e,)
        return out

    def _check(self) -> None:
        """Every MoE tensor present with the expected shape, before any data is read."""
        for layer in self.moe_layers:
            for key, shape in self.expected(layer).items():
                info = self.tensors.get(key)
                if info is None:
                    raise ValueError(f"{self.folder}: tensor {key!r} is missing "
                                     f"(config.json says layer {layer} is an MoE layer of {self.model_type})")
                if info.shape != shape:
                    raise ValueError(f"{info.file}: tensor {key!r} has shape {list(info.shape)}, "
                                     f"config.json implies {list(shape)}")

    def _read(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        info = self.tensors[key]
        with safe_open(str(info.file), framework="pt") as f:
            return f.get_tensor(key).float()

    # -- layers --------------------------------------------------------------------------------
    def moe_layer(self, layer: int) -> tuple[MoEWeights, RouterConfig]:
        """Read one MoE layer: float32 MoEWeights (experts stacked [E, I, D]) and its RouterConfig."""
        if layer not in self.moe_layers:
            raise ValueError(f"layer {layer} is not an MoE layer of {self.folder} (MoE layers: {self.moe_layers})")
        f, e = self.family, self.num_experts
        w1, w3, w2 = f.names

        def stack(name):
            return torch.stack([self._read(self._key(layer, f"experts.{x}.{name}.weight")) for x in range(e)])

        shared = {}
        if f.shared and self.shared_intermediate:
            shared = {"shared_w1": self._read(self._key(layer, f"{f.shared}.gate_proj.weight")),
                      "shared_w3": self._read(self._key(layer, f"{f.shared}.up_proj.weight")),
                      "shared_w2": self._read(self._key(layer, f"{f.shared}.down_proj.weight"))}
            if f.shared_gate:
                shared["shared_gate"] = self._read(self._key(layer, "shared_expert_gate.weight"))
        weights = MoEWeights(router=self._read(self._key(layer, "gate.weight")),
                             w1=stack(w1), w3=stack(w3), w2=stack(w2), **shared)
        return weights, self.router_config(layer)

    def iter_moe_layers(self):
        """(layer, MoEWeights, RouterConfig) for each MoE layer, one at a time."""
        for layer in self.moe_layers:
            w, cfg = self.moe_layer(layer)
            yield layer, w, cfg


def load_model(folder: str | Path, float_blocks: bool = True):
    """The whole checkpoint as a transformers causal LM (fp32, offline), after `Checkpoint` checks.

    With float_blocks, every MoE layer's block is replaced by MoEBlock(FloatMoE(...)) read by our
    loader, so the project's block runs everywhere and the rest is transformers' own code.
    `folder` may also be a `.gguf` file (see model.gguf_reader.load_gguf_model).
    Returns (model, checkpoint).
    """
    from transformers import AutoModelForCausalLM

    if str(folder).endswith(".gguf"):
        from .gguf_reader import load_gguf_model
        model, ckpt = load_gguf_model(folder)
    else:
        ckpt = Checkpoint(folder)
        os.environ["HF_HUB_OFFLINE"] = "1"
        _check_dense_shapes(ckpt)
        try:
            model = AutoModelForCausalLM.from_pretrained(ckpt.folder, dtype=torch.float32, local_files_only=True)
        except (OSError, RuntimeError, ValueError) as exc:
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise NdpmoeError(f"{ckpt.folder}: transformers could not load it ({first})") from None
        model.eval()
    if float_blocks:
        for layer, w, cfg in ckpt.iter_moe_layers():
            set_block(model, layer, FloatMoE(w, cfg))
    return model, ckpt


def _check_dense_shapes(ckpt: Checkpoint) -> None:
    """Every tensor the architecture declares under the same name on disk (attention, norms,
    embeddings) has the shape config.json implies, checked on an empty (meta) model before
    transformers reads any data."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(ckpt.folder, local_files_only=True)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (OSError, RuntimeError, ValueError, TypeError) as exc:
        raise NdpmoeError(f"{ckpt.folder / 'config.json'}: transformers cannot build the model it describes "
                          f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    for key, p in skeleton.state_dict().items():
        info = ckpt.tensors.get(key)
        if info is not None and info.shape != tuple(p.shape):
            raise NdpmoeError(f"{info.file}: tensor {key!r} has shape {list(info.shape)}, config.json implies "
                              f"{list(p.shape)}")


def load_tokenizer(path: str | Path):
    """The tokenizer of a local checkpoint folder, or the one in a .gguf file's metadata."""
    from transformers import AutoTokenizer

    p = Path(path)
    try:
        if p.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{p}: no tokenizer could be loaded from it ({e})") from None

