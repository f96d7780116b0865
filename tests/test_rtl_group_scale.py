"""GroupCombiner + ScaleAccumulator: block sums of q x and x -> group sums (whole groups in a
beat, or a running partial across beats and passes) -> zero correction, scale, row accumulation.
Reference: acc = sum over groups of scale * (16 * sum(q x) - zero * sum(x))."""
import random

import pytest
from amaranth.hdl import Module
from amaranth.lib import wiring

from ndpmoe.model.contract import ACC_BITS, ZERO_FRAC_BITS, get_config
from ndpmoe.rtl.geometry import Geometry
from ndpmoe.rtl.group_combiner import GroupCombiner
from ndpmoe.rtl.scale_accumulator import ScaleAccumulator
from ndpmoe.rtl.sequencer import BeatKind

from rtl_sim import run, to_signed


class GroupScale(wiring.Component):
    def __init__(self, g):
        self.groups, self.scale = GroupCombiner(g), ScaleAccumulator(g)
        super().__init__({})

    def elaborate(self, platform):
        m = Module()
        m.submodules.groups, m.submodules.scale = gc, sa = self.groups, self.scale
        m.d.comb += [sa.valid.eq(gc.code_valid), sa.pass_.eq(gc.pass_out), sa.row_end.eq(gc.row_end_out),
                     sa.row.eq(gc.row_out), sa.groups.eq(gc.groups), sa.passes.eq(gc.passes)]
        return m


@pytest.mark.parametrize("name,bits,group", [("default", 2, 32), ("default", 4, 64), ("default", 8, 128),
                                             ("default", 3, 32), ("small", 8, 32), ("wide", 2, 32)])
def test_rows_of_group_sums(name, bits, group):
    cfg = get_config(name)
    g = Geometry(cfg)
    dut = GroupScale(g)
    gc, sa = dut.groups, dut.scale
    rng = random.Random(bits * 7 + group)
    fmt = cfg.fmt(bits, group)
    n_in, rows, tokens = 4 * max(group, g.lanes), 3, 2 * g.tokens_parallel
    passes = cfg.passes(tokens)
    n_c, E = g.codes_per_beat(bits), g.meta_entries
    used_blocks = max(1, n_c // g.block)
    beats, expect = [], {}
    for row in range(rows):
        acc = {(p, j): 0 for p in range(passes) for j in range(g.tokens_parallel)}
        for sb in range(0, n_in // group, E):
            meta = [(rng.randint(1, 65535), rng.randint(-32768, 32767)) for _ in range(E)]
            word = sum((s | (z & 0xFFFF) << 16) << (32 * e) for e, (s, z) in enumerate(meta))
            beats.append(dict(kind=BeatKind.META, word=word, row=row))
            for i0 in range(sb * group, min(n_in, (sb + E) * group), n_c):
                sums = {}
                for p in range(passes):
                    qx = [[rng.randint(-(1 << 20), 1 << 20) if k < used_blocks else 0 for k in range(g.blocks)]
                          for _ in range(g.tokens_parallel)]
                    xs = [[rng.randint(-(1 << 12), 1 << 12) if k < used_blocks else 0 for k in range(g.blocks)]
                          for _ in range(g.tokens_parallel)]
                    # When N_c < block, only the first beat of a block carries its x sum.
                    if n_c < g.block and i0 % g.block:
                        xs = [[0] * g.blocks for _ in xs]
                    beats.append(dict(kind=BeatKind.CODE, pass_=p, i0=i0, row=row, qx=qx, xs=xs,
                                      row_end=int(i0 + n_c == n_in)))
                    for j in range(g.tokens_parallel):
                        for k in range(used_blocks):
                            grp = (i0 + k * g.block) // group
                            s, z = meta[grp % E]
                            acc[p, j] += s * ((qx[j][k] << ZERO_FRAC_BITS) - z * xs[j][k])
        for (p, j), v in acc.items():
            expect[row, p, j] = v

    got = {}

    async def driver(ctx):
        ctx.set(gc.bits, bits)
        ctx.set(gc.group, group.bit_length() - 6)
        ctx.set(gc.passes, passes)
        await ctx.tick().repeat(3)          # per-descriptor settings lead the first beat (as in the unit)
        for b in beats:
            ctx.set(gc.valid, 1)
            ctx.set(gc.kind, b["kind"])
            ctx.set(gc.row, b["row"])
            ctx.set(gc.word, b.get("word", 0))
            ctx.set(gc.pass_, b.get("pass_", 0))
            ctx.set(gc.i0, b.get("i0", 0))
            ctx.set(gc.row_end, b.get("row_end", 0))
            for j in range(g.tokens_parallel):
                for k in range(g.blocks):
                    ctx.set(gc.qx[j][k], b["qx"][j][k] if "qx" in b else 0)
                    ctx.set(gc.xs[j][k], b["xs"][j][k] if "xs" in b else 0)
            await ctx.tick()
        ctx.set(gc.valid, 0)

    async def monitor(ctx):
        while len(got) < len(expect):
            _, _, valid, entry = await ctx.tick().sample(sa.entry.valid, sa.entry.payload)
            if valid:
                for j in range(g.tokens_parallel):
                    got[entry.row, entry.pass_, j] = to_signed(entry.values[j], ACC_BITS)
        assert got == expect

    run(dut, driver, monitor)
