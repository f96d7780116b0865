"""Descriptor validation and the derived sizes of a run, in a short fixed pipeline.

The checks and their order are exactly model.ndp_golden.check_descriptor's: the first failing
check names the error. A refused descriptor never reaches the memory reader.

    stage 1: field checks, padded inputs, words per row, words of an activation load
    stage 2: words of a matrix (rows x words per row, one multiplier)
    stage 3: end address against the memory size
    stage 4: priority encoding of the error
"""
from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from model.contract import GROUP_CODES, MAX_ROWS, ErrorCode, Opcode

from .geometry import Geometry, bits_for, log2
from .shapes import DescriptorLayout, ErrorShape

LATENCY = 4


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
        in_wide = 18                                  # in_features (16 bits) rounded up to a block

        opcode = d.opcode.as_value()
        is_load = opcode == Opcode.LOAD_ACT
        group_code = d.group

        # -- stage 1 ----------------------------------------------------------------------------
        bad_opcode = Signal()
        is_nop = Signal()
        bad_tokens = Signal()
        bad_in = Signal()
        bad_bits = Signal()
        bad_group = Signal()
        bad_rows = Signal()
        act_mismatch = Signal()
        misaligned = Signal()
        load = Signal()
        load_words = Signal(g.length_bits)
        row_words = Signal(in_wide)
        padded = Signal(in_wide)

        # Codes per packing block C for each bit width in this build (3-bit: P codes in 3 words).
        padded_c = Signal(in_wide)
        weight_words = Signal(in_wide)
        with m.Switch(d.bits):
            for b in cfg.bits:
                with m.Case(b):
                    c_log = p_log if b == 3 else p_log - log2(b)
                    m.d.comb += padded_c.eq((d.in_features + (1 << c_log) - 1) >> c_log << c_log)
                    if b == 3:
                        m.d.comb += weight_words.eq((padded_c >> p_log) * 3)
                    else:
                        m.d.comb += weight_words.eq(padded_c >> c_log)
        # Superblocks per row: one metadata word per E groups, E * G = P << group_code inputs.
        sb_shift = Signal(range(p_log + 4))
        m.d.comb += sb_shift.eq(p_log + group_code)
        superblocks = ((padded_c + (1 << sb_shift) - 1) >> sb_shift)[:in_wide]
        group_mask = Signal(8)
        m.d.comb += group_mask.eq((32 << group_code) - 1)
        valid_groups = list(GROUP_CODES.values())

        m.d.sync += [
            bad_opcode.eq(opcode > max(Opcode)),
            is_nop.eq(opcode == Opcode.NOP),
            load.eq(is_load),
            bad_tokens.eq((d.tokens == 0) | (d.tokens > cfg.t_max)),
            bad_bits.eq(~_one_of(d.bits, cfg.bits)),
            bad_group.eq(~_one_of(group_code, valid_groups)),
            bad_in.eq((d.in_features == 0) | (d.in_features > cfg.max_in_features) |
                      Mux(is_load, d.in_features[:p_log] != 0, (d.in_features & group_mask) != 0)),
            bad_rows.eq(d.rows == 0),
            act_mismatch.eq((d.tokens > self.loaded_tokens) | (padded_c > self.loaded_in)),
            misaligned.eq(d.addr[:log2(g.word_bytes)] != 0),
            load_words.eq(d.tokens * (d.in_features >> log2(g.word_bytes))),
            row_words.eq(superblocks + weight_words),
            padded.eq(padded_c),
        ]

        # -- stage 2 ----------------------------------------------------------------------------
        words = Signal(bits_for(MAX_ROWS) + in_wide)
        m.d.sync += words.eq(Mux(load, load_words, d.rows * row_words))

        # -- stage 3 ----------------------------------------------------------------------------
        out_of_range = Signal()
        m.d.sync += out_of_range.eq(d.addr + (words << log2(g.word_bytes)) > cfg.mem_bytes)

        # -- stage 4 ----------------------------------------------------------------------------
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
