"""`ndpmoe` command line. Each subcommand lives in its own module with `add_arguments(parser)`
and `run(args) -> int`; this file only lists them, so adding one is a one-line change.

Errors end a command with one line on stderr: a bad argument or an error the project raises on
purpose (NdpmoeError, ValueError, TypeError, OSError) exits 2; anything else is an internal error
whose traceback goes to a log file (the line says where), exit 1; `--debug` prints tracebacks
instead. Ctrl-C exits 130 with one line: cache entries are written whole or not at all.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from ndpmoe.model import paths
from ndpmoe.model.errors import NdpmoeError

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
    "factor-bench": ("ndpmoe.host.cmd_factor_bench", "what int8/int4/int3 compensators keep of the fp16 factors' error reduction through the runtime (GPU and NDP paths), with their bytes"),
    "eval": ("ndpmoe.host.cmd_eval", "accuracy against bandwidth: perplexity vs bytes per token, Pareto plot (JSON, PNG)"),
    "cosim": ("ndpmoe.sim.cmd_cosim", "one MoE layer of a real model with its NDP ops on the Verilator-simulated RTL: bit-exactness, errors, cycles"),
    "generate": ("ndpmoe.host.cmd_generate", "text from the whole model through the runtime (store, cache, policy, placement, NDP golden or RTL) with measured time per token"),
    "make-checkpoint": ("ndpmoe.host.cmd_make_checkpoint", "a random checkpoint shaped like Mixtral-8x7B, OLMoE, DeepSeek-V2-Lite or Qwen3-30B-A3B (real names and sizes, sharded)"),
    "demo": ("ndpmoe.host.cmd_demo", "the whole system end to end on the embedded default; writes results/demo/report.md"),
}


EXPECTED = (NdpmoeError, ValueError, TypeError, OSError)     # their message is the whole story
INTERRUPTED = ("interrupted; cache entries and stores written so far are complete and a rerun reuses them "
               "(unfinished ones were removed); this run's results are incomplete")


class OneLineParser(argparse.ArgumentParser):
    """An argument error is one line naming the value and what is allowed (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="ndpmoe", description="Bandwidth-efficient MoE inference with "
                           "low-rank compensation and a near-data-processing unit.")
    parser.add_argument("--build-dir", help=f"where builds, co-simulation runs and stores go "
                        f"(${paths.BUILD_ENV}; default ./build)")
    parser.add_argument("--cache-dir", help=f"where the default model and the study's cache go "
                        f"(${paths.CACHE_ENV}; default ~/.cache/ndpmoe)")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error "
                        "(otherwise an internal error's traceback goes to a log file)")
    return parser


def _write_log(command: str) -> Path | None:
    """The current exception's traceback in a log file under the build folder (or the temp folder)."""
    name = f"ndpmoe-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in (paths.build_root("logs"), Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(f"ndpmoe {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}")
            return path
        except OSError:
            continue
    return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 2000 else text[:2000] + " ..."


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
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
    where = f"ndpmoe {args.command}"
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        print(f"\n{where}: {INTERRUPTED}", file=sys.stderr)
        return 130
    except BrokenPipeError:          # output piped into `head` and the like
        return 0
    except EXPECTED as exc:
        if args.debug:
            traceback.print_exc()
        print(f"{where}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:         # noqa: BLE001 - a bug: one line here, the traceback in a file
        if args.debug:
            traceback.print_exc()
            print(f"{where}: internal error: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
            return 1
        log = _write_log(args.command)
        print(f"{where}: internal error: {type(exc).__name__}: {_one_line(exc)} (traceback in "
              f"{log if log else '(no writable place for a log)'}; --debug prints it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
