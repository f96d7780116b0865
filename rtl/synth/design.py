"""The design the flow synthesizes: the NDP unit of one configuration, in the pin wrapper."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from amaranth.back import verilog
from amaranth.lib import wiring

from model.contract import NdpConfig, get_config
from rtl.export import resolve_config  # noqa: F401  (re-exported: the synth modules import it from here)
from rtl.synth.wrapper import PinWrapper

TOP_NAME = "ndp_fpga_top"        # module name of the wrapped design in the exported Verilog
DESIGN_NAME = "ndp_unit"         # module name of the bare unit in the exported Verilog

DesignFactory = Callable[[NdpConfig], wiring.Component]


def ndp_unit(cfg: NdpConfig) -> wiring.Component:
    """The RTL's top component for `cfg`."""
    try:
        from rtl.ndp_unit import NdpUnit
    except ImportError as exc:
        raise ValueError(f"the NDP unit's top component is not importable from rtl.ndp_unit ({exc})") from exc
    return NdpUnit(cfg)




def write_wrapped_verilog(cfg: NdpConfig, path: Path, factory: DesignFactory = ndp_unit) -> PinWrapper:
    """Write the wrapped design (top module TOP_NAME, ports clk, rst, si, so) as Verilog."""
    top = PinWrapper(factory(cfg))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(verilog.convert(top, name=TOP_NAME))
    return top


def write_bare_verilog(cfg: NdpConfig, path: Path, factory: DesignFactory = ndp_unit) -> None:
    """Write the unit itself (module DESIGN_NAME, all its ports) for users' own SoC flows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(verilog.convert(factory(cfg), name=DESIGN_NAME))
