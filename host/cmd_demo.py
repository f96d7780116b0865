"""`ndpmoe demo`: the whole system end to end on the embedded default; writes results/demo/report.md."""
from __future__ import annotations

from pathlib import Path

from ndpmoe.model.cli_args import output_dir, prepare_output_dir
from .demo import DemoOptions, run_demo


def add_arguments(p):
    p.add_argument("--out", type=output_dir, default=Path("results/demo"), help="report folder")
    p.add_argument("--quick", action="store_true", help="reduced mode (the test suite's): two MoE layers, "
                   "short text, the small NDP configuration on an ECP5-85k")


def run(args) -> int:
    prepare_output_dir(args.out, "--out")
    return 0 if run_demo(DemoOptions(out=args.out, quick=args.quick)).ok else 1
