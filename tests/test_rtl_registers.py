"""RegisterBlock: status mirrors the controller, counters count their events."""
from model.contract import COUNTERS, ErrorCode, State
from rtl.registers import RegisterBlock

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
