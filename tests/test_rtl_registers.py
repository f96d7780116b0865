"""RegisterBlock: counters count their events, `done` and STATUS come with the counts of the
descriptor that ended, and words that arrive for the next descriptor wait until it is the oldest."""
import random

from amaranth.hdl import Module, Signal

from ndpmoe.model.contract import COUNTERS, ErrorCode, State
from ndpmoe.rtl.registers import COUNTER_LATENCY, LATENCY, RegisterBlock, pipelined_counter

from rtl_sim import run

FLAGS = ("busy_cycles", "mem_stall_cycles", "out_stall_cycles", "results_written")


def test_counts_done_and_status_arrive_together():
    """Random events, cycle by cycle, and a descriptor ending now and then: at every `done` the
    counters hold exactly the events up to the cycle it ended in, STATUS its outcome; BUSY while
    active otherwise."""
    dut = RegisterBlock(word_count_bits=12)
    rng = random.Random(3)

    async def tb(ctx):
        expect = dict.fromkeys(COUNTERS, 0)
        history = []                      # counts after each presented cycle
        outcomes = []
        checked = 0
        for cycle in range(400):
            events = {name: rng.random() < 0.5 for name in FLAGS}
            word = rng.random() < 0.5
            complete = cycle % 7 == 3
            outcome = (rng.choice((State.DONE, State.ERROR)), rng.choice(list(ErrorCode)))
            for name, v in events.items():
                ctx.set(getattr(dut, name), v)
                expect[name] += v
            ctx.set(dut.word, word)
            ctx.set(dut.word_early, 0)
            expect["words_read"] += word
            ctx.set(dut.complete, complete)
            ctx.set(dut.outcome_state, outcome[0])
            ctx.set(dut.outcome_error, outcome[1])
            ctx.set(dut.active, 1)
            history.append(dict(expect))
            outcomes.append(outcome if complete else None)
            await ctx.tick()
            # the inputs of cycle k show LATENCY cycles after they were presented
            k = len(history) - LATENCY
            if k < 0:
                continue
            counters = ctx.get(dut.counters)
            assert {n: getattr(counters, n) for n in COUNTERS} == history[k]
            status = ctx.get(dut.status)
            if outcomes[k] is not None:
                assert ctx.get(dut.done)
                assert (status.state.value, status.error.value) == outcomes[k]
                checked += 1
            else:
                assert not ctx.get(dut.done)
                if k >= 1:
                    assert (status.state.value, status.error.value) == (State.BUSY, ErrorCode.NONE)
        assert checked > 40

    run(dut, tb)


def test_early_words_are_held_until_the_oldest_ends():
    dut = RegisterBlock(word_count_bits=8)

    async def tb(ctx):
        ctx.set(dut.active, 1)
        # 5 words of the oldest, 3 early ones (for the next descriptor) among them
        for early in (0, 1, 0, 1, 0, 0, 1, 0):
            ctx.set(dut.word, 1)
            ctx.set(dut.word_early, early)
            await ctx.tick()
        ctx.set(dut.word, 0)
        ctx.set(dut.complete, 1)
        ctx.set(dut.outcome_state, State.DONE)
        await ctx.tick()
        ctx.set(dut.complete, 0)
        ctx.set(dut.word, 1)              # the next descriptor's word, in the cycle after the end:
        ctx.set(dut.word_early, 0)        # it is the oldest now
        await ctx.tick()
        ctx.set(dut.word, 0)
        await ctx.tick().repeat(LATENCY - 2)
        assert ctx.get(dut.done)
        assert ctx.get(dut.counters).words_read == 5
        await ctx.tick().repeat(2)
        assert ctx.get(dut.counters).words_read == 9      # the held 3 and the one after the end

    run(dut, tb)


def test_pipelined_counter_is_exact_across_wraps():
    """A 10-bit counter (5-bit parts) under random increments up to 31: after every edge it
    equals the sum of the increments given COUNTER_LATENCY cycles earlier and before (mod 1024),
    including the edges where the low part carries into the high one."""
    m = Module()
    counter, inc = Signal(10), Signal(5)
    pipelined_counter(m, counter, inc, "c")
    rng = random.Random(7)

    async def tb(ctx):
        sums = [0]
        for _ in range(600):
            v = rng.choice((0, 1, 1, rng.randrange(32)))
            ctx.set(inc, v)
            await ctx.tick()
            sums.append(sums[-1] + v)
            if len(sums) > COUNTER_LATENCY:
                assert ctx.get(counter) == sums[-COUNTER_LATENCY] % 1024, (sums[-COUNTER_LATENCY], ctx.get(counter))
        assert sums[-1] > 2 * 1024                # wrapped twice

    run(m, tb)
