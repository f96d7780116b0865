"""The design the flow synthesizes: the NDP unit of one configuration, in the pin wrapper."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from amaranth.back import verilog
from amaranth.lib import wiring

from ndpmoe.model.contract import NdpConfig, get_config
from ndpmoe.rtl.export import resolve_config  # noqa: F401  (re-exported: the synth modules import it from here)
from ndpmoe.rtl.hard_blocks import platform_for
from ndpmoe.rtl.synth.targets import FpgaTarget
from ndpmoe.rtl.synth.wrapper import PinWrapper

TOP_NAME = "ndp_fpga_top"        # module name of the wrapped design in the exported Verilog
DESIGN_NAME = "ndp_unit"         # module name of the bare unit in the exported Verilog

DesignFactory = Callable[[NdpConfig], wiring.Component]


def ndp_unit(cfg: NdpConfig) -> wiring.Component:
    """The RTL's top component for `cfg`."""
    try:
        from ndpmoe.rtl.ndp_unit import NdpUnit
    except ImportError as exc:
        raise ValueError(f"the NDP unit's top component is not importable from rtl.ndp_unit ({exc})") from exc
    return NdpUnit(cfg)




def write_wrapped_verilog(cfg: NdpConfig, path: Path, factory: DesignFactory = ndp_unit,
                          primitives: str = "inferred") -> PinWrapper:
    """Write the wrapped design (top module TOP_NAME, ports clk, rst, si, so) as Verilog, its
    block RAMs and multipliers inferred or instantiated as `primitives` says (rtl/hard_blocks.py)."""
    top = PinWrapper(factory(cfg))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(verilog.convert(top, name=TOP_NAME, platform=platform_for(primitives)))
    return top


def default_primitives(target: FpgaTarget) -> str:
    """ECP5 targets get the DP16KD / MULT18X18D instances with their registers on; others infer."""
    return "ecp5" if target.family == "ecp5" else "inferred"


def check_primitives(target: FpgaTarget, primitives: str | None) -> str:
    if primitives is None:
        return default_primitives(target)
    platform_for(primitives)                       # names the bad value
    if primitives == "ecp5" and target.family != "ecp5":
        raise ValueError(f"primitives 'ecp5' need an ECP5 target, not {target.name!r}")
    return primitives


def write_bare_verilog(cfg: NdpConfig, path: Path, factory: DesignFactory = ndp_unit) -> None:
    """Write the unit itself (module DESIGN_NAME, all its ports) for users' own SoC flows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(verilog.convert(factory(cfg), name=DESIGN_NAME))
