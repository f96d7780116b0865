"""The checked descriptors in flight, in order: each one's read, its start and its end.

Two slots, used in turn. A checked descriptor takes the next slot; three pointers then walk the
slots in the same order:

- read: its memory read is handed to the reader (MemReader takes the next command while the
  words of the one before still arrive, so the memory streams on);
- exec: it starts (the MATMUL sequencer or the activation loader, when the unit says they are
  free, see NdpUnit);
- head: it ends, oldest first: a refused descriptor or a NOP (kind NONE) as soon as it is the
  head, a LOAD_ACT once its load has finished, a MATMUL once its last result has left.
  `complete` is that cycle, at most every other cycle.

So one descriptor's check, its memory requests and its start overlap the tail of the one before,
while `done`, the status and the counters still come one descriptor at a time, in order. A
descriptor of kind NONE passes the read and exec pointers without doing anything, and no slot
is freed before both pointers have passed it, so a freed and refilled slot is never mistaken
for an older one. Two slots suffice: the one draining its results and the one streaming; the
words that arrive for the second before the first ends are the only ones the counters hold back
(rtl/registers.py).
"""
from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal, unsigned
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.wiring import In, Out

from .geometry import Geometry
from .mem_reader import read_command_layout
from .sequencer import mode_layout
from .shapes import ErrorShape, StateShape

SLOTS = 2


class RunKind(enum.Enum, shape=2):
    NONE = 0            # refused, or a NOP: runs nothing
    LOAD = 1
    MATMUL = 2


def checked_layout(g: Geometry) -> data.StructLayout:
    """A descriptor after its check: what it runs, and what its run needs."""
    return data.StructLayout({
        "kind": RunKind,
        "error": ErrorShape,
        "addr": unsigned(g.cfg.addr_bits),
        "words": unsigned(g.length_bits),          # its read
        "mode": mode_layout(g),                    # a MATMUL's settings (tokens also a LOAD_ACT's)
        "load_in": unsigned(g.in_bits),            # a LOAD_ACT's inputs per token
    })


class DescriptorSlots(wiring.Component):
    """Ports: `fill` (In stream of checked descriptors), `read` (Out stream of read commands,
    valid registered), `exec_load` / `exec_matmul` (the next descriptor to start is a LOAD_ACT /
    a MATMUL: one flip-flop each, so the unit's start decision is one LUT from registers),
    `exec_entry` / `exec_slot` (that descriptor, registered) and `exec_start` (In: it starts now),
    `load_finished` / `matmul_finished` (In:
    a load or a MATMUL has ended), `complete` (the head ends in this cycle) with `outcome_state`
    and `outcome_error`, `head` (the head's slot)."""

    def __init__(self, geometry: Geometry):
        if not isinstance(geometry, Geometry):
            raise TypeError(f"geometry must be a Geometry, not {geometry!r}")
        self._geo = g = geometry
        layout = checked_layout(g)
        super().__init__({
            "fill": In(stream.Signature(layout)),
            "read": Out(stream.Signature(read_command_layout(g.cfg.addr_bits, g.length_bits))),
            "exec_load": Out(1),
            "exec_matmul": Out(1),
            "exec_entry": Out(layout),
            "exec_slot": Out(1),
            "exec_start": In(1),
            "load_finished": In(1),
            "matmul_finished": In(1),
            "complete": Out(1),
            "outcome_state": Out(StateShape),
            "outcome_error": Out(ErrorShape),
            "head": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        layout = checked_layout(self._geo)
        entries = [Signal(layout, name=f"slot{i}") for i in range(SLOTS)]
        occupied = [Signal(name=f"occupied{i}") for i in range(SLOTS)]
        read_done = [Signal(name=f"read_done{i}") for i in range(SLOTS)]
        started = [Signal(name=f"started{i}") for i in range(SLOTS)]     # exec pointer passed it
        finished = [Signal(name=f"finished{i}") for i in range(SLOTS)]
        fill_ptr, read_ptr = Signal(name="fill_ptr"), Signal(name="read_ptr")
        exec_ptr, head = Signal(name="exec_ptr"), Signal(name="head")

        def at(flags, ptr):
            return Mux(ptr, flags[1], flags[0])

        def entry_at(ptr):
            return data.View(layout, Mux(ptr, entries[1].as_value(), entries[0].as_value()))

        # -- fill ---------------------------------------------------------------------------------
        m.d.comb += self.fill.ready.eq(~at(occupied, fill_ptr))
        for i in range(SLOTS):
            # a free slot follows the offered descriptor (its enable is one flip-flop), and the
            # fill only marks it taken
            with m.If(~occupied[i]):
                m.d.sync += entries[i].eq(self.fill.payload)
        with m.If(self.fill.valid & self.fill.ready):
            m.d.sync += fill_ptr.eq(~fill_ptr)
            for i in range(SLOTS):
                with m.If(fill_ptr == i):
                    m.d.sync += [occupied[i].eq(1), read_done[i].eq(0), started[i].eq(0), finished[i].eq(0)]

        # -- read: a command per LOAD_ACT / MATMUL, in order --------------------------------------
        r_entry = entry_at(read_ptr)
        r_waiting = at(occupied, read_ptr) & ~at(read_done, read_ptr)
        read_valid = Signal()
        m.d.comb += self.read.valid.eq(read_valid)
        with m.If(self.read.valid & self.read.ready):
            m.d.sync += [read_valid.eq(0), read_ptr.eq(~read_ptr)]
            for i in range(SLOTS):
                with m.If(read_ptr == i):
                    m.d.sync += read_done[i].eq(1)
        with m.Elif(~read_valid & r_waiting):
            with m.If(r_entry.kind == RunKind.NONE):
                m.d.sync += read_ptr.eq(~read_ptr)
                for i in range(SLOTS):
                    with m.If(read_ptr == i):
                        m.d.sync += read_done[i].eq(1)
            with m.Else():
                m.d.sync += read_valid.eq(1)
        # the command follows the read pointer's slot until it is offered, then holds
        with m.If(~read_valid):
            m.d.sync += [self.read.payload.addr.eq(r_entry.addr), self.read.payload.words.eq(r_entry.words),
                         self.read.payload.slot.eq(read_ptr)]

        # -- exec: the next one to start, staged in registers -------------------------------------
        # A descriptor of kind NONE is staged too (exec_skip) and passed a cycle later, so what
        # moves the pointer is three flip-flops and the unit's start decision, never the slots'
        # multiplexers.
        x_entry = entry_at(exec_ptr)
        x_waiting = at(occupied, exec_ptr) & ~at(started, exec_ptr)
        exec_skip = Signal()
        moves = self.exec_start | exec_skip
        staged = x_waiting & ~moves
        m.d.sync += [self.exec_load.eq(staged & (x_entry.kind == RunKind.LOAD)),
                     self.exec_matmul.eq(staged & (x_entry.kind == RunKind.MATMUL)),
                     exec_skip.eq(staged & (x_entry.kind == RunKind.NONE)),
                     self.exec_entry.eq(x_entry), self.exec_slot.eq(exec_ptr)]
        with m.If(moves):
            # (exec_start and exec_skip are for the staged slot, which is still exec_ptr's: it
            # moves only here)
            m.d.sync += exec_ptr.eq(~exec_ptr)
            for i in range(SLOTS):
                with m.If(exec_ptr == i):
                    m.d.sync += started[i].eq(1)

        # -- ends, oldest first -----------------------------------------------------------------
        h_entry = entry_at(head)
        h_started = at(started, head)

        def target(kind):
            """The slot an end of `kind` belongs to: the oldest started and unfinished one."""
            head_is = (h_entry.kind == kind) & h_started & ~at(finished, head)
            return Mux(head_is, head, ~head)

        load_slot, matmul_slot = target(RunKind.LOAD), target(RunKind.MATMUL)
        ends_now = Mux(h_entry.kind == RunKind.LOAD, self.load_finished & (load_slot == head),
                       (h_entry.kind == RunKind.MATMUL) & self.matmul_finished & (matmul_slot == head))
        completed_before = Signal()         # a cycle between completions (done pulses stay apart)
        complete = (at(occupied, head) & at(read_done, head) & h_started & ~completed_before
                    & ((h_entry.kind == RunKind.NONE) | at(finished, head) | ends_now))
        m.d.sync += completed_before.eq(complete)
        for i in range(SLOTS):
            with m.If(self.load_finished & (load_slot == i)):
                m.d.sync += finished[i].eq(1)
            with m.If(self.matmul_finished & (matmul_slot == i)):
                m.d.sync += finished[i].eq(1)
        with m.If(complete):
            m.d.sync += head.eq(~head)
            for i in range(SLOTS):
                with m.If(head == i):
                    m.d.sync += [occupied[i].eq(0), finished[i].eq(0)]
        refused = (h_entry.kind == RunKind.NONE) & (h_entry.error != ErrorShape.NONE)
        m.d.comb += [
            self.complete.eq(complete),
            self.outcome_state.eq(Mux(refused, StateShape.ERROR, StateShape.DONE)),
            self.outcome_error.eq(h_entry.error),
            self.head.eq(head),
        ]
        return m
