"""FPGA targets the flow knows: which Yosys synth command and nextpnr flags each one needs."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FpgaTarget:
    name: str
    family: str                     # "ecp5" or "ice40"
    device_args: tuple[str, ...]    # nextpnr device + package flags
    synth_args: tuple[str, ...]     # extra flags of synth_ecp5 / synth_ice40
    speed_grades: tuple[int, ...]   # empty where nextpnr has no speed option
    default_speed: int | None
    # nextpnr BEL types, for the resource columns of the report
    lut_bel: str
    ff_bel: str | None              # None where LUT and FF share one cell (iCE40 LC)
    dsp_bel: str | None
    bram_bels: tuple[str, ...]

    @property
    def nextpnr(self) -> str:
        return f"yowasp-nextpnr-{self.family}"

    @property
    def synth_command(self) -> str:
        return f"synth_{self.family}"

    def check_speed(self, speed: int | None) -> int | None:
        """The speed grade to use: the given one, or the target's default (the slowest on ECP5)."""
        if speed is None:
            return self.default_speed
        if not self.speed_grades:
            raise ValueError(f"target {self.name!r} has no speed grade option, got --speed {speed}")
        if speed not in self.speed_grades:
            raise ValueError(f"speed grade of {self.name!r} must be one of {self.speed_grades}, not {speed!r}")
        return speed


_ECP5 = dict(family="ecp5", synth_args=("-abc9",), speed_grades=(6, 7, 8), default_speed=6,
             lut_bel="TRELLIS_COMB", ff_bel="TRELLIS_FF", dsp_bel="MULT18X18D", bram_bels=("DP16KD",))
_ICE40 = dict(family="ice40", speed_grades=(), default_speed=None,
              lut_bel="ICESTORM_LC", ff_bel=None, bram_bels=("ICESTORM_RAM", "ICESTORM_SPRAM"))

TARGETS = {t.name: t for t in (
    # nextpnr-ecp5's default speed grade is 6, the slowest; the flow reports which one it used.
    FpgaTarget("ecp5-85k", device_args=("--85k", "--package", "CABGA381"), **_ECP5),
    FpgaTarget("ecp5-25k", device_args=("--25k", "--package", "CABGA256"), **_ECP5),
    FpgaTarget("ice40-up5k", device_args=("--up5k", "--package", "sg48"),
               synth_args=("-abc9", "-device", "u", "-dsp"), dsp_bel="ICESTORM_DSP", **_ICE40),
    # HX8K has no DSP tiles (synth_ice40 -dsp fails there).
    FpgaTarget("ice40-hx8k", device_args=("--hx8k", "--package", "ct256"),
               synth_args=("-abc9", "-device", "hx"), dsp_bel=None, **_ICE40),
)}


def get_target(name: str) -> FpgaTarget:
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown FPGA target {name!r}; expected one of {sorted(TARGETS)}") from None
