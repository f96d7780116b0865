"""ResultOutput: row entries -> results in token order, under back-pressure, with credits that
bound the FIFO; the last entry's last result carries `last`."""
import random

from ndpmoe.model.contract import ACC_BITS, get_config
from ndpmoe.rtl.geometry import Geometry
from ndpmoe.rtl.result_output import ResultOutput

from rtl_sim import run, to_signed


def test_entries_serialize_in_order_with_credits():
    cfg = get_config("default")                 # 2 tokens per pass
    g = Geometry(cfg)
    depth = 4
    dut = ResultOutput(g, depth=depth)
    rng = random.Random(9)
    tokens = 5                                  # 3 passes: 2 + 2 + 1 results per row
    entries = [(row, p, [rng.randint(-(1 << 50), 1 << 50) for _ in range(g.tokens_parallel)])
               for row in range(6) for p in range(cfg.passes(tokens))]
    expect = [(p * 2 + j, row, vals[j]) for row, p, vals in entries for j in range(2) if p * 2 + j < tokens]
    got, lasts = [], []

    async def producer(ctx):
        ctx.set(dut.tokens, tokens)
        for row, p, vals in entries:
            while not ctx.get(dut.credit_ok):        # the sequencer's rule: a credit first
                await ctx.tick()
            ctx.set(dut.credit_take, 1)
            await ctx.tick()
            ctx.set(dut.credit_take, 0)
            await ctx.tick().repeat(rng.randint(1, 4))   # the pipeline's latency
            ctx.set(dut.entry.payload, {"values": vals, "row": row, "pass_": p,
                                        "last": (row, p) == entries[-1][:2]})
            ctx.set(dut.entry.valid, 1)
            await ctx.tick()
            ctx.set(dut.entry.valid, 0)

    async def consumer(ctx):
        while len(got) < len(expect):
            ctx.set(dut.out.ready, rng.random() < 0.4)
            _, _, v, r, res = await ctx.tick().sample(dut.out.valid, dut.out.ready, dut.out.payload)
            if v and r:
                got.append((res.result.token, res.result.row, to_signed(res.result.value, ACC_BITS)))
                lasts.append(res.last)
        ctx.set(dut.out.ready, 0)
        await ctx.tick().repeat(2)
        assert ctx.get(dut.idle)
        assert got == expect
        assert lasts == [0] * (len(expect) - 1) + [1]

    run(dut, producer, consumer)
