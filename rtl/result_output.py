"""Output side: a FIFO of row entries, credits for it, and a serializer to single results.

The datapath in front never stalls (no stall signal fanning out to thousands of flip-flops).
Instead the sequencer takes a credit for every row-ending beat before it issues it, and a credit
comes back when the serializer has sent the entry's last result, so the FIFO can never overflow.
Output back-pressure therefore stops the memory reads, a FIFO depth later.

Results leave in the golden order: row by row, tokens 0..T-1 within a row (one entry per pass,
passes in order), one per cycle when `out` is ready. Each carries `last`: the descriptor's last
result, which is how the unit knows a MATMUL has ended while the next one's beats follow.

`tokens` is per descriptor: an entry arriving in cycle t is serialized with T as it was in
cycle t + TOKENS_AT.
"""
from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .geometry import Geometry, log2
from .lut_ram import sliced_lut_ram
from .scale_accumulator import entry_layout
from .shapes import result_layout

READ_SLICE_BITS = 32    # FIFO columns per copy of the read pointer
TOKENS_AT = -1          # `tokens` is registered (as T - 1) ahead of the entries' write


def tagged_result_layout(t_max: int) -> data.StructLayout:
    """A result of the output stream and whether it is its descriptor's last."""
    return data.StructLayout({"result": result_layout(t_max), "last": 1})


class ResultOutput(wiring.Component):
    """Ports: `entry` (always-ready stream in), `tokens` (T of the entries' descriptor, see
    TOKENS_AT), `credit_take` / `credit_ok`, `out` (stream of results, each with `last`), `idle`
    (no credit out, nothing to send)."""

    def __init__(self, geometry: Geometry, depth: int = 16):
        if not isinstance(geometry, Geometry):
            raise TypeError(f"geometry must be a Geometry, not {geometry!r}")
        if not isinstance(depth, int) or depth < 2:
            raise ValueError(f"depth must be an integer >= 2, not {depth!r}")
        self._geo = g = geometry
        self._depth = depth
        super().__init__({
            "entry": In(stream.Signature(entry_layout(g), always_ready=True)),
            "tokens": In(g.token_bits),
            "credit_take": In(1),
            "credit_ok": Out(1),
            "out": Out(stream.Signature(tagged_result_layout(g.cfg.t_max))),
            "idle": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        g = self._geo
        tp = g.tokens_parallel
        entry = entry_layout(g)
        # FIFO word: the entry and the index of its last token (so the read side decides
        # "last token of the head" from the head's bits and j alone, with no arithmetic)
        layout = data.StructLayout({"entry": entry, "last_j": range(max(2, tp))})
        # The FIFO: LUT RAM read asynchronously, a copy of the read pointer per slice of its
        # columns (rtl/lut_ram.py), a registered non-empty flag. (The credits rule out
        # overflow, so there is no full check on the write side.)
        depth = self._depth
        produce = Signal(range(depth))
        level = Signal(range(depth + 1))
        nonempty = Signal()
        r_en = Signal()

        # T - 1 registered: `tokens` holds for the whole descriptor, set cycles before any result
        tokens_m1 = Signal(g.token_bits)
        m.d.sync += tokens_m1.eq(self.tokens - 1)
        last_j = Signal(range(max(2, tp)))
        pass_ = self.entry.payload.pass_
        if tp & (tp - 1) == 0:              # the last pass holds tokens up to T - 1, others TP
            lo = log2(tp)
            m.d.comb += last_j.eq(Mux(pass_ == tokens_m1[lo:], tokens_m1[:lo], tp - 1) if tp > 1 else 0)
        else:
            left = Signal(g.token_bits + 1)
            m.d.comb += [left.eq(tokens_m1 - pass_ * tp), last_j.eq(Mux(left < tp, left, tp - 1))]
        word = Signal(layout)
        w_en = self.entry.valid
        m.d.comb += [word.entry.eq(self.entry.payload), word.last_j.eq(last_j)]
        with m.If(w_en):
            m.d.sync += produce.eq(Mux(produce == depth - 1, 0, produce + 1))
        head_bits, _ = sliced_lut_ram(m, "storage", layout.size, depth, w_addr=produce, w_data=word, w_en=w_en,
                                      r_advance=r_en, slices=-(-layout.size // READ_SLICE_BITS), platform=platform)
        m.d.sync += [
            level.eq(Mux(w_en, Mux(r_en, level, level + 1), Mux(r_en, level - 1, level))),
            nonempty.eq(w_en | (level >= 2) | ((level == 1) & ~r_en)),
        ]

        credits = Signal(range(self._depth + 1), init=self._depth)
        credit_back = Signal()          # registered: an entry left the FIFO in the cycle before
        returned = Signal()
        m.d.sync += credit_back.eq(returned)
        # credits + back - take, as a choice between precomputed neighbours (take comes late)
        m.d.sync += credits.eq(Mux(self.credit_take, Mux(credit_back, credits, credits - 1),
                                   Mux(credit_back, credits + 1, credits)))
        # credit_ok registered (it gates the sequencer's issue decision): the next count is
        # non-zero when a credit comes back, or two or more are left, or one is left and not taken
        credit_ok = Signal(init=1)
        m.d.sync += credit_ok.eq(credit_back | (credits >= 2) | ((credits == 1) & ~self.credit_take))
        m.d.comb += self.credit_ok.eq(credit_ok)

        # Serializer: token j of the head entry goes into the output register.
        head_word = data.View(layout, head_bits)
        head = head_word.entry
        j = Signal(range(max(2, tp)))
        token = Signal(g.token_bits + 1)
        if tp & (tp - 1) == 0:              # pass x TP + j without an adder
            m.d.comb += token.eq(Cat(j[:log2(tp)], head.pass_) if tp > 1 else head.pass_)
        else:
            m.d.comb += token.eq(head.pass_ * tp + j)
        last = j == head_word.last_j
        load = nonempty & (~self.out.valid | self.out.ready)
        with m.If(self.out.valid & self.out.ready):
            m.d.sync += self.out.valid.eq(0)
        with m.If(load):
            m.d.sync += [
                self.out.valid.eq(1),
                self.out.payload.result.value.eq(head.values[j] if tp > 1 else head.values[0]),
                self.out.payload.result.row.eq(head.row),
                self.out.payload.result.token.eq(token),
                self.out.payload.last.eq(head.last & last),
                j.eq(j + 1),
            ]
            with m.If(last):
                m.d.sync += j.eq(0)
                m.d.comb += [r_en.eq(1), returned.eq(1)]
        m.d.comb += self.idle.eq((credits == self._depth) & ~self.out.valid)
        return m
