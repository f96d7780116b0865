"""What the RTL is elaborated for: plain Amaranth, or an ECP5 build with its primitives.

The `platform` Amaranth hands to every elaborate is either None (simulation, users' own
Vivado/Quartus flows) or `Ecp5HardBlocks()`, which the synthesis flow passes for ECP5 targets;
rtl/hard_blocks.py (block RAMs, multipliers) and rtl/fanout.py (register copies) look at it.
"""
from __future__ import annotations

from pathlib import Path

ECP5_MODELS = Path(__file__).with_name("ecp5_models.v")   # Verilator models of the ECP5 primitives

PRIMITIVES = ("inferred", "ecp5")


class Ecp5HardBlocks:
    """Platform marker: elaborate with ECP5 DP16KD / MULT18X18D / TRELLIS_FF primitives."""
    family = "ecp5"

    def __repr__(self):
        return "Ecp5HardBlocks()"


def platform_for(primitives: str):
    """The `platform` to elaborate with: None (plain Amaranth) or Ecp5HardBlocks()."""
    if primitives not in PRIMITIVES:
        raise ValueError(f"primitives must be one of {PRIMITIVES}, not {primitives!r}")
    return Ecp5HardBlocks() if primitives == "ecp5" else None


def simulation_models(primitives: str) -> str:
    """Verilog that a simulator needs beside a design elaborated with `primitives`."""
    platform_for(primitives)
    return ECP5_MODELS.read_text() if primitives == "ecp5" else ""


def uses_ecp5(platform) -> bool:
    return getattr(platform, "family", None) == "ecp5"
