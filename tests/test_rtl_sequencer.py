"""MatmulSequencer: labels every word of a packed matrix (metadata, hi plane, code word), gives
code words one beat per pass, and holds back on missing words and missing output credits."""
import random

import pytest

from ndpmoe.model.contract import get_config
from ndpmoe.rtl.geometry import Geometry
from ndpmoe.rtl.sequencer import BeatKind, MatmulSequencer

from rtl_sim import run


def expected_beats(g: Geometry, fmt, n_in: int, rows: int, passes: int):
    """(kind, pass, lo_half, i0, row_end, row, word index) in order, from the contract's layout."""
    beats, word = [], 0
    n_c = g.codes_per_beat(fmt.bits)
    padded = fmt.padded_in(n_in)
    for row in range(rows):
        i0 = 0
        for n_groups in fmt.superblock_groups(n_in):
            beats.append((BeatKind.META, 0, 0, i0, int(i0 + n_c == padded), row, word))
            word += 1
            end = i0 + n_groups * fmt.group_size
            while i0 < end:
                halves = [0, 1] if fmt.bits == 3 else [0]
                if fmt.bits == 3:
                    beats.append((BeatKind.HI, 0, 0, i0, int(i0 + n_c == padded), row, word))
                    word += 1
                for half in halves:
                    for p in range(passes):
                        beats.append((BeatKind.CODE, p, half, i0, int(i0 + n_c == padded), row, word))
                    word += 1
                    i0 += n_c
    return beats, word


@pytest.mark.parametrize("name,bits,group,n_in,tokens", [
    ("default", 2, 32, 256, 1), ("default", 3, 64, 384, 3), ("default", 4, 128, 128, 8),
    ("default", 8, 32, 96, 2), ("small", 2, 128, 128, 2), ("small", 8, 64, 192, 1),
])
def test_beats_follow_the_memory_image(name, bits, group, n_in, tokens):
    cfg = get_config(name)
    g = Geometry(cfg)
    dut = MatmulSequencer(g)
    fmt = cfg.fmt(bits, group)
    rows, passes = 3, cfg.passes(tokens)
    beats, n_words = expected_beats(g, fmt, n_in, rows, passes)
    assert n_words == rows * fmt.row_words(n_in)
    rng = random.Random(bits * 100 + group)
    got, taken = [], []

    async def memory(ctx):
        sent = 0
        while True:
            valid = sent < n_words and rng.random() < 0.7
            ctx.set(dut.words.valid, valid)
            ctx.set(dut.words.payload, sent)
            ctx.set(dut.credit_ok, rng.random() < 0.5)
            _, _, ready, beat_valid, beat, take = await ctx.tick().sample(
                dut.words.ready, dut.beat.valid, dut.beat.payload, dut.credit_take)
            if valid and ready:
                sent += 1
            if beat_valid:
                # Meta beats carry no meaningful pass, lo_half or row_end.
                meta_like = beat.kind != BeatKind.CODE
                got.append((beat.kind, 0 if meta_like else beat.pass_, 0 if meta_like else beat.lo_half,
                            beat.i0, beat.row_end, beat.row, beat.word))
            taken.append(take)

    async def tb(ctx):
        ctx.set(dut.mode, {"bits": bits, "group": group.bit_length() - 6, "padded_in": fmt.padded_in(n_in),
                           "passes": passes, "rows": rows, "tokens": tokens})
        ctx.set(dut.start, 1)
        await ctx.tick()
        ctx.set(dut.start, 0)
        while ctx.get(dut.active):
            await ctx.tick()
        await ctx.tick()
        want = [b if b[0] == BeatKind.CODE else (b[0], 0, 0, b[3], b[4], b[5], b[6]) for b in beats]
        assert got == want
        assert sum(taken) == rows * passes            # one credit per row and pass

    run(dut, tb, processes=[memory])
