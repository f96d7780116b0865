"""Verilog of a named configuration (amaranth.back.verilog), and Verilator's lint of it.

    python -m rtl.export --config default --out build/rtl [--harness]

Generated Verilog goes to build/ (or --out), never into the repository.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from amaranth.back import verilog

from ndpmoe.model.contract import NdpConfig, get_config

from .hard_blocks import platform_for, simulation_models
from .ndp_unit import NdpUnit
from .sim_harness import SIM_RAM_VERILOG, SimHarness
from .verilator_env import verilator_env

UNIT_TOP = "ndp_unit"
HARNESS_TOP = "ndp_harness"

# Verilator lint waivers (default lint level), each a property of Yosys's Verilog writer, not of
# the design; the design's own widths are checked bit-exactly by the test benches.
LINT_WAIVERS = {
    "WIDTHEXPAND": "Yosys writes comparisons and additions with operands of their natural "
                   "width (e.g. a 7-bit count added to a 14-bit position); Verilog extends them "
                   "as intended",
    "WIDTHTRUNC": "Yosys writes a reduction of a multi-bit net as `!net` and truncating "
                  "assignments without an explicit part-select",
    "CASEINCOMPLETE": "Yosys writes every Switch as a `casez` without a default, after an "
                      "assignment of the default value, so uncovered values keep it",
}


def resolve_config(config: NdpConfig | str) -> NdpConfig:
    if isinstance(config, NdpConfig):
        return config
    if isinstance(config, str):
        return get_config(config)
    raise TypeError(f"config must be an NdpConfig or a configuration name, not {config!r}")


def unit_verilog(config: NdpConfig | str) -> str:
    return verilog.convert(NdpUnit(resolve_config(config)), name=UNIT_TOP, emit_src=False)


def harness_verilog(config: NdpConfig | str, *, mem_words: int, result_words: int,
                    primitives: str = "inferred") -> str:
    """The simulation harness; with primitives="ecp5" the unit as the ECP5 flow synthesizes it
    (DP16KD / MULT18X18D instances, rtl/hard_blocks.py) and those primitives' models."""
    platform = platform_for(primitives)
    top = SimHarness(resolve_config(config), mem_words=mem_words, result_words=result_words)
    return "\n".join([verilog.convert(top, name=HARNESS_TOP, emit_src=False, platform=platform),
                      SIM_RAM_VERILOG, simulation_models(primitives)])


def write_unit(config: NdpConfig | str, out_dir: Path | str) -> Path:
    cfg = resolve_config(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{UNIT_TOP}_{cfg.name}.v"
    path.write_text(unit_verilog(cfg))
    return path


def write_harness(config: NdpConfig | str, out_dir: Path | str, *, mem_words: int,
                  result_words: int, primitives: str = "inferred") -> Path:
    cfg = resolve_config(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{HARNESS_TOP}_{cfg.name}.v"
    text = harness_verilog(cfg, mem_words=mem_words, result_words=result_words, primitives=primitives)
    if not path.exists() or path.read_text() != text:      # keep the mtime: no needless rebuild
        path.write_text(text)
    return path


def lint(path: Path | str, top: str = UNIT_TOP, *, wall: bool = False) -> tuple[int, str]:
    """Run `verilator --lint-only` with the written-down waivers; returns (status, messages)."""
    cmd = ["verilator", "--lint-only", "--top-module", top, str(path)]
    cmd += [f"-Wno-{w}" for w in LINT_WAIVERS]
    if wall:
        cmd.insert(2, "-Wall")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=verilator_env())
    # Keep the diagnostics (%Warning, %Error and their context), not Verilator's run report.
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines()
             if ln.strip() and not ln.startswith(("- V e r i l a t i o n", "- Verilator:"))]
    return proc.returncode, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--out", default="build/rtl")
    parser.add_argument("--harness", action="store_true", help="the simulation harness instead")
    args = parser.parse_args(argv)
    if args.harness:
        path = write_harness(args.config, args.out, mem_words=1 << 16, result_words=1 << 14)
    else:
        path = write_unit(args.config, args.out)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
