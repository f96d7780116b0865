"""Register block: the STATUS register and the performance counters the host reads.

STATUS (model.contract.STATUS)::

     5      2 1     0
    +--------+-------+
    | error  | state |     state: IDLE, BUSY, DONE, ERROR; error: ErrorCode of the last refusal
    +--------+-------+

COUNTERS (model.contract.COUNTERS), COUNTER_BITS each, counted since reset, never cleared
otherwise (the host takes differences):

    busy_cycles       cycles in BUSY (from taking a descriptor to its last result sent)
    mem_stall_cycles  BUSY cycles the datapath wanted a requested word that had not arrived
    out_stall_cycles  BUSY cycles a result waited on the output stream (valid, not ready)
    words_read        memory words received
    results_written   results sent on the output stream
"""
from __future__ import annotations

from amaranth.hdl import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ndpmoe.model.contract import COUNTERS

from .shapes import CountersLayout, ErrorShape, StateShape, StatusLayout


class RegisterBlock(wiring.Component):
    """Ports in: `state`, `error` (from the controller), one event strobe per counter
    (`ev_<counter>`). Out: `status`, `counters` (registered)."""

    def __init__(self):
        super().__init__({
            "state": In(StateShape),
            "error": In(ErrorShape),
            **{f"ev_{name}": In(1) for name in COUNTERS},
            "status": Out(StatusLayout),
            "counters": Out(CountersLayout),
        })

    def elaborate(self, platform):
        m = Module()
        m.d.comb += [self.status.state.eq(self.state), self.status.error.eq(self.error)]
        for name in COUNTERS:
            split_counter(m, getattr(self.counters, name), getattr(self, f"ev_{name}"), name)
        return m


def split_counter(m: Module, counter, event, name: str) -> None:
    """counter += event as two half-width incrementers: the high half steps when the low half is
    all ones, a flag kept a cycle ahead, so both halves step at the same edge (the count is exact
    in every cycle) and no carry chain is longer than half the counter."""
    half = len(counter) // 2
    lo, hi = counter[:half], counter[half:]
    lo_full = Signal(name=f"{name}_lo_full")        # lo == all ones
    with m.If(event):
        m.d.sync += [lo.eq(lo + 1), lo_full.eq(lo == (1 << half) - 2)]
        with m.If(lo_full):
            m.d.sync += hi.eq(hi + 1)
