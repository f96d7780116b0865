"""`ndpmoe fpga-export`: Verilog of one NDP configuration for users' own FPGA flows - the bare
unit (module ndp_unit, all its ports, to instantiate in an SoC) and the pin-wrapped top
(module ndp_fpga_top: clk, rst, si, so) - plus XDC / SDC / LPF / PCF constraint templates."""
from __future__ import annotations

import argparse
from pathlib import Path

from ndpmoe.model.cli_args import float_in, output_dir, prepare_output_dir
from ndpmoe.model.contract import CONFIGS, get_config
from ndpmoe.model.paths import build_root


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", choices=sorted(CONFIGS), default="default",
                   help=f"NDP configuration, one of {sorted(CONFIGS)}")
    p.add_argument("--freq", type=float_in(0, 1000, lo_open=True), default=150.0,
                   help="clock of the constraint templates in MHz")
    p.add_argument("--out", type=output_dir, default=None, help="output folder (default build/fpga/export-<config>)")


def export(config: str, out: Path, freq_mhz: float) -> list[Path]:
    from ndpmoe.rtl.synth.design import DESIGN_NAME, TOP_NAME, write_bare_verilog, write_wrapped_verilog
    from ndpmoe.rtl.synth.constraints import TEMPLATES
    from ndpmoe.rtl.synth.run import check_freq

    cfg = get_config(config)
    freq_mhz = check_freq(freq_mhz)
    written = [out / f"{DESIGN_NAME}.v", out / f"{TOP_NAME}.v"]
    write_bare_verilog(cfg, written[0])
    write_wrapped_verilog(cfg, written[1])
    for ext, template in TEMPLATES.items():
        path = out / f"{TOP_NAME}.{ext}"
        path.write_text(template(freq_mhz))
        written.append(path)
    return written


def run(args: argparse.Namespace) -> int:
    out = prepare_output_dir(args.out or build_root("fpga") / f"export-{args.config}", "--out")
    for path in export(args.config, out, args.freq):
        print(path)
    return 0
