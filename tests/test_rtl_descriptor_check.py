"""DescriptorCheck against model.ndp_golden.check_descriptor: same error, same order, and the
derived read length, padded inputs and passes."""
import random
from dataclasses import replace

import pytest

from ndpmoe.model.contract import Descriptor, ErrorCode, Opcode, get_config
from ndpmoe.model.ndp_golden import check_descriptor
from ndpmoe.rtl.descriptor_check import LATENCY, DescriptorCheck
from ndpmoe.rtl.geometry import Geometry

from rtl_sim import run


def random_descriptor(cfg, rng: random.Random) -> Descriptor:
    """Mostly near-valid fields, so every check gets hit, often two at once."""
    group = rng.choice([0, 1, 2, 2, 3])
    g = 32 << min(group, 2)
    return Descriptor(
        opcode=rng.choice([0, 1, 2, 2, 2, 3]),
        bits=rng.choice(list(cfg.bits) * 3 + [0, 3, 5, 15]),
        group=group,
        tokens=rng.choice([0, 1, cfg.t_max, cfg.t_max + 1, rng.randint(1, cfg.t_max), 255]),
        rows=rng.choice([0, 1, rng.randint(1, 4000), 65535]),
        in_features=rng.choice([0, g, rng.randint(1, 8) * g, rng.randint(1, 8) * cfg.word_bits,
                                cfg.max_in_features, cfg.max_in_features + g, rng.randint(0, 65535)]),
        addr=rng.choice([0, rng.randint(0, 1 << 20) * cfg.word_bytes, rng.randint(0, (1 << 32) - 1),
                         (cfg.mem_bytes - rng.randint(1, 1 << 12) * cfg.word_bytes) % (1 << 32)]),
    )


@pytest.mark.parametrize("name", ["small", "default"])
def test_errors_and_sizes_match_golden(name):
    cfg = get_config(name)
    g = Geometry(cfg)
    dut = DescriptorCheck(g)
    rng = random.Random(3)
    seen = set()

    async def tb(ctx):
        for _ in range(400):
            d = random_descriptor(cfg, rng)
            loaded = (rng.randint(0, cfg.t_max), rng.choice([0, cfg.word_bits, cfg.max_in_features]))
            if rng.random() < 0.2:                 # valid but for the address: the range checks
                loaded = (cfg.t_max, cfg.max_in_features)
                d = replace(d, opcode=rng.choice([1, 2]), bits=cfg.bits[0], group=0, tokens=1,
                            rows=rng.randint(1, 300), in_features=cfg.word_bits)
            ctx.set(dut.desc.as_value(), d.encode())
            ctx.set(dut.loaded_tokens, loaded[0])
            ctx.set(dut.loaded_in, loaded[1])
            ctx.set(dut.start, 1)
            await ctx.tick()
            ctx.set(dut.start, 0)
            await ctx.tick().repeat(LATENCY - 1)
            assert ctx.get(dut.done)
            expect = check_descriptor(cfg, d, loaded)
            got = ErrorCode(ctx.get(dut.error).value)
            assert got == expect, (d, loaded)
            seen.add(expect)
            if expect == ErrorCode.NONE and d.opcode == Opcode.MATMUL:
                assert ctx.get(dut.words) == d.words(cfg)
                assert ctx.get(dut.padded_in) == d.fmt(cfg.word_bits).padded_in(d.in_features)
                assert ctx.get(dut.passes) == d.passes(cfg)
            elif expect == ErrorCode.NONE and d.opcode == Opcode.LOAD_ACT:
                assert ctx.get(dut.words) == d.words(cfg)
            await ctx.tick()
        assert seen == set(ErrorCode), set(ErrorCode) - seen

    run(dut, tb)
