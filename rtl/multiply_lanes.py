"""Multiply lanes: unsigned code x int8 activation per lane and token, summed per block.

L lanes x tokens_parallel tokens multiply every cycle. A lane's multiplier is only as wide as the
widest code it ever sees (8-bit codes use the first L/4 lanes, 4-bit the first L/2, 2- and 3-bit
all of them), so most lanes are 2x8 or 3x8 bit products: a few LUTs, no DSP.
The zero point is not subtracted here: sum((q - z) x) = sum(q x) - z sum(x), and the group stage
does that once per group with the buffer's precomputed sum(x).

The codes (one copy per token) and activations are registered at the lanes first: they come
from the unpacker and the activation buffer across the device. A product is written out as a
sum of shifted partial products (activation AND code bit), not a `*`: Yosys would put every
low-bit product in a DSP block (or, in LUTs, chain its partial products into one slow carry
chain). The sum is a tree with a register after every adder level: codes are multiplied in
PRODUCT_STAGE_BITS-bit slices, whose shifted products are summed by a registered tree too. All
lanes wait alike (`product_latency`), then K blocks of `block` lanes are summed by a tree with
a register after every level; a `tag` travels alongside with the same latency.
"""
from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, Value, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from ndpmoe.model.contract import ACT_BITS

from .act_buffer import acts_layout
from .adder_tree import block_sums
from .fanout import register_copies
from .geometry import Geometry, log2, signed_bits_for
from .unpacker import codes_layout


PRODUCT_STAGE_BITS = 4      # code bits multiplied in one cycle


def _registered_sum(m: Module, terms: list, name: str) -> tuple[Value, int]:
    """Sum of `terms` by a balanced adder tree with a register after every level; returns the
    sum and its latency (0 for a single term)."""
    depth = 0
    while len(terms) > 1:
        nxt = []
        for i in range(0, len(terms), 2):
            if i + 1 == len(terms):
                carried = Signal(Value.cast(terms[i]).shape(), name=f"{name}_d{depth}_{i // 2}")
                m.d.sync += carried.eq(terms[i])
                nxt.append(carried)
                continue
            total = terms[i] + terms[i + 1]
            w = Signal(total.shape(), name=f"{name}_d{depth}_{i // 2}")
            m.d.sync += w.eq(total)
            nxt.append(w)
        terms, depth = nxt, depth + 1
    return terms[0], depth


def _delay(m: Module, value, cycles: int, name: str) -> Value:
    for i in range(cycles):
        d = Signal(Value.cast(value).shape(), name=f"{name}_w{i}")
        m.d.sync += d.eq(value)
        value = d
    return value


def _levels(n: int) -> int:
    return max(0, (n - 1).bit_length())


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

    def _slices(self, width: int) -> list[tuple[int, int]]:
        return [(lo, min(width, lo + PRODUCT_STAGE_BITS)) for lo in range(0, width, PRODUCT_STAGE_BITS)]

    def _lane_latency(self, width: int) -> int:
        slices = self._slices(width)
        return max(_levels(hi - lo) for lo, hi in slices) + _levels(len(slices))

    @property
    def product_latency(self) -> int:
        """Input registers plus the slowest lane's product tree."""
        g = self._geo
        return 1 + max(max(1, self._lane_latency(g.lane_code_bits(j))) for j in range(g.lanes))

    @property
    def latency(self) -> int:
        return self.product_latency + log2(self._geo.block)

    def elaborate(self, platform):
        m = Module()
        g = self._geo
        # each token's lanes take the codes through a copy of their own (rtl/fanout.py: plain
        # registers of the same input would be merged into one by Yosys)
        code_copies = [register_copies(m, self.codes[j][:g.lane_code_bits(j)], g.tokens_parallel, f"code_l{j}",
                                       platform, distinct=False) for j in range(g.lanes)]
        for t in range(g.tokens_parallel):
            products = []
            for j in range(g.lanes):
                code = code_copies[j][t]
                act = Signal(signed(ACT_BITS), name=f"act_t{t}_l{j}")
                m.d.sync += act.eq(self.acts[t][j])
                slices = self._slices(len(code))
                slice_levels = max(_levels(hi - lo) for lo, hi in slices)
                parts = []
                for i, (lo, hi) in enumerate(slices):
                    terms = [Mux(code[b], act.as_signed() << (b - lo), 0) for b in range(lo, hi)]
                    part, levels = _registered_sum(m, terms, f"pp_t{t}_l{j}_s{i}")
                    parts.append(_delay(m, part, slice_levels - levels, f"pp_t{t}_l{j}_s{i}") << lo)
                p, levels = _registered_sum(m, parts, f"prod_t{t}_l{j}")
                p = _delay(m, p, self.product_latency - 1 - slice_levels - levels, f"prod_t{t}_l{j}")
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
