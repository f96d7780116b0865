"""Register block: the STATUS register, the performance counters the host reads, and `done`.

STATUS (model.contract.STATUS)::

     5      2 1     0
    +--------+-------+
    | error  | state |     state: IDLE, BUSY, DONE, ERROR; error: ErrorCode of the last refusal
    +--------+-------+

In the cycle `done` pulses, STATUS holds the outcome of the descriptor that has just ended (DONE,
or ERROR with its code); otherwise it shows BUSY (error NONE) while any descriptor is in the unit,
and keeps the last outcome when none is. IDLE / NONE after reset.

COUNTERS (model.contract.COUNTERS), COUNTER_BITS each, counted since reset, never cleared
otherwise (the host takes differences):

    busy_cycles       cycles with a descriptor in the unit (from taking it to its last result sent)
    mem_stall_cycles  busy cycles the datapath wanted a requested word that had not arrived
    out_stall_cycles  busy cycles a result waited on the output stream (valid, not ready)
    words_read        memory words received
    results_written   results sent on the output stream

Descriptors overlap (the next one reads and starts while the one before drains), yet the counts
at each `done` are exact for everything up to and including that descriptor and hold nothing of
the ones after it: a busy cycle, and a stall within it, belongs to the oldest descriptor in the
unit, a result to its own descriptor (results leave in order, with a cycle between descriptors),
and a memory word to the descriptor that reads it. Words that arrive for the next descriptor
before the head ends are held back (`word_early`) and added in the cycle after it ends.

Every input describes one cycle of the unit, x, and is presented in cycle x + 1 (registered where
it comes from). The counters, `done` and the outcome in STATUS show cycle x's events in cycle
x + LATENCY + 1, all at once.
"""
from __future__ import annotations

from amaranth.hdl import Cat, Module, Signal, Value
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ndpmoe.model.contract import COUNTER_BITS, COUNTERS

from .shapes import CountersLayout, ErrorShape, StateShape, StatusLayout

LATENCY = 3         # inputs -> counters, `done` and STATUS
COUNTER_LATENCY = 2 # increment -> visible count (pipelined_counter)

_FLAGS = ("busy_cycles", "mem_stall_cycles", "out_stall_cycles", "results_written")


class RegisterBlock(wiring.Component):
    """Ports in (cycle x's, in cycle x + 1): one flag per counter but words (`busy_cycles`,
    `mem_stall_cycles`, `out_stall_cycles`, `results_written`); `word` (a memory word arrived)
    and `word_early` (it is for a later descriptor than the oldest); `complete` (the oldest
    descriptor ended in cycle x) with `outcome_state` / `outcome_error`; `active` (now: a
    descriptor is in the unit). Out: `status`, `counters`, `done`."""

    def __init__(self, word_count_bits: int):
        if not isinstance(word_count_bits, int) or not 0 < word_count_bits < COUNTER_BITS:
            raise ValueError(f"word_count_bits must be an integer in 1..{COUNTER_BITS - 1}, "
                             f"not {word_count_bits!r}")
        self._word_count_bits = word_count_bits
        super().__init__({
            **{name: In(1) for name in _FLAGS},
            "word": In(1),
            "word_early": In(1),
            "complete": In(1),
            "outcome_state": In(StateShape),
            "outcome_error": In(ErrorShape),
            "active": In(1),
            "status": Out(StatusLayout),
            "counters": Out(CountersLayout),
            "done": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        # Words for the next descriptor, held until the cycle after the oldest ends; then added.
        held = Signal(self._word_count_bits)
        release = Signal()
        m.d.sync += release.eq(self.complete)
        own_word = self.word & ~self.word_early
        increments = {name: Signal(name=f"{name}_inc") for name in _FLAGS}
        words_inc = Signal(self._word_count_bits + 1)
        increments["words_read"] = words_inc
        m.d.sync += [increments[name].eq(getattr(self, name)) for name in _FLAGS]
        with m.If(release):
            m.d.sync += [words_inc.eq(held + own_word), held.eq(self.word & self.word_early)]
        with m.Else():
            m.d.sync += [words_inc.eq(own_word), held.eq(held + (self.word & self.word_early))]
        for name in COUNTERS:
            pipelined_counter(m, getattr(self.counters, name), increments[name], name)

        # `done` and the outcome, as late as the counts they go with.
        done_pipe = [self.complete]
        outcome = [(self.outcome_state, self.outcome_error)]
        for i in range(LATENCY - 1):
            d = Signal(name=f"done_d{i}")
            s, e = Signal(StateShape, name=f"outcome_state_d{i}"), Signal(ErrorShape, name=f"outcome_error_d{i}")
            m.d.sync += [d.eq(done_pipe[-1]), s.eq(outcome[-1][0]), e.eq(outcome[-1][1])]
            done_pipe.append(d)
            outcome.append((s, e))
        m.d.sync += self.done.eq(done_pipe[-1])
        with m.If(done_pipe[-1]):
            m.d.sync += [self.status.state.eq(outcome[-1][0]), self.status.error.eq(outcome[-1][1])]
        with m.Elif(self.active):
            m.d.sync += [self.status.state.eq(StateShape.BUSY), self.status.error.eq(ErrorShape.NONE)]
        return m


def pipelined_counter(m: Module, counter: Value, increment: Value, name: str) -> None:
    """counter += increment, COUNTER_LATENCY cycles later. The low part adds the increment and
    registers its carry out; the high part adds that carry a cycle later while the low part's
    sum waits a cycle in a register of its own, so the two parts always show the same moment and
    no carry chain is longer than the wider of the low part and the increment."""
    increment = Value.cast(increment)
    lo_bits = max(len(counter) // 2, len(increment))
    if lo_bits >= len(counter):
        raise ValueError(f"a {len(increment)}-bit increment leaves no high part in {len(counter)} bits")
    lo = Signal(lo_bits, name=f"{name}_lo")
    lo_seen = Signal(lo_bits, name=f"{name}_lo_seen")
    carry = Signal(name=f"{name}_carry")
    hi = Signal(len(counter) - lo_bits, name=f"{name}_hi")
    total = lo + increment
    m.d.sync += [lo.eq(total[:lo_bits]), carry.eq(total[lo_bits]), hi.eq(hi + carry), lo_seen.eq(lo)]
    m.d.comb += counter.eq(Cat(lo_seen, hi))
