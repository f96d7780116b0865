"""A register slice for a valid/ready stream at the unit's edge (an AXI-style skid buffer).

The consumer's `ready` comes from outside the unit and reaches only this slice: the output
register's load enable and the skid select. Inside, `i.ready` is a register, so the unit's
own decisions (the result FIFO's read pointer, the serializer) never wait on the outside.
Full throughput (a transfer every cycle while `o.ready` stays high), one cycle of latency,
order and payloads unchanged. With `gap_after` (the name of a 1-bit field of the payload) the
output stays empty for the cycle after a word with that field set leaves: the unit's result port
uses it after a descriptor's last result, so the next descriptor's first result never leaves in
the cycle where the end of the one before is registered (its counts stay apart).
"""
from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, Value
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from .fanout import bit_slices, register_copies

SELECT_SLICE_BITS = 16      # payload bits per copy of the skid select


class RegisterSlice(wiring.Component):
    """Ports: `i` (In stream, `ready` registered), `o` (Out stream, `valid` and `payload`
    registered), `empty` (nothing held: neither the output register nor the skid)."""

    def __init__(self, shape, *, gap_after: str | None = None):
        if gap_after is not None and gap_after not in dict(shape):
            self._MustUse__silence = True          # refused: not an unused design
            raise ValueError(f"gap_after must name a field of the payload {shape!r}, not {gap_after!r}")
        self._gap_after = gap_after
        super().__init__({
            "i": In(stream.Signature(shape)),
            "o": Out(stream.Signature(shape)),
            "empty": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        skid = Signal.like(self.i.payload)
        skid_valid = Signal()
        m.d.comb += [self.i.ready.eq(~skid_valid), self.empty.eq(~self.o.valid & ~skid_valid)]
        taken = self.i.valid & ~skid_valid
        # an empty skid follows the incoming word, so its load enable is one flip-flop and only
        # skid_valid depends on the consumer's ready
        with m.If(~skid_valid):
            m.d.sync += skid.eq(self.i.payload)
        gap = Signal()          # the word leaving now ends its run: the output empties for a cycle
        if self._gap_after is not None:
            m.d.comb += gap.eq(self.o.valid & self.o.ready & getattr(self.o.payload, self._gap_after))
        skid_next = Signal()
        move = Signal()         # the output register moves on: the skid's word first, else the incoming one
        m.d.comb += skid_next.eq(skid_valid)
        with m.If(gap):
            m.d.sync += self.o.valid.eq(0)
            with m.If(taken):
                m.d.comb += skid_next.eq(1)
        with m.Elif(self.o.ready | ~self.o.valid):
            m.d.comb += move.eq(1)
            with m.If(skid_valid):
                m.d.sync += self.o.valid.eq(1)
                m.d.comb += skid_next.eq(0)
            with m.Else():
                m.d.sync += self.o.valid.eq(self.i.valid)
        with m.Elif(taken):
            # the output register holds: an incoming word waits in the skid (i.ready was high)
            m.d.comb += skid_next.eq(1)
        m.d.sync += skid_valid.eq(skid_next)
        # the skid select reaches every payload bit: a copy of skid_valid per slice of them
        payload, skid_bits, incoming = (Value.cast(v) for v in (self.o.payload, skid, self.i.payload))
        slices = bit_slices(len(payload), SELECT_SLICE_BITS)
        selects = register_copies(m, skid_next, len(slices), "skid_sel", platform, distinct=False)
        for bits, sel in zip(slices, selects):
            with m.If(move):
                m.d.sync += payload[bits].eq(Mux(sel, skid_bits[bits], incoming[bits]))
        return m
