"""RegisterBlock: status mirrors the controller, counters count their events."""
from ndpmoe.model.contract import COUNTERS, ErrorCode, State
from ndpmoe.rtl.registers import RegisterBlock

from rtl_sim import run


def test_counters_and_status():
    dut = RegisterBlock()

    async def tb(ctx):
        ctx.set(dut.state, State.ERROR)
        ctx.set(dut.error, ErrorCode.ADDR_RANGE)
        for i, name in enumerate(COUNTERS):
            ctx.set(getattr(dut, f"ev_{name}"), 1)
            await ctx.tick().repeat(i + 1)
            ctx.set(getattr(dut, f"ev_{name}"), 0)
        await ctx.tick()
        assert [getattr(ctx.get(dut.counters), n) for n in COUNTERS] == list(range(1, len(COUNTERS) + 1))
        status = ctx.get(dut.status)
        assert (status.state.value, status.error.value) == (State.ERROR, ErrorCode.ADDR_RANGE)

    run(dut, tb)


def test_split_counter_is_exact_in_every_cycle_across_the_halves():
    """An 8-bit split counter (two 4-bit halves) under random events, wrapping twice: its value
    equals the number of events so far (mod 256) after every edge, including the edges where
    the low half wraps into the high one."""
    import random

    from amaranth.hdl import Module, Signal

    from ndpmoe.rtl.registers import split_counter

    m = Module()
    counter, event = Signal(8), Signal()
    split_counter(m, counter, event, "c")
    rng = random.Random(7)

    async def tb(ctx):
        count = 0
        for _ in range(700):
            ev = rng.random() < 0.8
            ctx.set(event, ev)
            await ctx.tick()
            count += ev
            assert ctx.get(counter) == count % 256, (count, ctx.get(counter))
        assert count > 512

    run(m, tb)
