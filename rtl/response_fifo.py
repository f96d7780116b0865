"""The memory's response words into a small LUT-RAM FIFO before the unit consumes them.

Without it the consumer's decision (a beat issues, an activation word is taken) would be the
memory's `ready` combinationally, and that decision is several LUT levels deep; here `ready` is
a register, the words are written at the memory handshake, and the consumer only moves a read
pointer. The words come out of the LUT RAM asynchronously, so a word that arrives in cycle t is
available from cycle t + 1.
"""
from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, unsigned
from amaranth.lib import memory, stream, wiring
from amaranth.lib.wiring import In, Out

DEPTH = 16


class ResponseFifo(wiring.Component):
    """Ports: `i` (In stream of words, `ready` registered), `o` (Out stream, `valid`
    registered), `empty` (registered with `valid`: no word stored; one pushed this cycle shows
    from the next), `hold_next` (In) and `valid_unheld` (Out, registered: `o.valid` in a cycle
    whose `hold_next` was low in the cycle before, for a consumer that must leave the words to
    another one while that one takes them, without one more term in its own decision)."""

    def __init__(self, word_bits: int, depth: int = DEPTH):
        if not isinstance(depth, int) or depth < 4 or depth & (depth - 1):
            self._MustUse__silence = True          # refused: not an unused design
            raise ValueError(f"response FIFO depth must be a power of two >= 4, not {depth!r}")
        self._depth = depth
        super().__init__({
            "i": In(stream.Signature(unsigned(word_bits))),
            "o": Out(stream.Signature(unsigned(word_bits))),
            "empty": Out(1),
            "hold_next": In(1),
            "valid_unheld": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        depth = self._depth
        m.submodules.storage = storage = memory.Memory(shape=self.i.payload.shape(), depth=depth, init=[])
        wp, rp = storage.write_port(), storage.read_port(domain="comb")
        produce = Signal(range(depth))
        consume = Signal(range(depth))
        level = Signal(range(depth + 1))
        ready = Signal(init=1)
        nonempty = Signal()
        valid_unheld = Signal()
        push = self.i.valid & ready
        pop = self.o.valid & self.o.ready
        m.d.comb += [
            self.i.ready.eq(ready), self.o.valid.eq(nonempty), self.o.payload.eq(rp.data),
            wp.addr.eq(produce), wp.data.eq(self.i.payload), wp.en.eq(push), rp.addr.eq(consume),
            self.empty.eq(~nonempty), self.valid_unheld.eq(valid_unheld),
        ]
        with m.If(push):
            m.d.sync += produce.eq(produce + 1)
        with m.If(pop):
            m.d.sync += consume.eq(consume + 1)
        nonempty_next = push | (level >= 2) | ((level == 1) & ~pop)
        m.d.sync += [
            level.eq(Mux(push, Mux(pop, level, level + 1), Mux(pop, level - 1, level))),
            nonempty.eq(nonempty_next),
            valid_unheld.eq(nonempty_next & ~self.hold_next),
            # room next cycle whatever is popped: level + push stays below depth
            ready.eq(Mux(push, level <= depth - 2, level <= depth - 1)),
        ]
        return m
