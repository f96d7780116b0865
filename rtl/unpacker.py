"""Unpacker: one memory word -> the b-bit codes of a code beat, b chosen per descriptor.

    b in {2, 4, 8}: code i = word[b*i : b*i + b], P / b codes;
    b = 3:          the hi-plane word (the first of each block) is latched when its beat passes;
                    each lo word then gives P / 2 codes: lo = word[2i : 2i + 2],
                    hi = plane[i + P/2 * lo_half], code = hi << 2 | lo.

So the memory side never bubbles for 3-bit: the hi word takes its own beat and costs nothing
else. Lanes past the format's N_c codes get code 0 (their products vanish). One cycle latency:
the codes are registered, and a `tag` (any shape) travels alongside.
"""
from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .fanout import register_copies
from .geometry import Geometry
from .sequencer import BeatKind

LATENCY = 1
LANE_GROUP = 8          # lanes sharing one copy of `bits`


def codes_layout(g: Geometry) -> data.ArrayLayout:
    return data.ArrayLayout(unsigned(8), g.lanes)


class Unpacker(wiring.Component):
    """Ports: `valid`, `kind`, `lo_half`, `word`, `bits` (held per descriptor, set a cycle
    before the first beat), `tag_in`;
    one cycle later `codes` (meaningful for CODE beats), `valid_out`, `tag_out`."""

    def __init__(self, geometry: Geometry, tag_shape):
        if not isinstance(geometry, Geometry):
            raise TypeError(f"geometry must be a Geometry, not {geometry!r}")
        self._geo = g = geometry
        super().__init__({
            "valid": In(1),
            "kind": In(BeatKind),
            "lo_half": In(1),
            "word": In(g.word_bits),
            "bits": In(4),
            "tag_in": In(tag_shape),
            "codes": Out(codes_layout(g)),
            "valid_out": Out(1),
            "tag_out": Out(tag_shape),
        })

    def elaborate(self, platform):
        m = Module()
        g = self._geo
        half = g.word_bits // 2
        word = self.word

        if 3 in g.cfg.bits:
            plane = Signal(g.word_bits)
            with m.If(self.valid & (self.kind == BeatKind.HI)):
                m.d.sync += plane.eq(word)

        # `bits` (held per descriptor) reaches each group of LANE_GROUP lanes through its own copy
        groups = -(-g.lanes // LANE_GROUP)
        bits_copies = register_copies(m, self.bits, groups, "bits", platform)
        for j in range(g.lanes):
            code = Signal(8, name=f"code{j}")
            with m.Switch(bits_copies[j // LANE_GROUP]):
                for b in g.cfg.bits:
                    if j >= g.codes_per_beat(b):
                        continue
                    with m.Case(b):
                        if b == 3:
                            hi = Mux(self.lo_half, plane[half + j], plane[j])
                            m.d.comb += code.eq(word[2 * j:2 * j + 2] | (hi << 2))
                        else:
                            m.d.comb += code.eq(word[b * j:b * (j + 1)])
            m.d.sync += self.codes[j].eq(code)

        m.d.sync += [self.valid_out.eq(self.valid), self.tag_out.eq(self.tag_in)]
        return m
