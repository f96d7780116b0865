"""FPGA evaluation flow for the NDP unit: a pin-light wrapper, Yosys + nextpnr (YoWASP) runs,
reports of resources and Fmax, a configuration sweep and a Verilog + constraints export.

Nothing here changes the design: it wraps whatever component `design.build_top(cfg)` returns.
"""
