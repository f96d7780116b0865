"""Activation buffer: int8 activations of up to T_max tokens, plus their block sums.

Storage is two RAMs per token lane of the datapath (`tokens_parallel` lanes): one row holds the L
activations one code beat needs, the row of the same address in the second RAM the K sums of its
blocks of `block` activations:

    row RAM (LSB first):  | acts (L, interleaved, see _stored_position) |
    sum RAM (LSB first):  | xsum 0 | ... | xsum K-1 |
    token t lives in lane t % tokens_parallel, rows {t // tokens_parallel, 0 .. in / L - 1}

The block sums are what the zero-point correction needs (sum(x) over a group = sum of its
blocks), computed once here at LOAD_ACT time instead of by an adder tree per token per beat.
The group stage uses them only after the multiply lanes, so they are read `xs_delay` cycles after
their row (the lanes' latency) and may land as much later: the row is written without waiting
for its sums' adder tree, and a MATMUL can follow a LOAD_ACT with no gap (see the load's end).

Load side: LOAD_ACT's words (P bits, little-endian bytes, token rows back to back) are assembled
into RAM rows and written, then summed by a pipelined adder tree and written; always ready.
Read side: the address comes with the sequencer's beat (cycle 0) and is registered once
(ADDR_STAGES), the RAM's registered row is there RAM_READ_LATENCY cycles after that
(rtl/hard_blocks.py: a tree of address registers towards every block RAM, the block RAM's own
output register) and in a fabric register a cycle later (ROW_LATENCY), the lanes' activations
are aligned to the beat's codes (4- and 8-bit beats use part of a row) and registered twice:
valid two cycles later. The block sums take the same path xs_delay cycles later.
"""
from __future__ import annotations

import operator
from functools import reduce

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from ndpmoe.model.contract import ACT_BITS

from .adder_tree import block_sums
from .fanout import bit_slices, copy_tree, register_copies
from .geometry import Geometry, log2
from .hard_blocks import RAM_INPUT_STAGES, RAM_READ_LATENCY, RegisteredRam

ADDR_STAGES = 1                     # registers between the sequencer's address and the RAMs'
ROW_LATENCY = ADDR_STAGES + RAM_READ_LATENCY + 1    # the RAM's row in a fabric register
READ_LATENCY = ROW_LATENCY + 2
BITS_AT = ROW_LATENCY - 1   # cycle, relative to a block-sum read's address, whose `bits` picks its sums
LANE_GROUP = 2          # activation lanes sharing one copy of the read offset
SEL_BRANCHING = 8       # copies one register of that tree drives
LOAD_SLICE_BITS = 32    # row bits per copy of the load's enables
LOAD_BRANCHING = 4      # copies one register of the load's enable trees drives


def _stored_position(g: Geometry, lane: int) -> int:
    """Where lane `lane`'s activation sits in a RAM row. A beat of N_c codes starts at a multiple of
    N_c, so lane j reads one of j, j + s, j + 2s, .. (s the smallest N_c): those are stored side by
    side, so each alignment multiplexer reads neighbouring bits of one block RAM rather than bits of
    RAMs across the device."""
    s = min(g.codes_per_beat(b) for b in g.cfg.bits)
    return (lane % s) * (g.lanes // s) + lane // s


def acts_layout(g: Geometry) -> data.ArrayLayout:
    return data.ArrayLayout(data.ArrayLayout(signed(ACT_BITS), g.lanes), g.tokens_parallel)


def xslots_layout(g: Geometry) -> data.ArrayLayout:
    return data.ArrayLayout(data.ArrayLayout(signed(g.xsum_bits), g.blocks), g.tokens_parallel)


class ActivationBuffer(wiring.Component):
    """Ports: load side `load_start`, `load_in` (bytes per token row), `load_words` (the words
    of the whole load, tokens x load_in / P * 8, at least one; both as of `load_start`'s cycle), `words`
    (stream in), `load_busy` (until the last row and its sums have landed), `loading_next` (the
    loader takes words in the next cycle: the sequencer must not), `reads_safe` (a MATMUL
    started in this cycle, taking words only once the loader no longer does, reads only rows
    that have landed, given the order of its reads: see the load's last comment); read side
    `rd_addr`, `rd_offset` (i0 mod L), READ_LATENCY cycles later `acts` (per token lane, the
    activation of each code lane), and READ_LATENCY + xs_delay cycles later `xslots` (per token
    lane, the block sums per beat slot, zero where the beat has no such block), with `bits` the
    read's format as of BITS_AT + xs_delay cycles after its address."""

    def __init__(self, geometry: Geometry, xs_delay: int):
        if not isinstance(geometry, Geometry):
            raise TypeError(f"geometry must be a Geometry, not {geometry!r}")
        if not isinstance(xs_delay, int) or xs_delay < log2(geometry.block):
            raise ValueError(f"xs_delay must be an integer of at least {log2(geometry.block)} (the block "
                             f"sums' adder tree), not {xs_delay!r}")
        self._geo = g = geometry
        self._xs_delay = xs_delay
        super().__init__({
            "load_start": In(1),
            "load_in": In(g.in_bits),
            "load_words": In(g.length_bits),
            "words": In(stream.Signature(unsigned(g.word_bits))),
            "load_busy": Out(1),
            "loading_next": Out(1),
            "reads_safe": Out(1),
            "rd_addr": In(g.pass_bits + g.act_row_addr_bits),
            "rd_offset": In(max(1, log2(g.lanes))),
            "bits": In(4),
            "acts": Out(acts_layout(g)),
            "xslots": Out(xslots_layout(g)),
        })

    def elaborate(self, platform):
        m = Module()
        g = self._geo
        act_bits = g.lanes * ACT_BITS
        # A LOAD_ACT starts only after the MATMUL before it has issued its last read, and a
        # MATMUL reads only rows that have landed (see the load's last comment), so a read
        # never meets a write to its address (RegisteredRam leaves that case undefined).
        # One RAM per token lane for the rows, one for their block sums.
        act_rams = [RegisteredRam(act_bits, g.act_depth) for _ in range(g.tokens_parallel)]
        sum_rams = [RegisteredRam(g.blocks * g.xsum_bits, g.act_depth) for _ in range(g.tokens_parallel)]
        for lane in range(g.tokens_parallel):
            m.submodules[f"ram{lane}"] = act_rams[lane]
            m.submodules[f"xsum_ram{lane}"] = sum_rams[lane]

        self._elaborate_load(m, g, act_rams, sum_rams, act_bits, platform)
        self._elaborate_read(m, g, act_rams, sum_rams, platform)
        return m

    # -- LOAD_ACT: words -> RAM rows, then their block sums ---------------------------------------
    def _elaborate_load(self, m, g: Geometry, act_rams, sum_rams, act_bits, platform):
        loading = Signal()
        word_idx = Signal(range(max(2, g.words_per_act_row)))
        row_idx = Signal(g.act_row_addr_bits + 1)
        lane = Signal(range(max(2, g.tokens_parallel)))
        group = Signal(max(1, g.pass_bits))
        shift = Signal(act_bits)
        # Where the load is, as flags updated from compares against constants taken at the start
        # (no multiply, no adder ahead of a compare): the row ends its token.
        rows_per_token = self.load_in >> log2(g.act_row_bytes)
        rows_m2 = Signal(g.in_bits)
        one_row = Signal()
        last_row = Signal()

        # A word is taken at the FIFO's handshake (`take`, two flip-flops). The copy trees of its
        # enables start from the take itself, and so does the count of words in the row, so a
        # row is assembled two cycles after its last take; where the row goes (its token row,
        # lane and group) is counted a cycle later from the registered row end.
        last_word = Signal()                # word_idx == words_per_act_row - 1
        m.d.comb += self.words.ready.eq(loading)
        word_a, take_a = Signal(g.word_bits), Signal()
        take = self.words.valid & loading
        row_done = take & last_word
        row_done_a = Signal()
        m.d.sync += [word_a.eq(self.words.payload), take_a.eq(take), row_done_a.eq(row_done)]
        words_left = Signal.like(self.load_words)
        one_left = Signal()
        busy = Signal()
        # While the loader is idle its counters follow the offered load (`load_in`, `load_words`
        # are the staged descriptor's), so `load_start` itself sets only three flags and fans out
        # no further. Idle excludes a take: a take's word was asked for while `loading`.
        with m.If(~busy):
            m.d.sync += [
                words_left.eq(self.load_words), one_left.eq(self.load_words == 1),
                word_idx.eq(0), last_word.eq(g.words_per_act_row == 1),
                row_idx.eq(0), lane.eq(0), group.eq(0),
                rows_m2.eq(rows_per_token - 2),
                one_row.eq(rows_per_token == 1), last_row.eq(rows_per_token == 1),
            ]
        with m.Elif(take):
            m.d.sync += [words_left.eq(words_left - 1), one_left.eq(words_left == 2),
                         word_idx.eq(word_idx + 1), last_word.eq(word_idx == g.words_per_act_row - 2)]
            with m.If(last_word):
                m.d.sync += [word_idx.eq(0), last_word.eq(g.words_per_act_row == 1)]
        # (a load has words: the descriptor check refuses a LOAD_ACT of no tokens or no inputs;
        # this goes ahead of the sequencer's valid flag, so it is kept to a few terms)
        loading_next = self.load_start | (loading & ~(take & one_left))
        m.d.sync += loading.eq(loading_next)
        m.d.comb += self.loading_next.eq(loading_next)

        with m.If(row_done_a):
            m.d.sync += [row_idx.eq(row_idx + 1), last_row.eq(row_idx == rows_m2)]
            with m.If(last_row):
                m.d.sync += [row_idx.eq(0), last_row.eq(one_row)]
                if g.tokens_parallel > 1:
                    with m.If(lane == g.tokens_parallel - 1):
                        m.d.sync += [lane.eq(0), group.eq(group + 1)]
                    with m.Else():
                        m.d.sync += lane.eq(lane + 1)
                else:
                    m.d.sync += group.eq(group + 1)

        # The take and the row end enable hundreds of row bits: each slice of them gets its own
        # register copy from a tree of copies (rtl/fanout.py), and the word and the row's target
        # travel beside the tree to the slices.
        slices = bit_slices(act_bits, LOAD_SLICE_BITS)
        take_c, tree_latency = copy_tree(m, take, len(slices), "take", platform, branching=LOAD_BRANCHING,
                                         distinct=False)
        done_c, _ = copy_tree(m, row_done, len(slices), "row_done", platform, branching=LOAD_BRANCHING,
                              distinct=False)
        target = Signal(len(lane) + g.pass_bits + g.act_row_addr_bits)
        word_d, take_d, done_d = word_a, take_a, row_done_a
        target_d = Cat(row_idx[:g.act_row_addr_bits], group[:g.pass_bits], lane)   # as of row_done_a
        in_flight = [take_a]
        for i in range(tree_latency - 1):
            w, t, d, tg = Signal(g.word_bits, name=f"ld_word{i}"), Signal(name=f"ld_take{i}"), \
                Signal(name=f"ld_done{i}"), Signal(len(target), name=f"ld_at{i}")
            m.d.sync += [w.eq(word_d), t.eq(take_d), d.eq(done_d), tg.eq(target_d)]
            word_d, take_d, done_d, target_d = w, t, d, tg
            in_flight.append(t)

        # Stage 0: a whole RAM row assembled (word 0 ends in the low bits) and written.
        full = Signal()
        row = Signal(act_bits)
        assembled = word_d if g.words_per_act_row == 1 else Cat(shift[g.word_bits:], word_d)
        m.d.sync += full.eq(done_d)
        for i, bits in enumerate(slices):
            with m.If(take_c[i]):
                m.d.sync += shift[bits].eq(assembled[bits])
            with m.If(done_c[i]):
                m.d.sync += row[bits].eq(assembled[bits])
        with m.If(done_c[0]):
            m.d.sync += target.eq(target_d)
        in_flight.append(full)
        row_acts = Signal(data.ArrayLayout(signed(ACT_BITS), g.lanes))
        m.d.comb += [row_acts[_stored_position(g, lane)].eq(row[ACT_BITS * lane:ACT_BITS * (lane + 1)])
                     for lane in range(g.lanes)]
        self._write(m, g, act_rams, full, target, row_acts)

        # Stages 1..n: block sums of the row, its target delayed alongside, into their own RAMs
        # (read `xs_delay` cycles after the row, so they may land that much later).
        acts = [row[ACT_BITS * i:ACT_BITS * (i + 1)].as_signed() for i in range(g.lanes)]
        sums, latency = block_sums(m, acts, g.block, "xsum")
        valid_d, target_d = full, target
        sum_flight = []
        for i in range(latency):
            v, t = Signal(name=f"ld_valid{i}"), Signal(len(target), name=f"ld_target{i}")
            m.d.sync += [v.eq(valid_d), t.eq(target_d)]
            valid_d, target_d = v, t
            sum_flight.append(v)
        row_sums = Signal(data.ArrayLayout(signed(g.xsum_bits), g.blocks))
        m.d.comb += [row_sums[k].eq(s) for k, s in enumerate(sums)]
        # A LOAD_ACT starts at the earliest two cycles after the last beat of the MATMUL before it
        # (rtl/ndp_unit.py) and takes its first word a cycle later, so its first sums are presented
        # in that beat's cycle + 3 + land + latency (+ pad) at the earliest. They must come after
        # the beat's last read of the sums, in its cycle + ADDR_STAGES + xs_delay: where the lanes
        # are deeper than that (8-bit codes), the sums wait `pad` more cycles before their write.
        land = len(in_flight)
        pad = max(0, ADDR_STAGES + self._xs_delay - (3 + land + latency) + 1)
        for i in range(pad):
            v, t = Signal(name=f"ld_pad_valid{i}"), Signal(len(target), name=f"ld_pad_target{i}")
            r = Signal.like(row_sums, name=f"ld_pad_sums{i}")
            m.d.sync += [v.eq(valid_d), t.eq(target_d), r.eq(row_sums)]
            valid_d, target_d, row_sums = v, t, r
            sum_flight.append(v)
        assert 3 + land + latency + pad > ADDR_STAGES + self._xs_delay
        self._write(m, g, sum_rams, valid_d, target_d, row_sums)
        # the RAM registers a write RAM_INPUT_STAGES more times before it lands
        writing = []
        for i in range(RAM_INPUT_STAGES):
            w = Signal(name=f"writing{i}")
            m.d.sync += w.eq(writing[-1] if writing else valid_d)
            writing.append(w)
        # registered (an OR of a dozen flags would sit ahead of the controller's state logic):
        # busy in cycle t when anything was in flight in t - 1 or a load started then; no flag
        # rises again once all are clear, so it falls only after the last write has landed
        m.d.sync += busy.eq(self.load_start | Cat(loading, *in_flight, *sum_flight, *writing).any())

        # When a MATMUL may start. It takes words only once `loading` has fallen (the response
        # FIFO's valid for the sequencer is held while the loader takes words), so its META beat
        # comes no earlier than c + 1 after the load's last take in cycle c. A write and a read
        # address pass the same number of input registers (RegisteredRam), so a write presented
        # in an earlier cycle than a read lands before it. The last word's row is presented in
        # c + land; the row k rows before it in load order (rows of a token, then its lane, then
        # its group) earlier still, since words are taken at most one a cycle. A MATMUL issues
        # its META beat first and at least one code beat per row before it, so with its META
        # beat in cycle b it reads a token's row r from b + 1 + r on, presented ADDR_STAGES
        # later: every read is of a landed row when b > c + land - ADDR_STAGES - R (R rows per
        # token). With b = c + 1 that is R >= land - ADDR_STAGES: such a MATMUL may start at any
        # time during the load (`early`). Otherwise it starts, from registers only (the last
        # take registered, then a count), in c + 3 + hold at the earliest. The block sums are
        # read `xs_delay` cycles after their row and land `latency` + `pad` cycles after it.
        assert self._xs_delay >= latency + pad, "block sums would be read before they land"
        early_rows = land - ADDR_STAGES
        margin = land - ADDR_STAGES - 3
        hold = Signal(range(land + 1))
        early = Signal()
        with m.If(~busy):
            m.d.sync += early.eq(rows_per_token >= early_rows)
            if margin > 0:                  # else no row count needs a hold
                m.d.sync += hold.eq(Mux(rows_per_token >= margin, 0, margin - rows_per_token))
        last_a = Signal()                       # the load's last word was taken in the cycle before
        m.d.sync += last_a.eq(take & one_left)
        wait = Signal.like(hold)
        with m.If(self.load_start):
            m.d.sync += wait.eq(land)
        with m.Elif(last_a):
            m.d.sync += wait.eq(hold)
        with m.Elif(~loading & (wait != 0)):
            m.d.sync += wait.eq(wait - 1)
        safe = Signal(init=1)
        m.d.sync += safe.eq(~self.load_start & ~loading & ~last_a & (wait == 0))
        m.d.comb += [self.load_busy.eq(busy), self.reads_safe.eq(safe | (busy & early))]

    @staticmethod
    def _write(m, g: Geometry, rams, valid, target, value):
        """Write `value` into the RAM of `target`'s token lane at its row address."""
        lane_sel = target[g.pass_bits + g.act_row_addr_bits:]
        for i, ram in enumerate(rams):
            m.d.comb += [
                ram.w_addr.eq(target[:g.pass_bits + g.act_row_addr_bits]),
                ram.w_data.eq(value),
                ram.w_en.eq(valid & ((lane_sel == i) if g.tokens_parallel > 1 else 1)),
            ]

    # -- MATMUL: RAM rows -> activations aligned to the beat's code lanes ------------------------
    def _elaborate_read(self, m, g: Geometry, act_rams, sum_rams, platform):
        # The offset travels beside the RAM read and the fabric register after it (ROW_LATENCY
        # cycles): the alignment multiplexers work on that register. offs[i]: the offset i cycles
        # later; the block sums' read follows xs_delay cycles behind, so the chain goes on.
        offs = [self.rd_offset]
        for i in range(self._xs_delay + ROW_LATENCY - 1):
            d = Signal.like(self.rd_offset, name=f"rd_offset_d{i}")
            m.d.sync += d.eq(offs[-1])
            offs.append(d)
        # Offsets a lane can see: a beat of N_c codes starts at a multiple of N_c within the row.
        n_cs = {b: g.codes_per_beat(b) for b in g.cfg.bits}
        all_offsets = sorted({o for n in n_cs.values() for o in range(0, g.lanes, n)})
        # The offset steers every activation lane's multiplexer: it arrives decoded (one select
        # bit per offset), one copy per token and group of LANE_GROUP lanes, from a tree of
        # register copies (rtl/fanout.py), so no net fans out across the lanes.
        groups = -(-g.lanes // LANE_GROUP)
        leaves = g.tokens_parallel * groups
        tree_latency = 1 if leaves <= SEL_BRANCHING else 2
        decoded = Cat(*(offs[ROW_LATENCY - tree_latency] == o for o in all_offsets))
        sel_copies, latency = copy_tree(m, decoded, leaves, "offset_sel", platform, branching=SEL_BRANCHING)
        assert latency == tree_latency
        # The block RAMs sit in fixed columns, the lanes' multiplexers wherever the lanes are: the
        # RAM's output register, then a fabric one, so that route gets a cycle of its own.
        # The sequencer sits by the memory side, the block RAMs in their columns: the address
        # takes a register of its own on the way (ADDR_STAGES) before the RAMs' input trees.
        rd_addr_q = Signal.like(self.rd_addr)
        m.d.sync += rd_addr_q.eq(self.rd_addr)
        rows = []
        for t, ram in enumerate(act_rams):
            m.d.comb += ram.r_addr.eq(rd_addr_q)
            row_q = Signal(data.ArrayLayout(signed(ACT_BITS), g.lanes), name=f"row_q{t}")
            m.d.sync += row_q.eq(ram.r_data)
            rows.append(row_q)

        for t, rp in enumerate(rows):
            for j in range(g.lanes):
                sel = sel_copies[t * groups + j // LANE_GROUP]
                offsets = sorted({o for n in n_cs.values() if j < n for o in range(0, g.lanes, n)})
                lane_act = Signal(signed(ACT_BITS), name=f"act_t{t}_l{j}")
                value = rp[_stored_position(g, j)]          # offset 0, and any other offset
                for o in offsets:
                    if o:
                        value = Mux(sel[all_offsets.index(o)], rp[_stored_position(g, o + j)], value)
                m.d.comb += lane_act.eq(value)
                # two registers: the aligned activations travel from the RAMs to lanes spread
                # over the device, and one hop of routing takes most of a cycle by itself
                near = Signal(signed(ACT_BITS), name=f"act_near_t{t}_l{j}")
                m.d.sync += [near.eq(lane_act), self.acts[t][j].eq(near)]
        self._elaborate_sums_read(m, g, sum_rams, offs, n_cs, platform)

    def _elaborate_sums_read(self, m, g: Geometry, sum_rams, offs, n_cs, platform):
        """The block sums of a read, xs_delay cycles after its row: the same address register,
        RAM read and fabric register, then one slot select and two registers."""
        addr = self.rd_addr
        for i in range(self._xs_delay + ADDR_STAGES):
            d = Signal.like(self.rd_addr, name=f"xs_addr_d{i}")
            m.d.sync += d.eq(addr)
            addr = d
        # Which block sum each beat slot takes (slot k <- block i), from the format and the
        # offset a cycle before the row arrives, one registered copy per token.
        off_prev = offs[self._xs_delay + ROW_LATENCY - 1]
        takes = {(k, i): [] for k in range(g.blocks) for i in range(g.blocks)}
        for b, n in n_cs.items():
            for o in range(0, g.lanes, n):
                first = o // g.block
                if n >= g.block:
                    for k in range(n // g.block):
                        takes[(k, first + k)].append((self.bits == b) & (off_prev == o))
                elif o % g.block == 0:
                    takes[(0, first)].append((self.bits == b) & (off_prev == o))
        xslot_next = Cat(*(reduce(operator.or_, takes[(k, i)]) if takes[(k, i)] else Const(0, 1)
                           for k in range(g.blocks) for i in range(g.blocks)))
        xslot_sel = register_copies(m, xslot_next, g.tokens_parallel, "xslot_sel", platform, distinct=False)
        for t, ram in enumerate(sum_rams):
            m.d.comb += ram.r_addr.eq(addr)
            xsums = Signal(data.ArrayLayout(signed(g.xsum_bits), g.blocks), name=f"xsum_q{t}")
            m.d.sync += xsums.eq(ram.r_data)
            # Block sums per beat slot: the blocks that start inside the beat, in order; slot k
            # takes block i where xslot_sel (decoded a cycle ahead) says so, else 0.
            slots = [Signal(signed(g.xsum_bits), name=f"xslot_t{t}_{k}") for k in range(g.blocks)]
            sel = xslot_sel[t]
            for k in range(g.blocks):
                picked = [Mux(sel[k * g.blocks + i], xsums[i], 0) for i in range(g.blocks)]
                m.d.comb += slots[k].eq(reduce(operator.or_, picked))
            for k in range(g.blocks):
                near = Signal(signed(g.xsum_bits), name=f"xslot_near_t{t}_{k}")
                m.d.sync += [near.eq(slots[k]), self.xslots[t][k].eq(near)]
