"""NdpUnit: the near-data low-bit GEMM engine, top level.

    cmd ──> controller ──> DescriptorCheck ──> MemReader ──> mem_req / mem_resp
                                                  │ words
                      LOAD_ACT ┌──────────────────┴──────────┐ MATMUL
                               v                             v
                    ActivationBuffer <── act_addr ── MatmulSequencer (credits)
                               │ acts, sums(x)               │ beats
                               v                             v
                          MultiplyLanes <──── codes ──── Unpacker
                               │ block sums of q x
                               v
                         GroupCombiner ──> ScaleAccumulator ──> ResultOutput ──> out
    RegisterBlock: status, counters

Pipeline, counted in cycles from the sequencer issuing a beat (S0): the beat and the activation
RAM address (S0), the address registers beside each block RAM (S1), the block-RAM read (S2), its
output register (S3), the aligned activations registered twice on their way to the lanes while
the beat's word is unpacked in two stages (S4-S5); then at the lanes the input registers, the
products' adder levels and the block adder tree, each registered; the group combiner (4 stages),
the zero and scale multiplies (registered DSPs, rtl/hard_blocks.py), the slot tree, the
accumulator, the output FIFO, a register slice at the result port. Memory words reach the
sequencer through a small FIFO with a registered ready (rtl/response_fifo.py). Nothing in it
stalls; the sequencer holds back instead (see result_output.py). A descriptor is taken only when
the unit is not BUSY; `done` pulses for one cycle a cycle after it ends (DONE or ERROR), and the
next descriptor is taken from the cycle `done` is high.

Tokens: `cfg.tokens_parallel` (TP) tokens are multiplied per beat. A MATMUL of T tokens gives
each code word ceil(T / TP) beats (passes), so it runs at one word per cycle for T <= TP and at
one word per ceil(T / TP) cycles above, while memory is read once either way.

Cycles of a MATMUL with a memory that keeps up (contract.Descriptor.beats; the overhead is the
one `ndpmoe sim --bench` measures, in the README's NDP unit figures):
    busy ~= overhead + metadata words + 3-bit hi-plane words + ceil(T / TP) x code words,
and never fewer than rows x T (the output stream carries one result per cycle). A LOAD_ACT
reads one word per cycle.
"""
from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from ndpmoe.model.contract import NdpConfig

from .act_buffer import READ_LATENCY, ActivationBuffer, xslots_layout
from .descriptor_check import DescriptorCheck
from .geometry import Geometry
from .group_combiner import GroupCombiner
from .mem_reader import MemReader, mem_request_layout
from .multiply_lanes import MultiplyLanes
from .register_slice import RegisterSlice
from .registers import RegisterBlock
from .response_fifo import ResponseFifo
from .result_output import ResultOutput
from .scale_accumulator import ScaleAccumulator
from .sequencer import BeatKind, MatmulSequencer, mode_layout
from .shapes import CountersLayout, DescriptorLayout, ErrorShape, OpcodeShape, StateShape, StatusLayout, result_layout
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
        "word": unsigned(g.word_bits),
    })


class NdpUnit(wiring.Component):
    """The unit for one NdpConfig. Ports:

    cmd       In  stream of DESCRIPTOR
    mem_req   Out stream of (addr: byte address, words: 1..max_burst)
    mem_resp  In  stream of P-bit words, in request order, any latency
    out       Out stream of output_struct(t_max) results, golden order
    status    Out STATUS
    counters  Out COUNTERS
    done      Out one-cycle pulse when a descriptor ends
    """

    def __init__(self, cfg: NdpConfig, *, max_burst: int = 256, out_fifo_depth: int = 16):
        if not isinstance(cfg, NdpConfig):
            raise TypeError(f"cfg must be an NdpConfig, not {cfg!r}")
        self._cfg = cfg
        self._geo = g = Geometry(cfg)
        self._max_burst = max_burst
        self._out_fifo_depth = out_fifo_depth
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

    def elaborate(self, platform):
        m = Module()
        g, cfg = self._geo, self._cfg

        m.submodules.check = check = DescriptorCheck(g)
        m.submodules.reader = reader = MemReader(word_bits=cfg.word_bits, addr_bits=cfg.addr_bits,
                                                 length_bits=g.length_bits, max_burst=self._max_burst)
        m.submodules.act = act = ActivationBuffer(g)
        m.submodules.seq = seq = MatmulSequencer(g)
        m.submodules.responses = responses = ResponseFifo(cfg.word_bits)
        tag = beat_tag_layout(g)
        m.submodules.unpack = unpack = Unpacker(g, tag)
        lanes_tag = data.StructLayout({"beat": tag, "xs": xslots_layout(g)})
        m.submodules.lanes = lanes = MultiplyLanes(g, lanes_tag)
        m.submodules.groups = groups = GroupCombiner(g)
        m.submodules.scale = scale = ScaleAccumulator(g)
        m.submodules.output = output = ResultOutput(g, self._out_fifo_depth)
        m.submodules.regs = regs = RegisterBlock()
        # the consumer's ready reaches only a register slice at the edge (rtl/register_slice.py)
        m.submodules.out_slice = out_slice = RegisterSlice(result_layout(cfg.t_max))

        wiring.connect(m, reader.mem_req, wiring.flipped(self.mem_req))
        wiring.connect(m, wiring.flipped(self.mem_resp), reader.mem_resp)
        wiring.connect(m, output.out, out_slice.i)
        wiring.connect(m, out_slice.o, wiring.flipped(self.out))
        wiring.connect(m, reader.data, responses.i)

        # -- controller ---------------------------------------------------------------------------
        desc = Signal(DescriptorLayout)
        state = Signal(StateShape, init=StateShape.IDLE)
        error = Signal(ErrorShape)
        loaded_tokens = Signal(g.token_bits)
        loaded_in = Signal(g.in_bits)
        mode = Signal(mode_layout(g))
        is_load = Signal()
        start_check = Signal()
        start_read = Signal()           # the reader's command valid, a register (Check -> Start)
        matmul_done = Signal()          # registered: sequencer through (and not just starting), output drained
        done = Signal()                 # the state leaves BUSY (DONE or ERROR)
        done_out = Signal()             # `done` a cycle later, when every counter has its count
        m.d.sync += done_out.eq(done)

        m.d.comb += [
            check.desc.eq(desc), check.loaded_tokens.eq(loaded_tokens), check.loaded_in.eq(loaded_in),
            check.start.eq(start_check),
            reader.cmd.payload.addr.eq(desc.addr),
            reader.cmd.payload.words.eq(check.words),
            reader.cmd.valid.eq(start_read),
            seq.mode.eq(mode),
            act.load_tokens.eq(desc.tokens),
            act.load_in.eq(desc.in_features),
            act.bits.eq(mode.bits),
            output.tokens.eq(mode.tokens),
            self.done.eq(done_out),
        ]
        m.d.sync += [start_check.eq(0), start_read.eq(0), done.eq(0),
                     matmul_done.eq(~seq.active & output.idle & out_slice.empty & ~seq.start)]

        # The run's settings are taken whenever the check finishes, refused or not (a refused
        # descriptor runs nothing), so their enable is the check's `done` register alone.
        with m.If(check.done):
            m.d.sync += [
                is_load.eq(desc.opcode == OpcodeShape.LOAD_ACT),
                mode.bits.eq(desc.bits), mode.group.eq(desc.group),
                mode.padded_in.eq(check.padded_in), mode.passes.eq(check.passes),
                mode.rows.eq(desc.rows), mode.tokens.eq(desc.tokens),
            ]

        with m.FSM(name="control"):
            with m.State("Idle"):
                m.d.comb += self.cmd.ready.eq(1)
                with m.If(self.cmd.valid):
                    m.d.sync += [desc.eq(self.cmd.payload), state.eq(StateShape.BUSY),
                                 error.eq(ErrorShape.NONE), start_check.eq(1)]
                    m.next = "Check"
            with m.State("Check"):
                with m.If(check.done):
                    with m.If(check.error != ErrorShape.NONE):
                        m.d.sync += [state.eq(StateShape.ERROR), error.eq(check.error),
                                     done.eq(1)]
                        m.next = "Finish"
                    with m.Elif(desc.opcode == OpcodeShape.NOP):
                        m.d.sync += [state.eq(StateShape.DONE), done.eq(1)]
                        m.next = "Finish"
                    with m.Else():
                        m.d.sync += start_read.eq(1)
                        m.next = "Start"
            with m.State("Start"):
                with m.If(is_load):
                    m.d.comb += act.load_start.eq(1)
                    m.next = "Load"
                with m.Else():
                    m.d.comb += seq.start.eq(1)
                    m.next = "Matmul"
            with m.State("Load"):
                with m.If(~reader.busy & responses.empty & ~act.load_busy):
                    m.d.sync += [loaded_tokens.eq(desc.tokens), loaded_in.eq(desc.in_features),
                                 state.eq(StateShape.DONE), done.eq(1)]
                    m.next = "Finish"
            with m.State("Finish"):
                # a cycle between a descriptor's end and the next one's start, so that the
                # counters, which count a cycle late, are complete when `done` is seen
                m.next = "Idle"
            with m.State("Matmul"):
                with m.If(matmul_done):
                    m.d.sync += [state.eq(StateShape.DONE), done.eq(1)]
                    m.next = "Finish"

        # Response words go to the activation loader or the sequencer.
        m.d.comb += [
            # the loader takes words only while loading, the sequencer only while active, and
            # the two never overlap: neither needs the opcode in its handshake
            act.words.valid.eq(responses.o.valid),
            act.words.payload.eq(responses.o.payload),
            seq.words.valid.eq(responses.o.valid),
            seq.words.payload.eq(responses.o.payload),
            responses.o.ready.eq(act.words.ready | seq.words.ready),
        ]

        # -- datapath -------------------------------------------------------------------------------
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
                     s1.row_end.eq(beat.row_end), s1.row.eq(beat.row), s1.word.eq(beat.word)]
        for i in range(READ_LATENCY - UNPACK_LATENCY):
            d_valid, d, d_lo_half = Signal(name=f"beat_valid_d{i}"), Signal(tag, name=f"beat_d{i}"), \
                Signal(name=f"beat_lo_half_d{i}")
            m.d.sync += [d_valid.eq(s1_valid), d.eq(s1), d_lo_half.eq(s1_lo_half)]
            s1_valid, s1, s1_lo_half = d_valid, d, d_lo_half
        m.d.comb += [
            unpack.valid.eq(s1_valid), unpack.kind.eq(s1.kind), unpack.lo_half.eq(s1_lo_half),
            unpack.word.eq(s1.word), unpack.bits.eq(mode.bits), unpack.tag_in.eq(s1),
            lanes.valid.eq(unpack.valid_out), lanes.codes.eq(unpack.codes), lanes.acts.eq(act.acts),
            lanes.tag_in.beat.eq(unpack.tag_out), lanes.tag_in.xs.eq(act.xslots),
        ]
        bt = lanes.tag_out.beat
        m.d.comb += [
            groups.valid.eq(lanes.valid_out), groups.kind.eq(bt.kind), groups.pass_.eq(bt.pass_),
            groups.i0.eq(bt.i0), groups.row_end.eq(bt.row_end), groups.row.eq(bt.row),
            groups.word.eq(bt.word), groups.qx.eq(lanes.sums), groups.xs.eq(lanes.tag_out.xs),
            groups.bits.eq(mode.bits), groups.group.eq(mode.group), groups.passes.eq(mode.passes),
            scale.passes.eq(mode.passes),
            scale.valid.eq(groups.code_valid), scale.pass_.eq(groups.pass_out),
            scale.row_end.eq(groups.row_end_out), scale.row.eq(groups.row_out),
            scale.groups.eq(groups.groups),
        ]
        wiring.connect(m, scale.entry, output.entry)

        # -- registers --------------------------------------------------------------------------------
        busy = state == StateShape.BUSY
        wants_word = Mux(is_load, act.words.ready, seq.want_word)
        # counted two cycles late (its terms registered where they come from, then their AND): a
        # stall needs words in flight, and the last word is followed by more than two cycles of
        # pipeline, so none falls in a descriptor's last cycles and the counts at `done` are exact
        stall_terms = Signal(4)
        mem_stall = Signal()
        m.d.sync += [stall_terms.eq(Cat(busy, reader.waiting, wants_word, ~responses.o.valid)),
                     mem_stall.eq(stall_terms.all())]
        # The BUSY cycles and the port handshakes are counted a cycle late too (the state and the
        # readies fan out from elsewhere): `done` is seen a cycle after the state leaves BUSY
        # (the Finish state keeps the next descriptor out meanwhile), four after the last
        # result's handshake and many after the last memory word, so the counts are exact at
        # `done`.
        busy_event = Signal()
        m.d.sync += busy_event.eq(busy)
        port_events = Signal(3)
        m.d.sync += port_events.eq(Cat(busy & self.out.valid & ~self.out.ready,
                                       self.mem_resp.valid & self.mem_resp.ready,
                                       self.out.valid & self.out.ready))
        m.d.comb += [
            regs.state.eq(state), regs.error.eq(error),
            regs.ev_busy_cycles.eq(busy_event),
            regs.ev_mem_stall_cycles.eq(mem_stall),
            regs.ev_out_stall_cycles.eq(port_events[0]),
            regs.ev_words_read.eq(port_events[1]),
            regs.ev_results_written.eq(port_events[2]),
        ]
        m.d.comb += [self.status.eq(regs.status), self.counters.eq(regs.counters)]
        return m

