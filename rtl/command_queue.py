"""The command queue: descriptors the host has handed over and the unit has not yet checked.

A few registers deep, so the host can hand over the next descriptors while one runs. `i.ready` is
a register and falls for the cycle after every transfer (a descriptor is taken at most every
other cycle, far faster than the unit checks them): a driver that waits for `ready` to fall
after presenting a descriptor sees each transfer, as with a unit that takes one at a time.
The head is a register (`o.payload`), so whatever the unit does with it starts from a flip-flop.
"""
from __future__ import annotations

from amaranth.hdl import Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out


class CommandQueue(wiring.Component):
    """Ports: `i` (In stream of `shape`), `o` (Out stream, oldest first), `taken` (a transfer on
    `i` in this cycle)."""

    def __init__(self, shape, depth: int = 2):
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"command queue depth must be a positive integer, not {depth!r}")
        self._depth = depth
        super().__init__({
            "i": In(stream.Signature(shape)),
            "o": Out(stream.Signature(shape)),
            "taken": Out(1),
        })

    @property
    def depth(self) -> int:
        return self._depth

    def elaborate(self, platform):
        m = Module()
        depth = self._depth
        entries = [Signal.like(self.i.payload, name=f"entry{k}") for k in range(depth)]
        count = Signal(range(depth + 1))
        ready = Signal(init=1)
        push = self.i.valid & ready
        pop = self.o.valid & self.o.ready
        m.d.comb += [self.i.ready.eq(ready), self.taken.eq(push),
                     self.o.valid.eq(count != 0), self.o.payload.eq(entries[0])]
        # a pop shifts every entry down; a push writes behind the last one left
        with m.If(pop):
            m.d.sync += [entries[k].eq(entries[k + 1]) for k in range(depth - 1)]
        for k in range(depth):
            with m.If(push & (count - pop == k)):
                m.d.sync += entries[k].eq(self.i.payload)
        m.d.sync += [
            count.eq(count + push - pop),
            ready.eq(~push & ((count < depth) | pop)),
        ]
        return m
