"""ActivationBuffer: LOAD_ACT words land in the right RAM rows with the right block sums, the
loader takes no word beyond its load (the next descriptor's words follow right behind), and
reads align activations and block sums to the beat's codes."""
import dataclasses
import random

import pytest

from ndpmoe.model.contract import get_config
from ndpmoe.rtl.act_buffer import READ_LATENCY, ActivationBuffer
from ndpmoe.rtl.geometry import Geometry

from rtl_sim import run


@pytest.mark.parametrize("name,tp,xs_delay", [("small", 1, 9), ("default", 2, 9), ("default", 2, 13)])
def test_load_then_read_every_alignment(name, tp, xs_delay):
    """xs_delay 9: the default unit's lanes; 13: deeper lanes, whose block sums wait before their
    write (so that a load never overwrites sums still to be read)."""
    cfg = dataclasses.replace(get_config(name), tokens_parallel=tp, max_in_features=4 * get_config(name).word_bits)
    g = Geometry(cfg)
    dut = ActivationBuffer(g, xs_delay=xs_delay)
    rng = random.Random(7)
    tokens, n_in = cfg.t_max, 2 * cfg.word_bits          # bytes per token row, a multiple of P
    acts = [[rng.randint(-128, 127) for _ in range(n_in)] for _ in range(tokens)]
    flat = bytes(a & 0xFF for row in acts for a in row)
    words = [int.from_bytes(flat[i:i + g.word_bytes], "little") for i in range(0, len(flat), g.word_bytes)]

    async def tb(ctx):
        ctx.set(dut.load_words, len(words))
        ctx.set(dut.load_in, n_in)
        ctx.set(dut.load_start, 1)
        await ctx.tick()
        ctx.set(dut.load_start, 0)
        for w in words:
            ctx.set(dut.words.valid, 1)
            ctx.set(dut.words.payload, w)
            assert ctx.get(dut.words.ready)
            await ctx.tick()
        ctx.set(dut.words.payload, (1 << g.word_bits) - 1)     # a word of whatever comes next
        assert not ctx.get(dut.words.ready)
        ctx.set(dut.words.valid, 0)
        while ctx.get(dut.load_busy):
            await ctx.tick()
        for bits in cfg.bits:
            n_c = g.codes_per_beat(bits)
            ctx.set(dut.bits, bits)
            for p in range(g.max_passes):
                for i0 in range(0, n_in, n_c):
                    row, off = i0 // g.lanes, i0 % g.lanes
                    ctx.set(dut.rd_addr, row | p << g.act_row_addr_bits)
                    ctx.set(dut.rd_offset, off)
                    await ctx.tick().repeat(READ_LATENCY)
                    for lane in range(tp):
                        t = p * tp + lane
                        if t >= tokens:
                            continue
                        got = [ctx.get(dut.acts[lane][j]) for j in range(n_c)]
                        assert got == acts[t][i0:i0 + n_c], (bits, t, i0)
                    await ctx.tick().repeat(xs_delay)            # the block sums come later
                    for lane in range(tp):
                        t = p * tp + lane
                        if t >= tokens:
                            continue
                        for k in range(g.blocks):
                            start = i0 + k * g.block
                            expect = sum(acts[t][start:start + g.block]) if k * g.block < n_c else 0
                            if n_c < g.block:
                                expect = sum(acts[t][i0:i0 + g.block]) if (k == 0 and off % g.block == 0) else 0
                            assert ctx.get(dut.xslots[lane][k]) == expect, (bits, t, i0, k)

    run(dut, tb)
