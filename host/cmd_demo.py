"""`ndpmoe demo`: the whole system end to end on the embedded default; writes results/demo/report.md."""
from __future__ import annotations

from pathlib import Path

from .demo import DemoOptions, run_demo


def add_arguments(p):
    p.add_argument("--out", type=Path, default=Path("results/demo"), help="report folder")
    p.add_argument("--quick", action="store_true", help="reduced mode (the test suite's): two MoE layers, "
                   "short text, the small NDP configuration on an ECP5-85k")


def run(args) -> int:
    return 0 if run_demo(DemoOptions(out=args.out, quick=args.quick)).ok else 1
