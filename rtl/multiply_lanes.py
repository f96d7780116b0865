"""Multiply lanes: unsigned code x int8 activation per lane and token, summed per block.

L lanes x tokens_parallel tokens multiply every cycle. A lane's multiplier is only as wide as the
widest code it ever sees (8-bit codes use the first L/4 lanes, 4-bit the first L/2, 2- and 3-bit
all of them), so most lanes are 2x8 or 3x8 bit products: a few LUTs, no DSP.
The zero point is not subtracted here: sum((q - z) x) = sum(q x) - z sum(x), and the group stage
does that once per group with the buffer's precomputed sum(x).

A product is written out as a sum of shifted partial products (activation AND code bit), not a
`*`: Yosys would put every low-bit product in a DSP block (or, in LUTs, chain its partial products
into one slow carry chain). Codes of up to PRODUCT_STAGE_BITS bits are multiplied in one cycle
(two adder levels); wider codes in PRODUCT_STAGE_BITS-bit slices whose registered products are
summed the next cycle. All lanes wait alike, then K blocks of `block` lanes are summed by a tree
with a register after every level; a `tag` travels alongside with the same latency.
"""
from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, Value, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from model.contract import ACT_BITS

from .act_buffer import acts_layout
from .adder_tree import block_sums
from .geometry import Geometry, log2, signed_bits_for
from .unpacker import codes_layout


PRODUCT_STAGE_BITS = 4      # code bits multiplied in one cycle


def _code_times_act(m: Module, code: Value, act: Value, name: str) -> Value:
    """unsigned code x signed activation as a balanced sum of (act AND code bit) << bit.

    The inner sums are kept wires: without them Yosys's alumacc merges the whole sum into one
    $macc and maps it to a tree of full adders in LUTs (twice the depth of two carry chains)."""
    terms = [Mux(code[i], act.as_signed() << i, 0) for i in range(len(code))]
    depth = 0
    while len(terms) > 2:
        nxt = []
        for i in range(0, len(terms), 2):
            if i + 1 == len(terms):
                nxt.append(terms[i])
                continue
            total = terms[i] + terms[i + 1]
            w = Signal(total.shape(), name=f"{name}_d{depth}_{i // 2}", attrs={"keep": 1})
            m.d.comb += w.eq(total)
            nxt.append(w)
        terms, depth = nxt, depth + 1
    return terms[0] + terms[1] if len(terms) == 2 else terms[0]


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
    def product_latency(self) -> int:
        return 2 if max(self._geo.cfg.bits) > PRODUCT_STAGE_BITS else 1

    @property
    def latency(self) -> int:
        return self.product_latency + log2(self._geo.block)

    def elaborate(self, platform):
        m = Module()
        g = self._geo
        for t in range(g.tokens_parallel):
            products = []
            for j in range(g.lanes):
                width = g.lane_code_bits(j)
                code, act = self.codes[j][:width], self.acts[t][j]
                slices = []
                for i, lo in enumerate(range(0, width, PRODUCT_STAGE_BITS)):
                    hi = min(width, lo + PRODUCT_STAGE_BITS)
                    part = Signal(signed(hi - lo + ACT_BITS + 1), name=f"prod_t{t}_l{j}_s{i}")
                    m.d.sync += part.eq(_code_times_act(m, code[lo:hi], act, f"pp_t{t}_l{j}_s{i}"))
                    slices.append((part, lo))
                if self.product_latency == 1:
                    (p, _), = slices
                else:
                    p = Signal(signed(width + ACT_BITS + 1), name=f"prod_t{t}_l{j}")
                    m.d.sync += p.eq(sum(part << lo for part, lo in slices))
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
