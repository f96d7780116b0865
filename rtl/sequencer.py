"""MATMUL sequencer: walks the packed matrix as its words arrive and turns them into beats.

A row of the memory image is | meta | w ... w | meta | w ... w | ... (model/contract.py): one
metadata word per E groups, then their weight words; for 3-bit each block is a hi-plane word
then two lo-plane words. The sequencer knows from its position which word comes next, so it
labels every word without looking at it:

- META: one beat, the word travels down the pipeline to the group stage, which latches it;
- HI (3-bit): one beat, the unpacker latches the plane;
- CODE: `passes` beats, one per group of `tokens_parallel` tokens (pass 0, 1, ...); the word is
  acknowledged to memory only with the last pass, so memory is read once whatever T is.

The pipeline behind never stalls. The only back-pressure is here: a beat that ends a row (one
per pass) reserves an entry in the output FIFO first (`credit_ok` / `credit_take`); without a
credit the sequencer waits, and the memory response waits with it.

Beat fields: kind, pass_, lo_half (3-bit: which lo word of the block), i0 (input position of
the beat's first code within the row), row_end, row, last (the descriptor's last beat: the last
pass of the last row's last code word), word.

A new descriptor starts only when the sequencer is not active (`start` has priority over issue),
so its beats follow the last one of the descriptor before by at least two cycles (the start
cycle, then the first issue).
"""
from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal, unsigned
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.wiring import In, Out

from .geometry import Geometry, bits_for, log2


class BeatKind(enum.Enum, shape=2):
    META = 0
    HI = 1
    CODE = 2


def beat_layout(g: Geometry) -> data.StructLayout:
    return data.StructLayout({
        "kind": BeatKind,
        "pass_": unsigned(g.pass_bits),
        "lo_half": unsigned(1),
        "i0": unsigned(g.in_bits),
        "row_end": unsigned(1),
        "row": unsigned(g.row_bits),
        "last": unsigned(1),
        "word": unsigned(g.word_bits),
    })


def mode_layout(g: Geometry) -> data.StructLayout:
    """What the datapath needs to know about the running MATMUL (held for its whole run)."""
    return data.StructLayout({
        "bits": unsigned(4),
        "group": unsigned(2),                     # GROUP_CODES: G = 32 << group
        "padded_in": unsigned(g.in_bits),
        "passes": unsigned(bits_for(g.max_passes)),
        "rows": unsigned(g.row_bits),
        "tokens": unsigned(g.token_bits),
    })


def codes_per_beat(m: Module, g: Geometry, bits) -> Signal:
    """N_c of the current bit width, as a signal."""
    n = Signal(range(g.lanes + 1))
    with m.Switch(bits):
        for b in g.cfg.bits:
            with m.Case(b):
                m.d.comb += n.eq(g.codes_per_beat(b))
    return n


class MatmulSequencer(wiring.Component):
    """Ports: `start` (pulse, with `mode` valid; only while not `active`), `mode`, `words` (memory response stream),
    `beat` (always-ready stream into the pipeline), `act_addr` (activation RAM row of the
    current beat: {pass, i0 / L}, presented in the issue cycle), `credit_ok` / `credit_take`,
    `active` (words still to consume), `want_word` (ready for a word: counts memory stalls)."""

    def __init__(self, geometry: Geometry):
        if not isinstance(geometry, Geometry):
            raise TypeError(f"geometry must be a Geometry, not {geometry!r}")
        self._geo = g = geometry
        super().__init__({
            "start": In(1),
            "mode": In(mode_layout(g)),
            "words": In(stream.Signature(unsigned(g.word_bits))),
            "beat": Out(stream.Signature(beat_layout(g), always_ready=True)),
            "act_addr": Out(g.pass_bits + g.act_row_addr_bits),
            "credit_ok": In(1),
            "credit_take": Out(1),
            "active": Out(1),
            "want_word": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        g = self._geo
        mode = self.mode

        active = Signal()
        need_meta = Signal()
        phase = Signal(2)                 # 3-bit blocks: 0 hi word, 1 first lo word, 2 second
        pass_ = Signal(g.pass_bits)
        i0 = Signal(g.in_bits)
        row = Signal(g.row_bits)

        # The issue decision must be a few LUT levels from registers (it fans out to the memory
        # response's ready and every counter here), so what it needs about the position is kept
        # in flags, updated with i0 from compares of registers against per-descriptor constants
        # taken while idle (`mode` is the staged descriptor's, and the start leaves them as they
        # were in its cycle), so `start` itself sets only `active`:
        #     row_end = (i0 + N_c == padded_in),  sb_end = ((i0 + N_c) & (E * G - 1)) == 0
        # (the beat's codes end the row / the superblock), last_row = (row == rows - 1).
        n_c = codes_per_beat(m, g, mode.bits)
        sb_mask = Signal(g.in_bits)
        m.d.comb += sb_mask.eq((g.word_bits << mode.group) - 1)
        three = Signal()
        n_c_r = Signal.like(n_c)
        passes_m1 = Signal.like(mode.passes)
        rows_m1 = Signal(g.row_bits)
        sb_mask_r = Signal(g.in_bits)
        row_end_at = Signal(g.in_bits)    # i0 whose successor's codes end the row: padded - 2 N_c
        sb_end_at = Signal(g.in_bits)     # i0 & mask whose successor ends the superblock: -2 N_c & mask
        row_end_first = Signal()          # row_end at i0 = 0 (one code beat per row)
        sb_end_first = Signal()
        with m.If(~active):
            m.d.sync += [
                three.eq(mode.bits == 3),
                n_c_r.eq(n_c),
                passes_m1.eq(mode.passes - 1),
                rows_m1.eq(mode.rows - 1),
                sb_mask_r.eq(sb_mask),
                row_end_at.eq(mode.padded_in - (n_c << 1)),
                sb_end_at.eq((-(n_c << 1)) & sb_mask),
                row_end_first.eq(n_c == mode.padded_in),
                sb_end_first.eq((n_c & sb_mask) == 0),
            ]

        row_end = Signal()
        sb_end = Signal()
        last_row = Signal()
        # row changes at most once per row, and a row has a META beat before its first CODE beat,
        # so a flag one cycle behind `row` is current whenever a CODE beat reads it
        m.d.sync += last_row.eq(row == rows_m1)

        # The beat's kind and "last pass" are registers too, set with the state they follow from:
        # kind = META if need_meta, else HI if 3-bit and phase 0, else CODE.
        kind = Signal(BeatKind)
        is_code = Signal()
        last_pass = Signal()              # pass_ == passes - 1
        passes_m2 = Signal.like(mode.passes)
        one_pass = Signal()
        with m.If(~active):
            m.d.sync += [passes_m2.eq(mode.passes - 2), one_pass.eq(mode.passes == 1)]
        needs_credit = is_code & row_end
        can_issue = active & (~needs_credit | self.credit_ok)
        issue = can_issue & self.words.valid

        m.d.comb += [
            self.words.ready.eq(can_issue & (~is_code | last_pass)),
            self.want_word.eq(can_issue),
            self.active.eq(active),
            self.beat.valid.eq(issue),
            self.beat.payload.kind.eq(kind),
            self.beat.payload.pass_.eq(pass_),
            self.beat.payload.lo_half.eq(phase == 2),
            self.beat.payload.i0.eq(i0),
            self.beat.payload.row_end.eq(row_end),
            self.beat.payload.row.eq(row),
            self.beat.payload.last.eq(is_code & row_end & last_row & last_pass),
            self.beat.payload.word.eq(self.words.payload),
            self.credit_take.eq(issue & needs_credit),
            self.act_addr.eq(Cat((i0 >> log2(g.lanes))[:g.act_row_addr_bits], pass_)),
        ]

        def set_kind(meta, hi):
            m.d.sync += [kind.eq(Mux(meta, BeatKind.META, Mux(hi, BeatKind.HI, BeatKind.CODE))),
                         is_code.eq(~meta & ~hi)]

        with m.If(self.start):
            m.d.sync += active.eq(1)
        with m.If(~active):
            # (issue needs `active`: the two branches never meet)
            m.d.sync += [need_meta.eq(1), phase.eq(0), pass_.eq(0), i0.eq(0), row.eq(0),
                         row_end.eq(n_c == mode.padded_in), sb_end.eq((n_c & sb_mask) == 0),
                         last_pass.eq(mode.passes == 1)]
            set_kind(1, 0)
        with m.Elif(issue):
            with m.Switch(kind):
                with m.Case(BeatKind.META):
                    m.d.sync += need_meta.eq(0)
                    set_kind(0, three & (phase == 0))
                with m.Case(BeatKind.HI):
                    m.d.sync += phase.eq(1)
                    set_kind(0, 0)
                with m.Case(BeatKind.CODE):
                    with m.If(~last_pass):
                        m.d.sync += [pass_.eq(pass_ + 1), last_pass.eq(pass_ == passes_m2)]
                    with m.Else():
                        next_phase = Mux(three & (phase == 1), 2, 0)
                        m.d.sync += [
                            pass_.eq(0),
                            last_pass.eq(one_pass),
                            i0.eq(i0 + n_c_r),
                            row_end.eq(i0 == row_end_at),
                            sb_end.eq((i0 & sb_mask_r) == sb_end_at),
                            phase.eq(next_phase),
                        ]
                        set_kind(row_end | sb_end, three & (next_phase == 0))
                        with m.If(row_end):
                            m.d.sync += [i0.eq(0), need_meta.eq(1), row.eq(row + 1),
                                         row_end.eq(row_end_first), sb_end.eq(sb_end_first)]
                            with m.If(last_row):
                                m.d.sync += active.eq(0)
                        with m.Elif(sb_end):
                            m.d.sync += need_meta.eq(1)
        return m
