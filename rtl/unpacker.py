"""Unpacker: one memory word -> the b-bit codes of a code beat, b chosen per descriptor.

    b in {2, 4, 8}: code i = word[b*i : b*i + b], P / b codes;
    b = 3:          the hi-plane word (the first of each block) is latched when its beat passes;
                    each lo word then gives P / 2 codes: lo = word[2i : 2i + 2],
                    hi = plane[i + P/2 * lo_half], code = hi << 2 | lo.

So the memory side never bubbles for 3-bit: the hi word takes its own beat and costs nothing
else. Lanes past the format's N_c codes get code 0 (their products vanish). Two cycles latency
(LATENCY): the word and the format decoded one-hot are registered (and a hi-plane word latched
from there), then each code bit is an AND-OR of at most four sources, registered; a `tag` (any shape)
travels alongside.
"""
from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .fanout import copy_tree, copy_tree_latency, register_copies
from .geometry import Geometry
from .sequencer import BeatKind

LATENCY = 2
LANE_GROUP = 4          # lanes sharing one copy of `bits` (decoded)
PLANE_SLICE_BITS = 16   # hi-plane bits per copy of its enable


def codes_layout(g: Geometry) -> data.ArrayLayout:
    return data.ArrayLayout(unsigned(8), g.lanes)


class Unpacker(wiring.Component):
    """Ports: `valid`, `kind`, `lo_half`, `word`, `bits` (per descriptor: it reaches the lanes
    through a tree of copies, so a beat at the input in cycle t is unpacked with `bits` as it
    was in cycle t + `bits_at`, a negative offset), `tag_in`; LATENCY cycles later `codes`
    (meaningful for CODE beats), `valid_out`, `tag_out`."""

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

    @property
    def bits_at(self) -> int:
        """Cycle, relative to a beat's arrival, whose `bits` the beat is unpacked with: stage B
        (a cycle after the input) reads `bits` through its tree of copies."""
        return 1 - copy_tree_latency(-(-self._geo.lanes // LANE_GROUP))

    def elaborate(self, platform):
        m = Module()
        g = self._geo
        half = g.word_bits // 2
        word = self.word

        # Stage A: the word, whether it is a hi-plane word (a copy of that enable per slice of
        # the plane), lo_half, and `bits` decoded one-hot, which reaches each group of
        # LANE_GROUP lanes through its own copy. The plane is latched from stage A's word, in
        # time for a lo word right behind it.
        word_a = Signal(g.word_bits)
        m.d.sync += word_a.eq(word)
        if 3 in g.cfg.bits:
            plane = Signal(g.word_bits)
            slices = -(-g.word_bits // PLANE_SLICE_BITS)
            plane_en = register_copies(m, self.valid & (self.kind == BeatKind.HI), slices, "plane_en", platform,
                                       distinct=False)
            for i in range(slices):
                bits_i = slice(i * PLANE_SLICE_BITS, min(g.word_bits, (i + 1) * PLANE_SLICE_BITS))
                with m.If(plane_en[i]):
                    m.d.sync += plane[bits_i].eq(word_a[bits_i])
        groups = -(-g.lanes // LANE_GROUP)
        if 3 in g.cfg.bits:
            # lo_half steers half the lanes' hi-plane multiplexers: a copy per group of lanes
            lo_half_a = register_copies(m, self.lo_half, groups, "lo_half", platform, distinct=False)
        bits = list(g.cfg.bits)
        sel_copies, _ = copy_tree(m, Cat(*(self.bits == b for b in bits)), groups, "bits_sel", platform)

        # Stage B: code bit = OR over formats of (format selected & its source bit).
        for j in range(g.lanes):
            sel = sel_copies[j // LANE_GROUP]
            code = Signal(8, name=f"code{j}")
            for k in range(8):
                terms = []
                for i, b in enumerate(bits):
                    if j >= g.codes_per_beat(b):
                        continue
                    if b == 3:
                        hi = Mux(lo_half_a[j // LANE_GROUP], plane[half + j], plane[j]) if j < half else None
                        src = word_a[2 * j + k] if k < 2 else (hi if k == 2 else None)
                    else:
                        src = word_a[b * j + k] if k < b else None
                    if src is not None:
                        terms.append(sel[i] & src)
                if terms:
                    m.d.comb += code[k].eq(Cat(*terms).any())
            m.d.sync += self.codes[j].eq(code)

        valid_a, tag_a = Signal(), Signal.like(self.tag_in)
        m.d.sync += [valid_a.eq(self.valid), tag_a.eq(self.tag_in),
                     self.valid_out.eq(valid_a), self.tag_out.eq(tag_a)]
        return m
