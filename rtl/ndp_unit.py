"""NdpUnit: the near-data low-bit GEMM engine, top level.

    cmd ──> CommandQueue ──> DescriptorCheck ──> DescriptorSlots ──> MemReader ──> mem_req / mem_resp
                                                   │ start                │ words
                      LOAD_ACT ┌───────────────────┴──────────┐ MATMUL   │
                               v                              v          v
                    ActivationBuffer <── act_addr ── MatmulSequencer (credits)
                               │ acts, sums(x)                │ beats
                               v                              v
                          MultiplyLanes <──── codes ──── Unpacker
                               │ block sums of q x
                               v
                         GroupCombiner ──> ScaleAccumulator ──> ResultOutput ──> out
    RegisterBlock: status, counters, done

Descriptors overlap. The host hands over descriptors into a queue (`queue_depth` deep) while one
runs; each is checked in turn and takes one of two slots (rtl/descriptor_slots.py), which issue
its memory read as soon as the reader has sent the previous one's requests, and start it as soon
as the sequencer (MATMUL) or the loader (LOAD_ACT) is free: a MATMUL's first beat follows the
last beat of the MATMUL before by two cycles, while that one's results still drain. A MATMUL
may start while the load before it still takes words (it takes its own words right after the
load's last one) when its reads of the activation RAM come after the load has presented each row
they read, else once they do; a LOAD_ACT waits for the MATMUL before it to have issued its last
activation read. Descriptors end in order; `done` pulses once per descriptor (never in two
cycles running), with STATUS and the counters exact for it (rtl/registers.py).

The per-descriptor settings of a MATMUL (bits, group, passes, tokens) are taken when its first
beat issues, and each pipeline stage sees them delayed by its distance from the sequencer, so
the beats of two MATMULs can follow each other through the pipeline without a gap.

Pipeline, counted in cycles from the sequencer issuing a beat (S0): the beat and the activation
RAM address (S0), the address registers beside each block RAM (S1), the block-RAM read (S2), its
output register (S3), the aligned activations registered twice on their way to the lanes while
the beat's word is unpacked in two stages (S4-S5); then at the lanes the input registers, the
products' adder levels and the block adder tree, each registered; the group combiner (4 stages),
the zero and scale multiplies (registered DSPs, rtl/hard_blocks.py), the slot tree, the
accumulator, the output FIFO, a register slice at the result port. Memory words reach the
sequencer through a small FIFO with a registered ready (rtl/response_fifo.py). Nothing in it
stalls; the sequencer holds back instead (see result_output.py).

Tokens: `cfg.tokens_parallel` (TP) tokens are multiplied per beat. A MATMUL of T tokens gives
each code word ceil(T / TP) beats (passes), so it runs at one word per cycle for T <= TP and at
one word per ceil(T / TP) cycles above, while memory is read once either way.

Cycles of a MATMUL with a memory that keeps up (contract.Descriptor.beats; the overheads are the
ones `ndpmoe sim --bench` measures, in the README's NDP unit figures): alone,
    busy ~= overhead + metadata words + 3-bit hi-plane words + ceil(T / TP) x code words,
and never fewer than rows x T (the output stream carries one result per cycle); behind another
descriptor, a few cycles beyond its beats. A LOAD_ACT reads one word per cycle.
"""
from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from ndpmoe.model.contract import NdpConfig

from .act_buffer import BITS_AT as ACT_BITS_AT
from .act_buffer import READ_LATENCY, ActivationBuffer
from .command_queue import CommandQueue
from .descriptor_check import DescriptorCheck
from .descriptor_slots import SLOTS, DescriptorSlots, RunKind, checked_layout
from .geometry import Geometry
from .group_combiner import BITS_AT as GROUP_BITS_AT
from .group_combiner import LATENCY as GROUP_LATENCY
from .group_combiner import PASSES_AT as GROUP_PASSES_AT
from .group_combiner import GroupCombiner
from .mem_reader import MemReader, mem_request_layout
from .multiply_lanes import MultiplyLanes
from .register_slice import RegisterSlice
from .registers import RegisterBlock
from .response_fifo import ResponseFifo
from .result_output import TOKENS_AT, ResultOutput, tagged_result_layout
from .scale_accumulator import ScaleAccumulator
from .sequencer import BeatKind, MatmulSequencer, mode_layout
from .shapes import CountersLayout, DescriptorLayout, ErrorShape, OpcodeShape, StatusLayout, result_layout
from .unpacker import LATENCY as UNPACK_LATENCY
from .unpacker import Unpacker


def beat_tag_layout(g: Geometry) -> data.StructLayout:
    """What a beat carries past the unpacker: everything but the codes."""
    return data.StructLayout({
        "kind": BeatKind,
        "pass_": unsigned(g.pass_bits),
        "i0": unsigned(g.in_bits),
        "row_end": unsigned(1),
        "row": unsigned(g.row_bits),
        "last": unsigned(1),
        "word": unsigned(g.word_bits),
    })


class NdpUnit(wiring.Component):
    """The unit for one NdpConfig. Ports:

    cmd       In  stream of DESCRIPTOR (ready low for a cycle after each transfer)
    mem_req   Out stream of (addr: byte address, words: 1..max_burst)
    mem_resp  In  stream of P-bit words, in request order, any latency
    out       Out stream of output_struct(t_max) results, golden order
    status    Out STATUS
    counters  Out COUNTERS
    done      Out one-cycle pulse per descriptor, in order, when it has ended
    """

    def __init__(self, cfg: NdpConfig, *, max_burst: int = 256, out_fifo_depth: int = 16, queue_depth: int = 2):
        if not isinstance(cfg, NdpConfig):
            raise TypeError(f"cfg must be an NdpConfig, not {cfg!r}")
        if not isinstance(queue_depth, int) or queue_depth < 1:
            raise ValueError(f"queue_depth must be a positive integer, not {queue_depth!r}")
        self._cfg = cfg
        self._geo = g = Geometry(cfg)
        self._max_burst = max_burst
        self._out_fifo_depth = out_fifo_depth
        self._queue_depth = queue_depth
        super().__init__({
            "cmd": In(stream.Signature(DescriptorLayout)),
            "mem_req": Out(stream.Signature(mem_request_layout(cfg.addr_bits, max_burst))),
            "mem_resp": In(stream.Signature(unsigned(cfg.word_bits))),
            "out": Out(stream.Signature(result_layout(cfg.t_max))),
            "status": Out(StatusLayout),
            "counters": Out(CountersLayout),
            "done": Out(1),
        })

    @property
    def cfg(self) -> NdpConfig:
        return self._cfg

    @property
    def geometry(self) -> Geometry:
        return self._geo

    @property
    def max_burst(self) -> int:
        return self._max_burst

    @property
    def queue_depth(self) -> int:
        return self._queue_depth

    def elaborate(self, platform):
        m = Module()
        g, cfg = self._geo, self._cfg

        m.submodules.queue = queue = CommandQueue(DescriptorLayout, self._queue_depth)
        m.submodules.check = check = DescriptorCheck(g)
        m.submodules.slots = slots = DescriptorSlots(g)
        m.submodules.reader = reader = MemReader(word_bits=cfg.word_bits, addr_bits=cfg.addr_bits,
                                                 length_bits=g.length_bits, max_burst=self._max_burst)
        tag = beat_tag_layout(g)
        m.submodules.lanes = lanes = MultiplyLanes(g, tag)
        # the block sums are read when the lanes' sums come out, beside the beat's tag
        m.submodules.act = act = ActivationBuffer(g, xs_delay=lanes.latency)
        m.submodules.seq = seq = MatmulSequencer(g)
        m.submodules.responses = responses = ResponseFifo(cfg.word_bits)
        m.submodules.unpack = unpack = Unpacker(g, tag)
        m.submodules.groups = groups = GroupCombiner(g)
        m.submodules.scale = scale = ScaleAccumulator(g)
        m.submodules.output = output = ResultOutput(g, self._out_fifo_depth)
        m.submodules.regs = regs = RegisterBlock(g.length_bits)
        # the consumer's ready reaches only a register slice at the edge (rtl/register_slice.py),
        # which leaves a cycle free after each descriptor's last result
        m.submodules.out_slice = out_slice = RegisterSlice(tagged_result_layout(cfg.t_max), gap_after="last")

        wiring.connect(m, wiring.flipped(self.cmd), queue.i)
        wiring.connect(m, reader.mem_req, wiring.flipped(self.mem_req))
        wiring.connect(m, wiring.flipped(self.mem_resp), reader.mem_resp)
        wiring.connect(m, output.out, out_slice.i)
        m.d.comb += [self.out.valid.eq(out_slice.o.valid), self.out.payload.eq(out_slice.o.payload.result),
                     out_slice.o.ready.eq(self.out.ready)]
        wiring.connect(m, reader.data, responses.i)
        wiring.connect(m, slots.read, reader.cmd)

        # -- check: the queue's descriptors one at a time -------------------------------------------
        desc = Signal(DescriptorLayout)
        checking = Signal()
        start_check = Signal()
        checked = Signal(checked_layout(g))
        checked_valid = Signal()
        # what the last LOAD_ACT that passed its check loaded: it will run to its end, so the
        # descriptors after it are checked against it while it still loads
        loaded_tokens = Signal(g.token_bits)
        loaded_in = Signal(g.in_bits)
        m.d.comb += [
            check.desc.eq(desc), check.loaded_tokens.eq(loaded_tokens), check.loaded_in.eq(loaded_in),
            check.start.eq(start_check),
            queue.o.ready.eq(~checking & ~checked_valid),
            slots.fill.valid.eq(checked_valid), slots.fill.payload.eq(checked),
        ]
        m.d.sync += start_check.eq(0)
        # the register follows the queue's head while no check runs (the wide load enable is one
        # flip-flop), and holds it through the check
        with m.If(~checking):
            m.d.sync += desc.eq(queue.o.payload)
        with m.If(queue.o.valid & queue.o.ready):
            m.d.sync += [checking.eq(1), start_check.eq(1)]
        with m.If(check.done):
            refused = check.error != ErrorShape.NONE
            is_load = desc.opcode == OpcodeShape.LOAD_ACT
            kind = Mux(refused | (desc.opcode == OpcodeShape.NOP), RunKind.NONE,
                       Mux(is_load, RunKind.LOAD, RunKind.MATMUL))
            m.d.sync += [
                checking.eq(0), checked_valid.eq(1),
                checked.kind.eq(kind), checked.error.eq(check.error),
                checked.addr.eq(desc.addr), checked.words.eq(check.words),
                checked.mode.bits.eq(desc.bits), checked.mode.group.eq(desc.group),
                checked.mode.padded_in.eq(check.padded_in), checked.mode.passes.eq(check.passes),
                checked.mode.rows.eq(desc.rows), checked.mode.tokens.eq(desc.tokens),
                checked.load_in.eq(desc.in_features),
            ]
            with m.If(~refused & is_load):
                m.d.sync += [loaded_tokens.eq(desc.tokens), loaded_in.eq(desc.in_features)]
        with m.If(slots.fill.valid & slots.fill.ready):
            m.d.sync += checked_valid.eq(0)

        # -- start: the sequencer or the loader, when free ------------------------------------------
        ex = slots.exec_entry
        seq_active_d = Signal()         # a LOAD_ACT waits a cycle more: the last beat's RAM read
        m.d.sync += seq_active_d.eq(seq.active)
        # each a LUT of five flip-flops; what they start follows the staged descriptor while idle
        # (the sequencer, the loader, run_mode), so a start itself sets only a few flags
        start_matmul = slots.exec_matmul & ~seq.active & act.reads_safe
        start_load = slots.exec_load & ~seq.active & ~seq_active_d & ~act.load_busy
        m.d.comb += [
            slots.exec_start.eq(start_matmul | start_load),
            seq.start.eq(start_matmul), seq.mode.eq(ex.mode),
            act.load_start.eq(start_load), act.load_in.eq(ex.load_in),
            act.load_words.eq(ex.words),
        ]
        # ends: a load when the loader has landed its last row, a MATMUL when its last result leaves
        load_running = Signal()
        load_finished = load_running & ~act.load_busy
        with m.If(start_load):
            m.d.sync += load_running.eq(1)
        with m.Elif(load_finished):
            m.d.sync += load_running.eq(0)
        last_fire = Signal()            # registered: the port's handshake reaches one flip-flop more
        m.d.sync += last_fire.eq(self.out.valid & self.out.ready & out_slice.o.payload.last)
        m.d.comb += [slots.load_finished.eq(load_finished), slots.matmul_finished.eq(last_fire)]

        # Response words go to the activation loader or the sequencer: the loader takes words only
        # while loading, the sequencer only while active and the loader is not loading (a MATMUL
        # may start during the load before it; its words follow the load's), from a valid flag
        # the FIFO registers with that condition.
        m.d.comb += [
            act.words.valid.eq(responses.o.valid),
            act.words.payload.eq(responses.o.payload),
            responses.hold_next.eq(act.loading_next),
            seq.words.valid.eq(responses.valid_unheld),
            seq.words.payload.eq(responses.o.payload),
            responses.o.ready.eq(act.words.ready | seq.words.ready),
        ]

        # -- datapath -------------------------------------------------------------------------------
        # The MATMUL settings of the beats the sequencer issues from now on, and copies of each
        # delayed to where a stage uses it for a beat (every stage documents that offset).
        run_mode = Signal(mode_layout(g))
        with m.If(~seq.active):
            # beats issue only while active, so following the staged descriptor until the start
            # is the same as taking its mode at the start
            m.d.sync += run_mode.eq(ex.mode)
        chains: dict[str, list] = {}

        def setting(name: str, at: int):
            """run_mode.`name` as it was `at` cycles ago: what a stage `at` cycles behind the
            sequencer uses for its beat."""
            assert at >= 0, f"{name} needed {-at} cycles before its beat issues"
            chain = chains.setdefault(name, [getattr(run_mode, name)])
            while len(chain) <= at:
                d = Signal.like(chain[-1], name=f"run_{name}_d{len(chain)}")
                m.d.sync += d.eq(chain[-1])
                chain.append(d)
            return chain[at]

        unpack_at = READ_LATENCY - UNPACK_LATENCY       # where a beat reaches each stage
        groups_at = READ_LATENCY + lanes.latency
        scale_at = groups_at + GROUP_LATENCY
        output_at = scale_at + scale.latency
        m.d.comb += [
            act.bits.eq(setting("bits", ACT_BITS_AT + lanes.latency)),
            unpack.bits.eq(setting("bits", unpack_at + unpack.bits_at)),
            groups.bits.eq(setting("bits", groups_at + GROUP_BITS_AT)),
            groups.group.eq(setting("group", groups_at + GROUP_BITS_AT)),
            groups.passes.eq(setting("passes", groups_at + GROUP_PASSES_AT)),
            scale.passes.eq(setting("passes", scale_at + scale.passes_at)),
            output.tokens.eq(setting("tokens", output_at + TOKENS_AT)),
        ]

        beat = seq.beat.payload
        m.d.comb += [
            act.rd_addr.eq(seq.act_addr),
            act.rd_offset.eq(beat.i0[:len(act.rd_offset)]),
            seq.credit_ok.eq(output.credit_ok),
            output.credit_take.eq(seq.credit_take),
        ]
        # The beat waits READ_LATENCY - UNPACK_LATENCY cycles before the unpacker, as the
        # activations do in the buffer (RAM input registers, RAM read, RAM output register,
        # alignment, a register on the way to the lanes), so codes and activations meet at the lanes.
        s1_valid, s1_lo_half = seq.beat.valid, beat.lo_half
        s1 = Signal(tag)
        m.d.comb += [s1.kind.eq(beat.kind), s1.pass_.eq(beat.pass_), s1.i0.eq(beat.i0),
                     s1.row_end.eq(beat.row_end), s1.row.eq(beat.row), s1.last.eq(beat.last), s1.word.eq(beat.word)]
        for i in range(unpack_at):
            d_valid, d, d_lo_half = Signal(name=f"beat_valid_d{i}"), Signal(tag, name=f"beat_d{i}"), \
                Signal(name=f"beat_lo_half_d{i}")
            m.d.sync += [d_valid.eq(s1_valid), d.eq(s1), d_lo_half.eq(s1_lo_half)]
            s1_valid, s1, s1_lo_half = d_valid, d, d_lo_half
        m.d.comb += [
            unpack.valid.eq(s1_valid), unpack.kind.eq(s1.kind), unpack.lo_half.eq(s1_lo_half),
            unpack.word.eq(s1.word), unpack.tag_in.eq(s1),
            lanes.valid.eq(unpack.valid_out), lanes.codes.eq(unpack.codes), lanes.acts.eq(act.acts),
            lanes.tag_in.eq(unpack.tag_out),
        ]
        bt = lanes.tag_out
        m.d.comb += [
            groups.valid.eq(lanes.valid_out), groups.kind.eq(bt.kind), groups.pass_.eq(bt.pass_),
            groups.i0.eq(bt.i0), groups.row_end.eq(bt.row_end), groups.row.eq(bt.row), groups.last.eq(bt.last),
            groups.word.eq(bt.word), groups.qx.eq(lanes.sums), groups.xs.eq(act.xslots),
            scale.valid.eq(groups.code_valid), scale.pass_.eq(groups.pass_out),
            scale.row_end.eq(groups.row_end_out), scale.row.eq(groups.row_out), scale.last.eq(groups.last_out),
            scale.groups.eq(groups.groups),
        ]
        wiring.connect(m, scale.entry, output.entry)

        # -- registers ------------------------------------------------------------------------------
        # Descriptors in the unit, from their handshake to their end: queued, in the check, checked,
        # in a slot.
        in_unit = Signal(range(self._queue_depth + 3 + SLOTS))
        m.d.sync += in_unit.eq(in_unit + queue.taken - slots.complete)
        busy = in_unit != 0
        # Every event of cycle x reaches the register block registered, in cycle x + 1 (the memory
        # stall from four registered terms: a stall needs words in flight and the datapath
        # wanting one, and its terms come from four places).
        wants_word = act.words.ready | seq.want_word
        stall_terms = Signal(4)
        head_d = Signal()               # the oldest slot as of the word's cycle
        m.d.sync += [
            stall_terms.eq(Cat(busy, reader.waiting, wants_word, ~responses.o.valid)),
            head_d.eq(slots.head),
        ]
        for name, value in (("busy_cycles", busy),
                            ("out_stall_cycles", busy & self.out.valid & ~self.out.ready),
                            ("results_written", self.out.valid & self.out.ready),
                            ("complete", slots.complete),
                            ("outcome_state", slots.outcome_state),
                            ("outcome_error", slots.outcome_error)):
            port = getattr(regs, name)
            r = Signal.like(port, name=f"{name}_event")
            m.d.sync += r.eq(value)
            m.d.comb += port.eq(r)
        m.d.comb += [
            regs.mem_stall_cycles.eq(stall_terms.all()),
            # the reader says whose word it took, a cycle after the handshake
            regs.word.eq(reader.word_fire), regs.word_early.eq(reader.word_slot != head_d),
            regs.active.eq(busy),
            self.status.eq(regs.status), self.counters.eq(regs.counters), self.done.eq(regs.done),
        ]
        return m
