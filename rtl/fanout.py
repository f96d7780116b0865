"""Registered copies of a net that would otherwise fan out across the whole datapath.

ECP5 routing has no buffers: one register driving a thousand LUTs (the bit-width decode ahead of
every code lane, the alignment offset ahead of every activation lane) spends most of a cycle in
routing. Each group of consumers gets its own copy, registered from the same source.

Yosys merges flip-flops with equal inputs (a `keep` on the wire does not stop it), so copy k
takes a different reset value (k): the copies are different cells, equal one cycle after the
source is written. A per-descriptor setting used through a copy must therefore be written a
cycle before its first use.
"""
from __future__ import annotations

from amaranth.hdl import Module, Signal, Value


def register_copies(m: Module, value, copies: int, name: str) -> list[Signal]:
    """`copies` registers of `value` (one cycle later), each its own flip-flops."""
    value = Value.cast(value)
    out = []
    for k in range(copies):
        # beyond 2^width copies the reset values repeat (and Yosys may merge those copies)
        r = Signal(len(value), name=f"{name}_copy{k}", init=k % (1 << len(value)))
        m.d.sync += r.eq(value)
        out.append(r)
    return out
