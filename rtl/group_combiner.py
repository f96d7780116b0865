"""Group combiner: block sums of a beat -> complete group sums with their scale and zero.

A beat's codes [i0, i0 + N_c) and the group size G are both powers of two, so either
- N_c >= G: the beat holds N_c / G whole groups; each is the sum of G / block adjacent blocks; or
- N_c <  G: the beat is part of one group; its sum goes into a running partial (one per pass,
  since the passes of a word interleave), and the group completes on the beat that ends it.
Both sum(q x) (from the lanes) and sum(x) (from the activation buffer) go the same way.

The metadata word travels down the pipeline as its own beat and is latched here, so the groups
of a superblock always meet their own metadata whatever the pipeline holds. Group m of a beat
uses entry ((i0 / G) + m) mod E. Slots without a complete group leave with scale 0, so the
stage after can sum all K slots without looking at a mask.

Four registered stages: (0) the inputs, and where the beat sits in its group (from i0: a
masked compare and a shift by log2(G), which would otherwise sit ahead of stage 1's logic),
(1) parts at the group's granularity and the beat's flags, (2) running partials (carry-save),
metadata lookup, (3) the running sum resolved, the outputs.

The per-descriptor settings `bits`, `group` and `passes` are worked out over registered steps
ahead of the beats that use them. A beat at the inputs in cycle t uses `bits` and `group` as
they were in cycle t + BITS_AT (and `group` also a cycle later), `passes` as in t + PASSES_AT;
so a unit that changes them between descriptors presents each one delayed to match its beats.
"""
from __future__ import annotations

import operator
from functools import reduce

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from ndpmoe.model.contract import (GROUP_QX_BITS, GROUP_X_BITS, META_ENTRY_BITS, SCALE_BITS, ZERO_BITS)

from .act_buffer import xslots_layout
from .fanout import register_copies
from .geometry import Geometry, log2
from .multiply_lanes import sums_layout
from .sequencer import BeatKind, codes_per_beat

LATENCY = 4
BITS_AT = -2            # cycle (relative to a beat's arrival) whose `bits` and `group` the beat uses
PASSES_AT = 0           # ... whose `passes` it uses

META_ENTRY = data.StructLayout({"scale": unsigned(SCALE_BITS), "zero": signed(ZERO_BITS)})
assert META_ENTRY.size == META_ENTRY_BITS


def group_slots_layout(g: Geometry) -> data.StructLayout:
    """Up to K complete groups of one beat, for every token lane."""
    return data.StructLayout({
        "scale": data.ArrayLayout(unsigned(SCALE_BITS), g.blocks),
        "zero": data.ArrayLayout(signed(ZERO_BITS), g.blocks),
        "qx": data.ArrayLayout(data.ArrayLayout(signed(GROUP_QX_BITS), g.blocks), g.tokens_parallel),
        "x": data.ArrayLayout(data.ArrayLayout(signed(GROUP_X_BITS), g.blocks), g.tokens_parallel),
    })


class GroupCombiner(wiring.Component):
    """Ports in: `valid`, `kind`, `pass_`, `i0`, `row_end`, `row`, `last`, `word` (a META beat's
    word), `qx` (block sums of q x), `xs` (block sums of x), `bits`, `group`, `passes` (per
    descriptor, see BITS_AT and PASSES_AT).
    Out, LATENCY cycles later: `code_valid` (a CODE beat), `pass_out`, `row_end_out`, `row_out`,
    `last_out`, `groups`."""

    def __init__(self, geometry: Geometry):
        if not isinstance(geometry, Geometry):
            raise TypeError(f"geometry must be a Geometry, not {geometry!r}")
        self._geo = g = geometry
        super().__init__({
            "valid": In(1),
            "kind": In(BeatKind),
            "pass_": In(g.pass_bits),
            "i0": In(g.in_bits),
            "row_end": In(1),
            "row": In(g.row_bits),
            "last": In(1),
            "word": In(g.word_bits),
            "qx": In(sums_layout(g)),
            "xs": In(xslots_layout(g)),
            "bits": In(4),
            "group": In(2),
            "passes": In(range(g.max_passes + 1)),
            "code_valid": Out(1),
            "pass_out": Out(g.pass_bits),
            "row_end_out": Out(1),
            "row_out": Out(g.row_bits),
            "last_out": Out(1),
            "groups": Out(group_slots_layout(g)),
        })

    def elaborate(self, platform):
        m = Module()
        g = self._geo
        K, E = g.blocks, g.meta_entries
        levels = log2(K)

        # -- stage 1: parts at granularity min(G, L), beat flags --------------------------------
        # bits and group hold for the whole descriptor and are set well over a dozen cycles
        # before its first beat reaches this stage: what follows from them is worked out over
        # registered steps, none of which has to be fast
        n_c = Signal(range(g.lanes + 1))
        g_log = Signal(range(8))
        bits_r, group_r = Signal.like(self.bits), Signal.like(self.group)
        m.d.sync += [n_c.eq(codes_per_beat(m, g, self.bits)), g_log.eq(5 + self.group),
                     bits_r.eq(self.bits), group_r.eq(self.group)]
        # Blocks per part: G / block, capped at K (then the part is the whole beat); one-hot,
        # a copy per token and sum (it steers every part's multiplexer)
        level_hot = Signal(levels + 1)
        m.d.sync += level_hot.eq(Cat(*(Mux(self.group > levels, levels, self.group) == lv
                                       for lv in range(levels + 1))))
        level_copies = register_copies(m, level_hot, 2 * g.tokens_parallel, "level", platform)

        def parts_of(values, level_sel):
            # every level of the sum tree registered in stage 0 (from the inputs), so stage 1
            # only picks the level the group size asks for
            tree = [list(values)]
            for _ in range(levels):
                prev = tree[-1]
                tree.append([prev[i] + prev[i + 1] for i in range(0, len(prev), 2)])
            registered = []
            for lv, row in enumerate(tree):
                regs = []
                for i, v in enumerate(row):
                    r = Signal(signed(len(values[0]) + lv), name=f"tree{lv}_{i}")
                    m.d.sync += r.eq(v)
                    regs.append(r)
                registered.append(regs)
            tree = registered
            out = []
            for i in range(K):
                picked = [Mux(level_sel[lv], tree[lv][i], 0) for lv in range(levels + 1) if i < len(tree[lv])]
                part = Signal(signed(len(values[0]) + levels + 1), name="part")
                m.d.comb += part.eq(reduce(operator.or_, picked))
                out.append(part)
            return out

        # -- stage 0: inputs registered ----------------------------------------------------------
        inp = {name: Signal.like(getattr(self, name), name=f"{name}_in")
               for name in ("valid", "kind", "pass_", "row_end", "row", "last", "word")}
        m.d.sync += [inp[name].eq(getattr(self, name)) for name in inp]

        s1 = dict(valid=Signal(), kind=Signal(BeatKind), pass_=Signal(g.pass_bits),
                  row_end=Signal(), row=Signal(g.row_bits), last=Signal(), word=Signal(g.word_bits))
        for name, sig in s1.items():
            m.d.sync += sig.eq(inp[name])
        qx1 = [[Signal(signed(GROUP_QX_BITS), name=f"qx1_t{t}_{k}") for k in range(K)]
               for t in range(g.tokens_parallel)]
        x1 = [[Signal(signed(GROUP_X_BITS), name=f"x1_t{t}_{k}") for k in range(K)]
              for t in range(g.tokens_parallel)]
        for t in range(g.tokens_parallel):
            for k, p in enumerate(parts_of([self.qx[t][k] for k in range(K)], level_copies[2 * t])):
                m.d.sync += qx1[t][k].eq(p)
            for k, p in enumerate(parts_of([self.xs[t][k] for k in range(K)], level_copies[2 * t + 1])):
                m.d.sync += x1[t][k].eq(p)

        # Per-descriptor constants, registered in two steps (bits and group hold for the whole
        # descriptor and are set cycles before its first beat): which slots hold whole groups, and, for a beat
        # inside a group (N_c < G), the i0 mod G of the beat that ends it (G - N_c).
        whole = Signal(range(g.lanes + 1))      # groups wholly inside the beat (0 if N_c < G)
        m.d.sync += whole.eq(n_c >> g_log)
        g_mask = Signal(8)
        partial = Signal()
        slot_whole = Signal(K)
        ends_at = Signal(8)
        m.d.sync += [
            g_mask.eq((1 << g_log) - 1),
            partial.eq(whole == 0),
            slot_whole.eq(Cat(*(k < whole for k in range(K)))),
        ]
        # (G - N_c) mod G from a table of the format and the group size (a shift and a subtract
        # of registers would be six LUT levels)
        with m.Switch(Cat(group_r, bits_r)):
            for b in g.cfg.bits:
                for code in range(1 << len(self.group)):
                    size = 32 << code
                    with m.Case(code | b << len(self.group)):
                        m.d.sync += ends_at.eq((size - g.codes_per_beat(b)) % size)
            with m.Default():                               # no format: N_c = 0, as codes_per_beat
                m.d.sync += ends_at.eq(0)
        ends = Signal()
        first_group = Signal(range(E))
        m.d.sync += [ends.eq((self.i0[:8] & g_mask) == ends_at), first_group.eq(self.i0 >> g_log)]
        slot_valid1 = Signal(K)
        entry1 = [Signal(range(E), name=f"entry1_{k}") for k in range(K)]
        for k in range(K):
            m.d.sync += [
                slot_valid1[k].eq(Mux(partial, ends if k == 0 else 0, slot_whole[k])),
                entry1[k].eq(first_group + k),
            ]
        # "a CODE beat" and "keep the partial" (the beat's sum continues a group) steer every running partial: a copy per token lane
        # and sum (rtl/fanout.py)
        run_flags = register_copies(m, Cat(inp["valid"] & (inp["kind"] == BeatKind.CODE), partial & ~ends),
                                    2 * g.tokens_parallel, "run_flags", platform)

        # -- stage 2: running partials per pass, metadata ---------------------------------------
        # the META beat's enable reaches the word's bits through a copy per entry
        meta = Signal(data.ArrayLayout(META_ENTRY, E))
        meta_en = register_copies(m, inp["valid"] & (inp["kind"] == BeatKind.META), E, "meta_en", platform,
                                  distinct=False)
        for e in range(E):
            with m.If(meta_en[e]):
                m.d.sync += meta[e].eq(s1["word"][e * META_ENTRY.size:(e + 1) * META_ENTRY.size])

        code = s1["valid"] & (s1["kind"] == BeatKind.CODE)
        # CODE beats come in passes 0, 1, .. passes-1, 0, 1, .. so the running partials rotate:
        # the beat reads the head and pushes its new partial behind the last live pass (no
        # multiplexer on the pass number ahead of the adder).
        # "pass p is the last live one", decoded and copied per token and sum (each bit steers
        # a partial's multiplexers); `passes` is set at the descriptor check, long before a beat
        is_last = Signal(g.max_passes)
        m.d.sync += is_last.eq(Cat(*(self.passes - 1 == p for p in range(g.max_passes))))
        last_copies = register_copies(m, is_last, 2 * g.tokens_parallel, "is_last", platform)
        # Stage 2 computes into `groups2` (and the beat fields beside it); stage 3 registers
        # them as the outputs, resolving the running sums' carries on the way.
        groups2 = Signal(group_slots_layout(g))
        for t in range(g.tokens_parallel):
            for i, (name, parts, width) in enumerate((("qx", qx1[t], GROUP_QX_BITS), ("x", x1[t], GROUP_X_BITS))):
                code_c, keep_c = run_flags[2 * t + i][0], run_flags[2 * t + i][1]
                last_c = last_copies[2 * t + i]
                # Running partials in two carry-save halves (value = (hi + c) << lo_bits | lo): the
                # loop through the adder is half as long; the sum is resolved in stage 3.
                lo_bits = width // 2
                p0 = Signal(signed(width), name=f"part0_{name}_t{t}")
                m.d.comb += p0.eq(parts[0])
                run_lo = [Signal(lo_bits, name=f"run_{name}_lo_t{t}_p{p}") for p in range(g.max_passes)]
                run_c = [Signal(name=f"run_{name}_c_t{t}_p{p}") for p in range(g.max_passes)]
                run_hi = [Signal(width - lo_bits, name=f"run_{name}_hi_t{t}_p{p}") for p in range(g.max_passes)]
                lo_sum = run_lo[0] + p0[:lo_bits]
                # hi + p0_hi + c in one adder: the carry enters at bit 1
                hi_sum = (Cat(run_c[0], run_hi[0]) + Cat(Const(1, 1), p0[lo_bits:]))[1:1 + width - lo_bits]
                first = (lo_sum[:lo_bits], lo_sum[lo_bits], hi_sum)
                with m.If(code_c):
                    for p in range(g.max_passes):
                        nxt = (run_lo[p + 1], run_c[p + 1], run_hi[p + 1]) if p + 1 < g.max_passes else (0, 0, 0)
                        for reg, new, n in zip((run_lo[p], run_c[p], run_hi[p]), first, nxt):
                            m.d.sync += reg.eq(Mux(last_c[p], Mux(keep_c, new, 0), n))
                first_lo, first_c, first_hi = Signal(lo_bits), Signal(), Signal(width - lo_bits)
                m.d.sync += [first_lo.eq(first[0]), first_c.eq(first[1]), first_hi.eq(first[2])]
                target = getattr(self.groups, name)[t]
                m.d.sync += target[0].eq(Cat(first_lo, (first_hi + first_c)[:width - lo_bits]))
                for k in range(1, K):
                    m.d.sync += getattr(groups2, name)[t][k].eq(parts[k])
                    m.d.sync += target[k].eq(getattr(groups2, name)[t][k])

        for k in range(K):
            entry = meta[entry1[k]]
            m.d.sync += [
                groups2.scale[k].eq(Mux(slot_valid1[k], entry.scale, 0)),
                groups2.zero[k].eq(entry.zero),
                self.groups.scale[k].eq(groups2.scale[k]),
                self.groups.zero[k].eq(groups2.zero[k]),
            ]
        beat1 = (code, s1["pass_"], s1["row_end"], s1["row"], s1["last"])
        beat2 = [Signal.like(v, name=f"{n}2") for n, v in zip(("code_valid", "pass", "row_end", "row", "last"), beat1)]
        m.d.sync += [b.eq(v) for b, v in zip(beat2, beat1)]
        m.d.sync += [o.eq(b) for o, b in zip((self.code_valid, self.pass_out, self.row_end_out, self.row_out,
                                              self.last_out), beat2)]
        return m
