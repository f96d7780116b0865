"""`ndpmoe` command line. Each subcommand lives in its own module with `add_arguments(parser)`
and `run(args) -> int`; this file only lists them, so adding one is a one-line change."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from ndpmoe.model import paths

# Before torch loads OpenMP: threads that spin while they wait made the study ~3.5x slower on 2 cores
# shared with one other busy process (46 s against 13 s for one perplexity pass); waiters that sleep
# cost little when the cores are free. A user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# name -> (module, one-line help)
SUBCOMMANDS = {
    "quant-bench": ("ndpmoe.host.cmd_quant_bench", "quantizer / compensator timings and bytes per weight on a Mixtral-size matrix"),
    "bench": ("ndpmoe.host.cmd_bench", "modeled decode tokens/s and bytes per token: fp16+LRU, low-bit, HOBBIT, Top-n, adaptive"),
    "synth": ("ndpmoe.rtl.synth.cmd_synth", "Yosys + nextpnr of one NDP configuration on an FPGA: LUT/FF/DSP/BRAM, Fmax, critical path"),
    "fpga-sweep": ("ndpmoe.rtl.synth.cmd_sweep", "FPGA resources, Fmax, bandwidth and GMAC/s over port width, bit widths and T_max"),
    "fpga-export": ("ndpmoe.rtl.synth.cmd_export", "Verilog (bare unit + pin-wrapped top) and XDC/SDC/LPF/PCF templates"),
    "sim": ("ndpmoe.sim.cmd_sim", "cocotb + Verilator bench of the NDP unit against the golden model (--bench: throughput)"),
    "rtl": ("ndpmoe.rtl.cmd_rtl", "Verilog of a named NDP configuration, linted by Verilator"),
    "eval": ("ndpmoe.host.cmd_eval", "accuracy against bandwidth: perplexity vs bytes per token, Pareto plot (JSON, PNG)"),
    "cosim": ("ndpmoe.sim.cmd_cosim", "one MoE layer of a real model with its NDP ops on the Verilator-simulated RTL: bit-exactness, errors, cycles"),
    "make-checkpoint": ("ndpmoe.host.cmd_make_checkpoint", "a random checkpoint shaped like Mixtral-8x7B, OLMoE, DeepSeek-V2-Lite or Qwen3-30B-A3B (real names and sizes, sharded)"),
    "demo": ("ndpmoe.host.cmd_demo", "the whole system end to end on the embedded default; writes results/demo/report.md"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ndpmoe", description="Bandwidth-efficient MoE inference with "
                                     "low-rank compensation and a near-data-processing unit.")
    parser.add_argument("--build-dir", help=f"where builds, co-simulation runs and stores go "
                        f"(${paths.BUILD_ENV}; default ./build)")
    parser.add_argument("--cache-dir", help=f"where the default model and the study's cache go "
                        f"(${paths.CACHE_ENV}; default ~/.cache/ndpmoe)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    sub = parser.add_subparsers(dest="command", required=True)
    # Only the chosen subcommand's module is imported (and its arguments declared): `ndpmoe --help`
    # imports none of them, `ndpmoe X --help` only X's, whose top level imports no torch or amaranth.
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    if args.build_dir:
        os.environ[paths.BUILD_ENV] = os.path.abspath(args.build_dir)
    if args.cache_dir:
        os.environ[paths.CACHE_ENV] = os.path.abspath(args.cache_dir)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"ndpmoe {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
