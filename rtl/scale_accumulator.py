"""Zero correction, group-scale multiply and the wide per-row accumulation.

Per complete group (model/contract.py, "NDP arithmetic"):

    term = 2^ZERO_FRAC_BITS * sum(q x) - zero * sum(x)        zero is Q11.4
    acc += scale * term                                        ACC_BITS, cannot overflow

Registered stages: the zero multiply (2: a DSP with its operand and product registers,
rtl/hard_blocks.py), the term, the scale multiply split in two DSP-sized halves (2), their sum,
the sum of the K slots (a tree with a register per level), the accumulator (carry-save, in ACC_PARTS parts),
the resolved result. The accumulators are kept per pass and per token
lane; a row's last beat of a pass emits that pass's results as one entry and clears them. The
descriptor's last beat marks its last entry (`last`).

`passes` is per descriptor: a beat at the inputs in cycle t uses it as it was in cycle
t + `passes_at`.
"""
from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from ndpmoe.model.contract import (ACC_BITS, GROUP_QX_BITS, GROUP_X_BITS, SCALE_BITS, ZERO_BITS,
                            ZERO_FRAC_BITS)

from .adder_tree import block_sums
from .fanout import register_copies
from .geometry import Geometry, log2
from .group_combiner import group_slots_layout
from .hard_blocks import PRODUCT_LATENCY, registered_product

# 2^F sum(q x) - zero sum(x): the wider of the two operands plus one bit for the difference.
GROUP_TERM_BITS = max(GROUP_QX_BITS + ZERO_FRAC_BITS, ZERO_BITS + GROUP_X_BITS) + 1
ACC_PARTS = 3                                   # parts of a carry-save accumulator
ACC_PART_BITS = tuple(ACC_BITS // ACC_PARTS + (i < ACC_BITS % ACC_PARTS) for i in range(ACC_PARTS))
ACC_PART_OFFSETS = tuple(sum(ACC_PART_BITS[:i]) for i in range(ACC_PARTS))


def entry_layout(g: Geometry) -> data.StructLayout:
    """One row's results for the tokens of one pass."""
    return data.StructLayout({
        "values": data.ArrayLayout(signed(ACC_BITS), g.tokens_parallel),
        "row": g.row_bits,
        "pass_": g.pass_bits,
        "last": 1,                      # the descriptor's last entry
    })


class ScaleAccumulator(wiring.Component):
    """Ports in: `valid` (a CODE beat), `pass_`, `row_end`, `row`, `last`, `groups`, `passes`
    (per descriptor, see `passes_at`).
    Out: `entry` (always-ready stream: a row's values for one pass)."""

    def __init__(self, geometry: Geometry):
        if not isinstance(geometry, Geometry):
            raise TypeError(f"geometry must be a Geometry, not {geometry!r}")
        self._geo = g = geometry
        super().__init__({
            "valid": In(1),
            "pass_": In(g.pass_bits),
            "row_end": In(1),
            "row": In(g.row_bits),
            "last": In(1),
            "groups": In(group_slots_layout(g)),
            "passes": In(range(g.max_passes + 1)),
            "entry": Out(stream.Signature(entry_layout(g), always_ready=True)),
        })

    @property
    def latency(self) -> int:
        return self._stages + 2

    @property
    def _stages(self) -> int:
        """Cycles from the inputs to the accumulators: the two products, the term, the two
        halves' sum, the slot tree."""
        return 2 * PRODUCT_LATENCY + 2 + log2(self._geo.blocks)

    @property
    def passes_at(self) -> int:
        """Cycle, relative to a beat's arrival, whose `passes` steers its accumulators (decoded
        and copied over two registers ahead of them)."""
        return self._stages - 2

    def elaborate(self, platform):
        m = Module()
        g = self._geo
        K, TP = g.blocks, g.tokens_parallel
        grp = self.groups

        # Beat fields delayed alongside the arithmetic.
        def delay(value, cycles, name):
            for i in range(cycles):
                d = Signal.like(value, name=f"{name}_d{i}")
                m.d.sync += d.eq(value)
                value = d
            return value

        # Stages 1-2: zero x sum(x) (2^F sum(q x) delayed alongside); stage 3: their difference
        # (the term); stages 4-5: scale x the term's low 17 bits (unsigned) and high bits
        # (signed), each an 18x18 DSP multiply; stage 6: the two halves added; then the slot tree.
        split = 17
        tree_latency = log2(K)
        zx_stage = PRODUCT_LATENCY
        term_stage = zx_stage + 1
        prod_stage = term_stage + PRODUCT_LATENCY + 1
        stages = prod_stage + tree_latency
        assert stages == self._stages
        valid = delay(self.valid, stages, "valid")
        pass_ = delay(self.pass_, stages, "pass")
        row_end = delay(self.row_end, stages, "row_end")
        row = delay(self.row, stages, "row")
        ends_run = delay(self.last, stages, "last")
        # valid and row_end steer every accumulator bit: one copy per token lane (rtl/fanout.py)
        flags = register_copies(m, Cat(delay(self.valid, stages - 1, "valid_c"),
                                       delay(self.row_end, stages - 1, "row_end_c")), TP, "acc_flags", platform)

        scale_at_term = [delay(grp.scale[k], term_stage, f"scale_{k}") for k in range(K)]
        # "pass p is the last live one", decoded, one copy per token lane (each bit steers an
        # accumulator's multiplexers); `passes` is set long before the first beat
        is_last = Signal(g.max_passes)
        m.d.sync += is_last.eq(Cat(*(self.passes - 1 == p for p in range(g.max_passes))))
        last_copies = register_copies(m, is_last, TP, "is_last", platform)
        emit = Signal()
        emit_row, emit_pass, emit_last = Signal.like(self.row), Signal.like(self.pass_), Signal()
        for t in range(TP):
            products = []
            for k in range(K):
                qx16 = delay((grp.qx[t][k] << ZERO_FRAC_BITS)[:GROUP_QX_BITS + ZERO_FRAC_BITS].as_signed(),
                             zx_stage, f"qx16_t{t}_{k}")
                zx = registered_product(m, grp.zero[k], grp.x[t][k], f"zx_t{t}_{k}", platform)
                term = Signal(signed(GROUP_TERM_BITS), name=f"term_t{t}_{k}")
                m.d.sync += term.eq(qx16 - zx)
                lo = registered_product(m, term[:split], scale_at_term[k], f"prod_lo_t{t}_{k}", platform)
                hi = registered_product(m, term[split:].as_signed(), scale_at_term[k], f"prod_hi_t{t}_{k}",
                                        platform)
                prod = Signal(signed(GROUP_TERM_BITS + SCALE_BITS), name=f"prod_t{t}_{k}")
                m.d.sync += prod.eq((hi << split) + lo)
                products.append(prod)
            (beat_sum,), _ = block_sums(m, products, K, f"slots_t{t}")

            # Beats come in passes 0, 1, .. passes-1, 0, .. so the accumulators rotate: a beat
            # adds to the head and pushes the sum (0 after a row's end) behind the last live pass,
            # and no multiplexer on the pass number sits ahead of the adders. Each accumulator is
            # kept in ACC_PARTS parts, each part's carry added into the next part at the next beat
            # (value = sum over parts of (part + carry in) << offset), so no adder in the loop is
            # wider than a part.
            bs = Signal(signed(ACC_BITS), name=f"beat_sum_t{t}")
            m.d.comb += bs.eq(beat_sum)
            acc = [[Signal(w, name=f"acc_{i}_t{t}_p{p}") for i, w in enumerate(ACC_PART_BITS)]
                   for p in range(g.max_passes)]
            cin = [[Signal(name=f"acc_c{i}_t{t}_p{p}") for i in range(1, ACC_PARTS)] for p in range(g.max_passes)]
            new_parts, new_carries = [], []
            for i, (w, off) in enumerate(zip(ACC_PART_BITS, ACC_PART_OFFSETS)):
                b = bs[off:off + w]
                if i == 0:
                    total = acc[0][0] + b
                else:                       # part + b + carry in, in one adder: the carry enters at bit 1
                    total = (Cat(cin[0][i - 1], acc[0][i]) + Cat(Const(1, 1), b))[1:]
                new_parts.append(total[:w])
                if i + 1 < ACC_PARTS:
                    new_carries.append(total[w])
            valid_t, row_end_t = flags[t][0], flags[t][1]
            with m.If(valid_t):
                for p in range(g.max_passes):
                    last = last_copies[t][p]
                    regs = acc[p] + cin[p]
                    news = new_parts + new_carries
                    nxts = acc[p + 1] + cin[p + 1] if p + 1 < g.max_passes else [0] * len(regs)
                    for reg, new, n in zip(regs, news, nxts):
                        m.d.sync += reg.eq(Mux(last, Mux(row_end_t, 0, new), n))
            # a row's result: the parts and carries registered, then resolved into the entry
            emit_parts = [Signal(w, name=f"emit_{i}_t{t}") for i, w in enumerate(ACC_PART_BITS)]
            emit_carries = [Signal(name=f"emit_c{i}_t{t}") for i in range(1, ACC_PARTS)]
            with m.If(valid & row_end):
                m.d.sync += [r.eq(v) for r, v in zip(emit_parts + emit_carries, new_parts + new_carries)]
            carries = Signal(ACC_BITS)
            m.d.comb += [carries[off].eq(c) for off, c in zip(ACC_PART_OFFSETS[1:], emit_carries)]
            with m.If(emit):
                m.d.sync += self.entry.payload.values[t].eq((Cat(*emit_parts) + carries)[:ACC_BITS])

        m.d.sync += [emit.eq(valid & row_end), self.entry.valid.eq(emit)]
        with m.If(valid & row_end):
            m.d.sync += [emit_row.eq(row), emit_pass.eq(pass_), emit_last.eq(ends_run)]
        with m.If(emit):
            m.d.sync += [self.entry.payload.row.eq(emit_row), self.entry.payload.pass_.eq(emit_pass),
                         self.entry.payload.last.eq(emit_last)]
        return m
