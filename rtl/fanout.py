"""Registered copies of a net that would otherwise fan out across the whole datapath.

ECP5 routing has no buffers: one register driving a thousand LUTs (the bit-width decode ahead of
every code lane, the alignment offset ahead of every activation lane) spends most of a cycle in
routing. Each group of consumers gets its own copy, registered from the same source.

Yosys merges flip-flops with equal inputs and equal initial values, bit by bit (opt_merge; a
`keep` on the wire does not stop it), so plain copies collapse to at most two per bit. On ECP5
(rtl/platforms.py) each copy is therefore a TRELLIS_FF instance with the `keep` attribute, which
opt_merge leaves alone. In plain Amaranth copy k takes the reset value k (bit by bit that still
gives up to two distinct copies under Yosys), and the ECP5 instances take the same values, so
both forms behave alike cycle for cycle. A per-descriptor setting used through a copy must
therefore be written a cycle before its first use.
"""
from __future__ import annotations

from amaranth.hdl import ClockSignal, Const, Instance, Module, ResetSignal, Signal, Value

from .platforms import uses_ecp5


def register_copies(m: Module, value, copies: int, name: str, platform=None, *, reset_less: bool = False,
                    distinct: bool = True, init: int | None = None) -> list[Signal]:
    """`copies` registers of `value` (one cycle later), each its own flip-flops on ECP5.

    Copy k resets to k (`distinct`) or to 0, or every copy to `init` where given (a copy of a
    state's next value resets to the state's reset value). With `reset_less` those are power-on
    values only and a reset leaves the copies following `value` (for a write enable, whose copies
    must not come out of a reset asserted)."""
    value = Value.cast(value)
    out = []
    for k in range(copies):
        reset = init if init is not None else k % (1 << len(value)) if distinct else 0
        r = Signal(len(value), name=f"{name}_copy{k}", init=reset, reset_less=reset_less)
        if uses_ecp5(platform):
            for bit in range(len(value)):
                m.submodules[f"{name}_copy{k}_ff{bit}"] = Instance(
                    "TRELLIS_FF", a_keep=1,
                    p_GSR="DISABLED", p_CEMUX="1", p_CLKMUX="CLK", p_LSRMUX="LSR", p_SRMODE="LSR_OVER_CE",
                    p_REGSET="SET" if (reset >> bit) & 1 else "RESET", p_LSRMODE="LSR",
                    i_CLK=ClockSignal(), i_LSR=Const(0, 1) if reset_less else ResetSignal(),
                    i_CE=Const(1, 1), i_DI=value[bit], o_Q=r[bit])   # M left open: nextpnr refuses it tied
        else:
            m.d.sync += r.eq(value)
        out.append(r)
    return out


def bit_slices(width: int, slice_bits: int) -> list[slice]:
    """The bits 0..width-1 in slices of `slice_bits` (the last may be shorter): one per copy of
    an enable or select that reaches every bit."""
    return [slice(i, min(width, i + slice_bits)) for i in range(0, width, slice_bits)]


def copy_tree_latency(leaves: int, branching: int = 8) -> int:
    """Cycles through `copy_tree` for `leaves` copies: 1 up to `branching` leaves, else 2."""
    return 1 if leaves <= branching else 2


def copy_tree(m: Module, value, leaves: int, name: str, platform=None, *, branching: int = 8,
              distinct: bool = True) -> tuple[list[Signal], int]:
    """`leaves` registered copies of `value` through a tree of copies, each register driving at
    most `branching` others (so every copy can sit near what it drives); returns the leaves and
    the tree's latency in cycles (1 for up to `branching` leaves, else 2)."""
    if leaves <= branching:
        return register_copies(m, value, leaves, name, platform, distinct=distinct), 1
    trunks = register_copies(m, value, -(-leaves // branching), f"{name}_trunk", platform, distinct=distinct)
    out = []
    for i, trunk in enumerate(trunks):
        out += register_copies(m, trunk, min(branching, leaves - i * branching), f"{name}_{i}", platform,
                               distinct=distinct)
    return out, 2
