"""`ndpmoe rtl`: write the Verilog of a named configuration and lint it with Verilator."""
from __future__ import annotations

import argparse

from ndpmoe.model.cli_args import output_dir, prepare_output_dir
from ndpmoe.model.contract import CONFIGS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", choices=sorted(CONFIGS), default="default", help=f"one of {sorted(CONFIGS)}")
    parser.add_argument("--out", type=output_dir, default=None,
                        help="output folder (default: build/rtl under the build folder)")
    parser.add_argument("--no-lint", action="store_true", help="only write the Verilog")
    parser.add_argument("--wall", action="store_true",
                        help="lint with -Wall too (reports Yosys-generated unused nets, initial values)")


def run(args) -> int:
    prepare_output_dir(args.out, "--out")
    from .export import LINT_WAIVERS, UNIT_TOP, lint, write_unit   # amaranth loads here, not for --help

    from ndpmoe.model.paths import build_root

    path = write_unit(args.config, args.out or build_root("rtl"))
    print(f"wrote {path} (top module {UNIT_TOP})")
    if args.no_lint:
        return 0
    status, messages = lint(path, UNIT_TOP, wall=args.wall)
    print("verilator --lint-only, waived: " + ", ".join(LINT_WAIVERS))
    for name, reason in LINT_WAIVERS.items():
        print(f"  -Wno-{name}: {reason}")
    if messages:
        print(messages)
    print("lint clean" if status == 0 and not messages else f"lint: status {status}")
    return 0 if status == 0 else 1
