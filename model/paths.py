"""Where the project writes: build folders under the user's working folder, caches under one root.

Nothing is ever written beside the installed package (after a real install that is site-packages).
- `build_root()`: Verilator builds, co-simulation runs and stores, FPGA runs. `$NDPMOE_BUILD`, else
  `build/` in the current working folder (`ndpmoe --build-dir DIR` sets it for one run).
- `cache_dir()`: derived artefacts worth keeping across working folders (the default model, the
  study's quantized experts). `$NDPMOE_CACHE`, else `~/.cache/ndpmoe` (`ndpmoe --cache-dir DIR`).
Both are read at call time, so a test or a command can point them elsewhere.
"""
from __future__ import annotations

import os
from pathlib import Path

BUILD_ENV = "NDPMOE_BUILD"
CACHE_ENV = "NDPMOE_CACHE"


def build_root(*parts: str) -> Path:
    """`$NDPMOE_BUILD/parts...` (default `./build/parts...`), not created."""
    root = os.environ.get(BUILD_ENV) or os.path.join(os.getcwd(), "build")
    return Path(root).joinpath(*parts)


def cache_dir() -> Path:
    """`$NDPMOE_CACHE` (default `~/.cache/ndpmoe`), created."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "ndpmoe")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
