"""ResponseFifo: words in order, never more than its depth, ready and valid from registers."""
import random

import pytest

from ndpmoe.rtl.response_fifo import ResponseFifo

from rtl_sim import run

WORDS = 600


@pytest.mark.parametrize("push_rate, pop_rate", [(0.9, 0.3), (0.5, 0.95), (0.7, 0.7)])
def test_order_capacity_and_empty(push_rate, pop_rate):
    depth = 8
    dut = ResponseFifo(word_bits=32, depth=depth)
    rng = random.Random(int(push_rate * 100) + int(pop_rate * 10))
    sent, received, levels = [], [], []

    async def producer(ctx):
        n = 0
        while n < WORDS:
            valid = rng.random() < push_rate
            ctx.set(dut.i.valid, valid)
            ctx.set(dut.i.payload, 0x1000 + n)
            _, _, ready = await ctx.tick().sample(dut.i.ready)
            if valid and ready:
                sent.append(0x1000 + n)
                n += 1
        ctx.set(dut.i.valid, 0)

    async def tb(ctx):
        while len(received) < WORDS:
            ready = rng.random() < pop_rate
            ctx.set(dut.o.ready, ready)
            _, _, valid, payload = await ctx.tick().sample(dut.o.valid, dut.o.payload)
            if valid and ready:
                received.append(payload)
            levels.append(len(sent) - len(received))
        for _ in range(3):
            await ctx.tick()
        assert ctx.get(dut.empty) and not ctx.get(dut.o.valid)
        assert received == sent == [0x1000 + n for n in range(WORDS)]
        assert max(levels) <= depth
        if push_rate > pop_rate:
            assert max(levels) >= depth - 1       # it did fill up: the ready logic was exercised

    run(dut, tb, processes=[producer])


def test_rejects_bad_depth():
    for depth in (3, 6, 0):
        with pytest.raises(ValueError, match=f"not {depth}"):
            ResponseFifo(word_bits=8, depth=depth)
