"""The command queue: descriptors the host has handed over and the unit has not yet checked.

A few registers deep, so the host can hand over the next descriptors while one runs. `i.ready` is
a register and falls for the cycle after every transfer (a descriptor is taken at most every
other cycle, far faster than the unit checks them): a driver that waits for `ready` to fall
after presenting a descriptor sees each transfer, as with a unit that takes one at a time.
The entries are a ring of registers; the head (`o.payload`) is the one at the read pointer.
"""
from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, Value
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from .fanout import bit_slices, register_copies

FOLLOW_SLICE_BITS = 16      # entry bits per copy of an entry's load enable


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
        # a ring: a transfer only writes the entry at `produce`, a pop only moves `consume`, so
        # neither handshake reaches more than its own enables
        entries = [Signal.like(self.i.payload, name=f"entry{k}") for k in range(depth)]
        produce = Signal(range(depth))
        consume = Signal(range(depth))
        count = Signal(range(depth + 1))
        ready = Signal(init=1)
        push = self.i.valid & ready
        pop = self.o.valid & self.o.ready
        head = Value.cast(entries[0])
        for k in range(1, depth):
            head = Mux(consume == k, Value.cast(entries[k]), head)
        m.d.comb += [self.i.ready.eq(ready), self.taken.eq(push),
                     self.o.valid.eq(count != 0), self.o.payload.eq(head)]
        produce_next = Mux(push, Mux(produce == depth - 1, 0, produce + 1), produce)
        count_next = count + push - pop
        m.d.sync += [
            produce.eq(produce_next),
            count.eq(count_next),
            ready.eq(~push & ((count < depth) | pop)),
        ]
        with m.If(pop):
            m.d.sync += consume.eq(Mux(consume == depth - 1, 0, consume + 1))
        # The free entry at `produce` follows the incoming payload every cycle, so a transfer
        # writes nothing and only moves `produce`: the entries' load enables are registers,
        # worked out a cycle ahead and copied per slice of the payload (the input's valid
        # would otherwise fan out across every bit of the entry, from wherever the host is).
        payload = Value.cast(self.i.payload)
        slices = bit_slices(len(payload), FOLLOW_SLICE_BITS)
        for k in range(depth):
            # (out of reset the queue is empty and `produce` is 0: entry 0 follows)
            follows = register_copies(m, (produce_next == k) & (count_next < depth), len(slices),
                                      f"follow{k}", platform, init=int(k == 0))
            for bits, follow in zip(slices, follows):
                with m.If(follow):
                    m.d.sync += Value.cast(entries[k])[bits].eq(payload[bits])
        return m
