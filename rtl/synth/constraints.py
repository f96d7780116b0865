"""Constraint templates for the wrapped design (ports clk, rst, si, so) in users' own flows.

Only the clock constraint is complete; pin sites and I/O standards depend on the board and are
left as commented placeholders. rst, si and so are evaluation pins with no off-chip timing, so
their paths are cut. For the bare unit inside a user's SoC, only the clock line applies (to
whatever clock drives the unit's `clk`).
"""
from __future__ import annotations

from ndpmoe.rtl.synth.design import TOP_NAME

PINS = ("clk", "rst", "si", "so")


def _header(comment: str, freq_mhz: float, what: str) -> str:
    return (f"{comment} {what} template for {TOP_NAME} (ndpmoe NDP unit in its pin wrapper), "
            f"clock {freq_mhz:g} MHz.\n"
            f"{comment} Fill in the pin sites / I/O standards of your board; the clock line is the "
            f"part that matters.\n")


def xdc(freq_mhz: float) -> str:
    """Vivado (XDC)."""
    pins = " ".join(PINS)
    return (_header("#", freq_mhz, "Vivado XDC")
            + f"create_clock -name clk -period {1e3 / freq_mhz:.3f} [get_ports clk]\n"
            + "".join(f"# set_property PACKAGE_PIN <site> [get_ports {p}]\n" for p in PINS)
            + f"# set_property IOSTANDARD LVCMOS33 [get_ports {{{pins}}}]\n"
            + "set_false_path -from [get_ports {rst si}]\n"
            + "set_false_path -to [get_ports so]\n")


def sdc(freq_mhz: float) -> str:
    """Quartus / generic Synopsys Design Constraints."""
    return (_header("#", freq_mhz, "SDC (Quartus, generic)")
            + f"create_clock -name clk -period {1e3 / freq_mhz:.3f} [get_ports {{clk}}]\n"
            + "derive_clock_uncertainty\n"
            + "set_false_path -from [get_ports {rst si}]\n"
            + "set_false_path -to [get_ports {so}]\n"
            + "".join(f"# set_location_assignment PIN_<site> -to {p}\n" for p in PINS))


def lpf(freq_mhz: float) -> str:
    """Lattice ECP5 (Diamond, nextpnr-ecp5 --lpf)."""
    return (_header("#", freq_mhz, "ECP5 LPF")
            + f'FREQUENCY PORT "clk" {freq_mhz:g} MHZ;\n'
            + "".join(f'# LOCATE COMP "{p}" SITE "<site>";\n# IOBUF PORT "{p}" IO_TYPE=LVCMOS33;\n'
                      for p in PINS))


def pcf(freq_mhz: float) -> str:
    """Lattice iCE40 (nextpnr-ice40 --pcf)."""
    return (_header("#", freq_mhz, "iCE40 PCF")
            + f"set_frequency clk {freq_mhz:g}\n"
            + "".join(f"# set_io {p} <pin>\n" for p in PINS))


TEMPLATES = {"xdc": xdc, "sdc": sdc, "lpf": lpf, "pcf": pcf}
