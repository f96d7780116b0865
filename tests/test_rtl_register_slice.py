"""RegisterSlice: every word through once, in order, under random stalls on both sides; a word
per cycle when nothing stalls; `ready` inward depends only on registers; a free output cycle
after each word marked last, when asked."""
import random

import pytest

from amaranth.hdl import unsigned
from amaranth.lib import data

from ndpmoe.rtl.register_slice import RegisterSlice

from rtl_sim import run

LAST_LAYOUT = data.StructLayout({"value": 8, "last": 1})


def _transfer(in_rate: float, out_rate: float, count: int, seed: int) -> tuple[list[int], int, list[int]]:
    dut = RegisterSlice(unsigned(16))
    rng = random.Random(seed)
    words = [rng.randrange(1 << 16) for _ in range(count)]
    got = []
    cycles = [0]

    async def producer(ctx):
        for w in words:
            while rng.random() >= in_rate:
                ctx.set(dut.i.valid, 0)
                await ctx.tick()
            ctx.set(dut.i.payload, w)
            ctx.set(dut.i.valid, 1)
            await ctx.tick().until(dut.i.ready)
        ctx.set(dut.i.valid, 0)

    async def consumer(ctx):
        while len(got) < count:
            ctx.set(dut.o.ready, rng.random() < out_rate)
            _, _, v, r, p = await ctx.tick().sample(dut.o.valid, dut.o.ready, dut.o.payload)
            cycles[0] += 1
            if v and r:
                got.append(p)
        ctx.set(dut.o.ready, 0)
        await ctx.tick().repeat(3)
        assert ctx.get(dut.empty) and not ctx.get(dut.o.valid)

    run(dut, producer, consumer)
    return got, cycles[0], words


def test_every_word_once_in_order_under_random_stalls():
    for seed, (ir, orate) in enumerate([(0.5, 0.5), (1.0, 0.3), (0.3, 1.0), (0.9, 0.9)]):
        got, _, words = _transfer(ir, orate, 300, seed)
        assert got == words, seed


def test_a_word_per_cycle_without_stalls():
    got, cycles, words = _transfer(1.0, 1.0, 200, 5)
    assert got == words
    assert cycles <= 200 + 2, cycles        # one cycle of latency, then one word per cycle


def test_inward_ready_is_a_register():
    """`i.ready` does not change within a cycle when `o.ready` does."""
    dut = RegisterSlice(unsigned(8))

    async def tb(ctx):
        ctx.set(dut.i.valid, 1)
        ctx.set(dut.i.payload, 1)
        ctx.set(dut.o.ready, 0)
        await ctx.tick().repeat(2)          # one word in the output register, one in the skid
        assert ctx.get(dut.i.ready) == 0
        ctx.set(dut.o.ready, 1)
        assert ctx.get(dut.i.ready) == 0     # same cycle: still the registered value
        await ctx.tick()
        assert ctx.get(dut.i.ready) == 1

    run(dut, tb)


def test_a_free_cycle_after_each_last_word():
    """With gap_after, the output is empty for the cycle after a word marked last leaves (and
    for no other cycle when nothing stalls); every word still passes once, in order."""
    dut = RegisterSlice(LAST_LAYOUT, gap_after="last")
    rng = random.Random(11)
    words = [(i, int(rng.random() < 0.2)) for i in range(120)]
    trace = []

    async def producer(ctx):
        for value, last in words:
            ctx.set(dut.i.payload, {"value": value, "last": last})
            ctx.set(dut.i.valid, 1)
            await ctx.tick().until(dut.i.ready)
        ctx.set(dut.i.valid, 0)

    async def consumer(ctx):
        ctx.set(dut.o.ready, 1)
        while sum(t is not None for t in trace) < len(words):
            _, _, v, p = await ctx.tick().sample(dut.o.valid, dut.o.payload)
            trace.append((p.value, p.last) if v else None)

    run(dut, producer, consumer)
    got = [t for t in trace if t is not None]
    assert got == words
    first = trace.index(words[0])
    for k, t in enumerate(trace[first:-1], first):
        if t is not None and t[1]:
            assert trace[k + 1] is None, k          # the cycle after a last word is free
        elif t is not None:
            assert trace[k + 1] is not None, k      # and no other cycle is


def test_gap_after_must_name_a_field():
    with pytest.raises(ValueError, match="gap_after must name a field"):
        RegisterSlice(LAST_LAYOUT, gap_after="end")
