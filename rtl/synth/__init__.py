"""FPGA evaluation flow for the NDP unit: a pin-light wrapper, Yosys + nextpnr (YoWASP) runs,
reports of resources and Fmax, a configuration sweep and a Verilog + constraints export.

    ndpmoe synth --config default --target ecp5-85k [--freq 150] [--speed 6] [--json r.json]
    ndpmoe fpga-sweep --target ecp5-85k [--word-bits 64,128,256 --bits 2348,248,48 --t-max 2,8,32]
    ndpmoe fpga-export --config default [--freq 150] [--out DIR]

Modules, one job each: targets (device flags), wrapper (four-pin top), design (which component,
Verilog), flow (tool runs), report (parse tool output), run (one run end to end), throughput
(bandwidth and GMAC/s from Fmax), sweep (points, table, plot), constraints (XDC/SDC/LPF/PCF),
cmd_* (the subcommands). Builds go to build/fpga/ (gitignored). Nothing here changes the
design: it wraps whatever `design.ndp_unit(cfg)` returns.
"""
