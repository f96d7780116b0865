"""Unpacker: codes of every bit width, 3-bit from a latched hi plane and two lo words,
matching model.packing's layout."""
import random

import pytest
import torch

from ndpmoe.model.contract import get_config
from ndpmoe.model.packing import pack_codes
from ndpmoe.rtl.geometry import Geometry
from ndpmoe.rtl.sequencer import BeatKind
from ndpmoe.rtl.unpacker import LATENCY, Unpacker

from rtl_sim import run


@pytest.mark.parametrize("name", ["small", "default"])
def test_codes_match_packing(name):
    cfg = get_config(name)
    g = Geometry(cfg)
    dut = Unpacker(g, 8)
    rng = random.Random(2)

    async def tb(ctx):
        for bits in cfg.bits:
            fmt = cfg.fmt(bits, 32)
            codes = torch.tensor([[rng.randint(0, fmt.qmax) for _ in range(fmt.codes_per_block)]], dtype=torch.uint8)
            raw = pack_codes(codes, fmt)[0].numpy().tobytes()
            words = [int.from_bytes(raw[i:i + g.word_bytes], "little") for i in range(0, len(raw), g.word_bytes)]
            ctx.set(dut.bits, bits)
            await ctx.tick()                        # bits leads the first beat by a cycle
            beats = []
            if bits == 3:
                beats = [(BeatKind.HI, 0, words[0]), (BeatKind.CODE, 0, words[1]), (BeatKind.CODE, 1, words[2])]
            else:
                beats = [(BeatKind.CODE, 0, words[0])]
            n_c = g.codes_per_beat(bits)
            for i, (kind, lo_half, word) in enumerate(beats):
                ctx.set(dut.valid, 1)
                ctx.set(dut.kind, kind)
                ctx.set(dut.lo_half, lo_half)
                ctx.set(dut.word, word)
                ctx.set(dut.tag_in, i)
                await ctx.tick().repeat(LATENCY)
                assert ctx.get(dut.valid_out) and ctx.get(dut.tag_out) == i
                if kind == BeatKind.CODE:
                    got = [ctx.get(dut.codes[j]) for j in range(g.lanes)]
                    start = lo_half * n_c
                    assert got[:n_c] == codes[0, start:start + n_c].tolist()
                    assert not any(got[n_c:])               # lanes past the format's codes are zero
            ctx.set(dut.valid, 0)

    run(dut, tb)
