"""Descriptor validation and the derived sizes of a run, in a fixed pipeline.

The checks and their order are exactly model.ndp_golden.check_descriptor's: the first failing
check names the error. A refused descriptor never reaches the memory reader.

Every stage is one short carry chain or a few LUT levels, so the check keeps up with the
datapath's clock (the row-length arithmetic in four stages was the unit's critical path on an
ECP5: a multiplier and two carry chains in one cycle). A descriptor waits LATENCY cycles.

    stage 0:    inputs rounded up to whole packing blocks and superblocks, for every format
    stage 1:    field checks; padded inputs, superblocks and weight-word blocks per row
    stage 2:    weight words per row (x3 for 3-bit), activation mismatch, bad in_features
    stage 3:    multiplicands: (rows, words per row) or (tokens, words per token row)
    stages 4-7: their product, a tree of shifted partial products with a register per level
    stage 8:    end address
    stage 9:    end address against the memory size
    stage 10:   priority encoding of the error, outputs

The sizes are computed at the widths valid fields need (tokens <= t_max, in_features <=
max_in_features): a field out of range is refused by an earlier check whatever its truncated
size says, and the sizes are only used when every check passed.
"""
from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal, Value
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ndpmoe.model.contract import DESCRIPTOR, GROUP_CODES, ErrorCode, Opcode

from .geometry import Geometry, bits_for, log2
from .shapes import DescriptorLayout, ErrorShape

ROWS_BITS = dict(DESCRIPTOR.fields)["rows"]


def product_levels(width: int) -> int:
    """Registered adder levels of `pipelined_product` for a `width`-bit first operand."""
    return max(1, (width - 1).bit_length())


def pipelined_product(m: Module, a: Value, b: Value, name: str) -> Signal:
    """a x b (unsigned) as a tree of shifted partial products, one register per adder level:
    valid product_levels(len(a)) cycles after a and b. The AND of each partial product folds
    into the first level's adders."""
    a, b = Value.cast(a), Value.cast(b)
    level = [Mux(a[i], b << i, 0) for i in range(len(a))]
    depth = 0
    while len(level) > 1 or depth == 0:
        nxt = []
        for i in range(0, len(level), 2):
            pair = level[i:i + 2]
            s = Signal(len(a) + len(b), name=f"{name}_l{depth}_{i // 2}")
            m.d.sync += s.eq(pair[0] + pair[1] if len(pair) == 2 else pair[0])
            nxt.append(s)
        level, depth = nxt, depth + 1
    assert depth == product_levels(len(a))
    return level[0]


LATENCY = 4 + product_levels(ROWS_BITS) + 3


class DescriptorCheck(wiring.Component):
    """`desc` and `loaded_*` must hold from `start` until `done` (LATENCY cycles later).

    Outputs, valid with `done`: `error`, `words` (the read length), `padded_in` (inputs per row
    the matrix really holds, phantom groups included), `passes` (beats per code word).
    """

    def __init__(self, geometry: Geometry):
        if not isinstance(geometry, Geometry):
            raise TypeError(f"geometry must be a Geometry, not {geometry!r}")
        self._geo = geometry
        g = geometry
        super().__init__({
            "desc": In(DescriptorLayout),
            "loaded_tokens": In(g.token_bits),
            "loaded_in": In(g.in_bits),
            "start": In(1),
            "done": Out(1),
            "error": Out(ErrorShape),
            "words": Out(g.length_bits),
            "padded_in": Out(g.in_bits),
            "passes": Out(bits_for(g.max_passes)),
        })

    def elaborate(self, platform):
        m = Module()
        g, cfg = self._geo, self._geo.cfg
        d = self.desc
        p_log = log2(g.word_bits)
        in_bits = g.in_bits
        in_v = d.in_features[:in_bits]                    # valid in_features <= max_in_features
        tokens_v = d.tokens[:g.token_bits]                # valid tokens <= t_max

        opcode = d.opcode.as_value()
        is_load = opcode == Opcode.LOAD_ACT
        group_code = d.group

        def ceil_shift(value, shift):
            return ((value + (1 << shift) - 1) >> shift)[:in_bits]

        # -- stage 1 ----------------------------------------------------------------------------
        bad_opcode = Signal()
        is_nop = Signal()
        bad_tokens = Signal()
        bad_in = Signal()                   # stage 2, from three stage-1 parts
        in_zero, in_over, in_unaligned_load, in_unaligned_group = Signal(), Signal(), Signal(), Signal()
        bad_bits = Signal()
        bad_group = Signal()
        bad_rows = Signal()
        tokens_over = Signal()
        misaligned = Signal()
        load = Signal()
        three = Signal()
        padded = Signal(in_bits)            # inputs rounded up to whole packing blocks C
        blocks = Signal(in_bits)            # weight words per row, 3-bit: blocks of three words
        superblocks = Signal(in_bits)       # metadata words per row: one per E groups (P << group inputs)

        # The roundings for every format and group size are registered first (stage 0: an
        # adder each), stage 1 only picks the descriptor's (the desc holds, so they are ready)
        valid_groups = list(GROUP_CODES.values())
        c_logs = {b: p_log if b == 3 else p_log - log2(b) for b in cfg.bits}     # log2 of codes per block
        rounded = {}
        for b, c_log in c_logs.items():
            rounded[b] = Signal(in_bits, name=f"rounded_b{b}")
            m.d.sync += rounded[b].eq(ceil_shift(in_v, c_log))
        rounded_sb = {}
        for code in valid_groups:
            rounded_sb[code] = Signal(in_bits, name=f"rounded_g{code}")
            m.d.sync += rounded_sb[code].eq(ceil_shift(in_v, p_log + code))
        with m.Switch(d.bits):
            for b in cfg.bits:
                with m.Case(b):
                    m.d.sync += [padded.eq(rounded[b] << c_logs[b]), blocks.eq(rounded[b])]
        with m.Switch(group_code):
            for code in valid_groups:
                with m.Case(code):
                    m.d.sync += [superblocks.eq(rounded_sb[code]),
                                 in_unaligned_group.eq(d.in_features[:log2(32) + code] != 0)]

        m.d.sync += [
            bad_opcode.eq(opcode > max(Opcode)),
            is_nop.eq(opcode == Opcode.NOP),
            load.eq(is_load),
            three.eq(d.bits == 3),
            bad_tokens.eq((d.tokens == 0) | (d.tokens > cfg.t_max)),
            bad_bits.eq(~_one_of(d.bits, cfg.bits)),
            bad_group.eq(~_one_of(group_code, valid_groups)),
            in_zero.eq(d.in_features == 0),
            in_over.eq(d.in_features > cfg.max_in_features),
            in_unaligned_load.eq(d.in_features[:p_log] != 0),
            bad_rows.eq(d.rows == 0),
            tokens_over.eq(d.tokens > self.loaded_tokens),
            misaligned.eq(d.addr[:log2(g.word_bytes)] != 0),
        ]

        # -- stage 2 ----------------------------------------------------------------------------
        weight_words = Signal(in_bits + 2)
        superblocks2 = Signal(in_bits)
        act_mismatch = Signal()
        m.d.sync += [
            weight_words.eq(Mux(three, blocks + (blocks << 1), blocks)),
            superblocks2.eq(superblocks),
            act_mismatch.eq(tokens_over | (padded > self.loaded_in)),
            bad_in.eq(in_zero | in_over | Mux(load, in_unaligned_load, in_unaligned_group)),
        ]

        # -- stage 3: multiplicands -------------------------------------------------------------
        word_log = log2(g.word_bytes)
        b_bits = bits_for(max(g.max_row_words, cfg.max_in_features >> word_log))
        mul_a = Signal(ROWS_BITS)
        mul_b = Signal(b_bits)
        m.d.sync += [
            mul_a.eq(Mux(load, tokens_v, d.rows)),
            mul_b.eq(Mux(load, in_v >> word_log, superblocks2 + weight_words)),
        ]

        # -- stages 4..: the product --------------------------------------------------------------
        words = pipelined_product(m, mul_a, mul_b, "words")

        # -- end address and its range ------------------------------------------------------------
        end = Signal(max(cfg.addr_bits, len(words) + word_log) + 1)
        out_of_range = Signal()
        m.d.sync += [
            end.eq(d.addr + (words << word_log)),
            out_of_range.eq(end > cfg.mem_bytes),
        ]

        # -- last stage: priority encoding --------------------------------------------------------
        checks = [                                   # check_descriptor's order
            (bad_opcode, ErrorCode.BAD_OPCODE),
            (is_nop, ErrorCode.NONE),
            (bad_tokens, ErrorCode.BAD_TOKENS),
            (load & bad_in, ErrorCode.BAD_IN_FEATURES),
            (~load & bad_bits, ErrorCode.BAD_BITS),
            (~load & bad_group, ErrorCode.BAD_GROUP),
            (~load & bad_in, ErrorCode.BAD_IN_FEATURES),
            (~load & bad_rows, ErrorCode.BAD_ROWS),
            (~load & act_mismatch, ErrorCode.ACT_MISMATCH),
            (misaligned, ErrorCode.MISALIGNED_ADDR),
            (out_of_range, ErrorCode.ADDR_RANGE),
        ]
        error = ErrorShape.NONE
        for cond, code in reversed(checks):
            error = Mux(cond, ErrorShape(code), error)

        pipe = Signal(LATENCY - 1)
        m.d.sync += [
            pipe.eq(Cat(self.start, pipe[:-1])),
            self.done.eq(pipe[-1]),
            self.error.as_value().eq(error),
            self.words.eq(words),
            self.padded_in.eq(padded),
            self.passes.eq(_passes(d.tokens, g.tokens_parallel)),
        ]
        return m


def _one_of(value, choices) -> "Value":
    hit = 0
    for c in choices:
        hit = hit | (value == c)
    return hit


def _passes(tokens, per_pass: int):
    """ceil(tokens / per_pass) for a constant per_pass (a shift when it is a power of two)."""
    if per_pass & (per_pass - 1) == 0:
        return (tokens + per_pass - 1) >> log2(per_pass)
    return (tokens + per_pass - 1) // per_pass
