"""Multiply lanes: unsigned code x int8 activation per lane and token, summed per block.

L lanes x tokens_parallel tokens multiply every cycle. A lane's multiplier is only as wide as the
widest code it ever sees (8-bit codes use the first L/4 lanes, 4-bit the first L/2, 2- and 3-bit
all of them), so most lanes are 2x8 or 3x8 bit products: a few LUTs, no DSP.
The zero point is not subtracted here: sum((q - z) x) = sum(q x) - z sum(x), and the group stage
does that once per group with the buffer's precomputed sum(x).

Products are registered, then summed to K blocks of `block` lanes by a tree with a register
after every level; a `tag` travels alongside with the same latency.
"""
from __future__ import annotations

from amaranth.hdl import Module, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from model.contract import ACT_BITS

from .act_buffer import acts_layout
from .adder_tree import block_sums
from .geometry import Geometry, log2, signed_bits_for
from .unpacker import codes_layout


def block_sum_bits(g: Geometry) -> int:
    return signed_bits_for(g.block * ((1 << max(g.cfg.bits)) - 1) * (1 << (ACT_BITS - 1)))


def sums_layout(g: Geometry) -> data.ArrayLayout:
    return data.ArrayLayout(data.ArrayLayout(signed(block_sum_bits(g)), g.blocks), g.tokens_parallel)


class MultiplyLanes(wiring.Component):
    """Ports: `valid`, `codes`, `acts`, `tag_in`; `latency` cycles later `valid_out`, `sums`
    (per token lane, per block: sum of code x activation), `tag_out`."""

    def __init__(self, geometry: Geometry, tag_shape):
        if not isinstance(geometry, Geometry):
            raise TypeError(f"geometry must be a Geometry, not {geometry!r}")
        self._geo = g = geometry
        self._tag_shape = tag_shape
        super().__init__({
            "valid": In(1),
            "codes": In(codes_layout(g)),
            "acts": In(acts_layout(g)),
            "tag_in": In(tag_shape),
            "valid_out": Out(1),
            "sums": Out(sums_layout(g)),
            "tag_out": Out(tag_shape),
        })

    @property
    def latency(self) -> int:
        return 1 + log2(self._geo.block)

    def elaborate(self, platform):
        m = Module()
        g = self._geo
        for t in range(g.tokens_parallel):
            products = []
            for j in range(g.lanes):
                code = self.codes[j][:g.lane_code_bits(j)]
                p = Signal(signed(g.lane_code_bits(j) + ACT_BITS + 1), name=f"prod_t{t}_l{j}")
                m.d.sync += p.eq(code * self.acts[t][j])
                products.append(p)
            sums, _ = block_sums(m, products, g.block, f"qx_t{t}")
            for k, s in enumerate(sums):
                m.d.comb += self.sums[t][k].eq(s)

        valid, tag = self.valid, self.tag_in
        for i in range(self.latency):
            v, tg = Signal(name=f"valid_d{i}"), Signal(self._tag_shape, name=f"tag_d{i}")
            m.d.sync += [v.eq(valid), tg.eq(tag)]
            valid, tag = v, tg
        m.d.comb += [self.valid_out.eq(valid), self.tag_out.eq(tag)]
        return m
