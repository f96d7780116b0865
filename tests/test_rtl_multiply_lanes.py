"""MultiplyLanes: per token lane and block, the sum of code x activation, pipelined."""
import random

from ndpmoe.model.contract import get_config
from ndpmoe.rtl.geometry import Geometry
from ndpmoe.rtl.multiply_lanes import MultiplyLanes

from rtl_sim import run


def test_block_sums_every_cycle():
    cfg = get_config("default")
    g = Geometry(cfg)
    dut = MultiplyLanes(g, 16)
    rng = random.Random(4)
    stimuli = []
    for n in range(12):
        codes = [rng.randint(0, (1 << g.lane_code_bits(j)) - 1) for j in range(g.lanes)]
        acts = [[rng.randint(-128, 127) for _ in range(g.lanes)] for _ in range(g.tokens_parallel)]
        stimuli.append((codes, acts))

    async def driver(ctx):
        for n, (codes, acts) in enumerate(stimuli):        # a new beat every cycle
            ctx.set(dut.valid, 1)
            ctx.set(dut.tag_in, n)
            for j, c in enumerate(codes):
                ctx.set(dut.codes[j], c)
            for t, row in enumerate(acts):
                for j, a in enumerate(row):
                    ctx.set(dut.acts[t][j], a)
            await ctx.tick()
        ctx.set(dut.valid, 0)

    async def checker(ctx):
        seen = 0
        while seen < len(stimuli):
            await ctx.tick()
            if not ctx.get(dut.valid_out):
                continue
            n = ctx.get(dut.tag_out)
            assert n == seen
            codes, acts = stimuli[n]
            for t in range(g.tokens_parallel):
                for k in range(g.blocks):
                    lanes = range(k * g.block, (k + 1) * g.block)
                    assert ctx.get(dut.sums[t][k]) == sum(codes[j] * acts[t][j] for j in lanes)
            seen += 1

    run(dut, driver, checker)
