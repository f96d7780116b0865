"""CommandQueue: descriptors out in the order they came in, at most `depth` held, `i.ready` low
for the cycle after every transfer (a driver that waits for it to fall sees each transfer)."""
import random

from amaranth.hdl import unsigned

from ndpmoe.rtl.command_queue import CommandQueue

from rtl_sim import run


def test_order_depth_and_ready_after_each_transfer():
    dut = CommandQueue(unsigned(16), depth=2)
    rng = random.Random(4)
    sent = [rng.randrange(1 << 16) for _ in range(80)]
    got = []
    level = [0]

    async def producer(ctx):
        for w in sent:
            ctx.set(dut.i.payload, w)
            ctx.set(dut.i.valid, 1)
            await ctx.tick().until(dut.i.ready)
            assert not ctx.get(dut.i.ready)             # falls right after the transfer
            ctx.set(dut.i.valid, 0)
            if rng.random() < 0.5:
                await ctx.tick().repeat(rng.randint(1, 3))

    async def consumer(ctx):
        while len(got) < len(sent):
            ready = rng.random() < 0.3
            ctx.set(dut.o.ready, ready)
            _, _, v, p, taken = await ctx.tick().sample(dut.o.valid, dut.o.payload, dut.taken)
            level[0] += taken - (v and ready)
            assert 0 <= level[0] <= 2                   # never more than depth held
            if v and ready:
                got.append(p)

    run(dut, producer, consumer)
    assert got == sent
