"""contract.Descriptor: the packed word round trip, its documented layout, and the sizes it
derives against what the packing code and the golden unit actually do."""
import itertools
import random
import re
from dataclasses import replace

import pytest
import torch

from ndpmoe.model.contract import (DESCRIPTOR, GROUP_CODES, SCALE_MAX, SUPPORTED_BITS, SUPPORTED_GROUPS, ZERO_MAX,
                                   ZERO_MIN, Descriptor, ErrorCode, Opcode, QuantFormat, act_row_len, get_config)
from ndpmoe.model.ndp_golden import NdpGoldenUnit, act_image, ndp_matmul
from ndpmoe.model.packing import pack_matrix
from ndpmoe.model.qtensor import QuantizedMatrix


def test_encode_decode_round_trip_every_opcode_bits_and_group():
    rng = random.Random(5)
    for opcode, bits, group in itertools.product(range(4), range(16), range(4)):
        d = Descriptor(opcode, bits=bits, group=group, tokens=rng.randrange(256), rows=rng.randrange(1 << 16),
                       in_features=rng.randrange(1 << 16), addr=rng.randrange(1 << 32))
        raw = d.encode()
        assert raw == DESCRIPTOR.pack(opcode=opcode, bits=bits, group=group, tokens=d.tokens, rows=d.rows,
                                      in_features=d.in_features, addr=d.addr)
        assert Descriptor.decode(raw) == d and Descriptor.decode(raw).encode() == raw
    for _ in range(200):                                   # any word decodes and packs back to itself
        raw = rng.randrange(1 << DESCRIPTOR.width)
        assert Descriptor.decode(raw).encode() == raw


def test_constructors_name_format_and_group():
    for bits, group in itertools.product(SUPPORTED_BITS, SUPPORTED_GROUPS):
        d = Descriptor.matmul(QuantFormat(bits, group, 128), tokens=3, rows=7, in_features=group, addr=256)
        assert (d.opcode, d.bits, d.group, d.group_size) == (Opcode.MATMUL, bits, GROUP_CODES[group], group)
        assert d.fmt(128) == QuantFormat(bits, group, 128)
        assert Descriptor.decode(d.encode()).group_size == group
    load = Descriptor.load_act(tokens=2, in_features=256)
    assert (load.opcode, load.bits, load.group_size, load.rows) == (Opcode.LOAD_ACT, 8, 32, 0)
    with pytest.raises(ValueError, match="group code 3 names no group size"):
        Descriptor(Opcode.MATMUL, group=3).group_size


@pytest.mark.parametrize("name,value,error,expected", [
    ("tokens", 256, ValueError, r"in \[0, 2\^8\), not 256"), ("rows", 1 << 16, ValueError, r"in \[0, 2\^16\)"),
    ("addr", -1, ValueError, r"in \[0, 2\^32\), not -1"), ("opcode", 4, ValueError, r"in \[0, 2\^2\), not 4"),
    ("bits", 1.0, TypeError, "an integer, not 1.0"), ("group", True, TypeError, "an integer, not True")])
def test_fields_that_do_not_fit_are_refused(name, value, error, expected):
    with pytest.raises(error, match=f"descriptor field {name} must be {expected}"):
        Descriptor(**{"opcode": 1, name: value})
    with pytest.raises(ValueError, match="a packed descriptor is an integer"):
        Descriptor.decode(1 << DESCRIPTOR.width)


def test_documented_bit_ranges_are_the_bitstruct():
    rows = re.findall(r"^\s+(\w+)\s+\[(\d+), (\d+)\)", Descriptor.__doc__, re.M)
    assert [name for name, _, _ in rows] == [name for name, _ in DESCRIPTOR.fields]
    for name, lo, hi in rows:
        assert (int(lo), int(hi)) == (DESCRIPTOR.offset(name), DESCRIPTOR.offset(name) + dict(DESCRIPTOR.fields)[name])


def _random_matrix(fmt, rows, n_in, gen):
    codes = torch.randint(0, fmt.qmax + 1, (rows, n_in), generator=gen, dtype=torch.uint8)
    scale = torch.randint(0, SCALE_MAX + 1, (rows, n_in // fmt.group_size), generator=gen)
    zero = torch.randint(ZERO_MIN, ZERO_MAX + 1, (rows, n_in // fmt.group_size), generator=gen)
    return pack_matrix(codes, scale, zero, fmt)


@pytest.mark.parametrize("config", ["small", "default"])
def test_sizes_and_output_order_match_packing_and_golden(config):
    cfg = get_config(config)
    gen = torch.Generator().manual_seed(2)
    unit = NdpGoldenUnit(cfg, mem=bytearray(1 << 20))
    x_q = torch.randint(-128, 128, (cfg.t_max, 320), generator=gen, dtype=torch.int8)
    image = act_image(x_q, cfg.word_bits)
    load = Descriptor.load_act(tokens=cfg.t_max, in_features=act_row_len(320, cfg.word_bits))
    assert load.read_bytes(cfg) == image.numel() and load.words(cfg) == load.once_words(cfg) == load.beats(cfg)
    unit.write(0, image)
    assert unit.execute(load) == [] and unit.error == ErrorCode.NONE
    for bits, group in itertools.product(cfg.bits, SUPPORTED_GROUPS):
        fmt = QuantFormat(bits, group, cfg.word_bits)
        n_in = group * max(1, 192 // group)
        rows, tokens = 5, min(3, cfg.t_max)
        packed = _random_matrix(fmt, rows, n_in, gen)
        addr = 1 << 16
        unit.write(addr, packed)
        d = Descriptor.matmul(fmt, tokens=tokens, rows=rows, in_features=n_in, addr=addr)
        # Read range and words: exactly the packed image.
        assert d.read_bytes(cfg) == packed.numel() and d.words(cfg) * cfg.word_bytes == packed.numel()
        # Once words: every row's metadata words, and at 3 bits its hi-plane words (one in three).
        meta = rows * -(-fmt.padded_groups(n_in) // fmt.meta_per_word)
        hi = (d.words(cfg) - meta) // 3 if bits == 3 else 0
        assert d.once_words(cfg) == meta + hi
        assert d.passes(cfg) == -(-tokens // cfg.tokens_parallel)
        assert d.beats(cfg) == meta + hi + (d.words(cfg) - meta - hi) * d.passes(cfg)
        # Output stream: row by row, tokens 0..T-1 within a row, the golden's integers.
        acc = ndp_matmul(QuantizedMatrix.from_image(packed, fmt, rows, n_in, 0), x_q[:tokens, :n_in].contiguous())
        results = unit.execute(d)
        assert unit.error == ErrorCode.NONE and len(results) == d.results == rows * tokens
        assert results == [(t, r, int(acc[t, r])) for r in range(rows) for t in range(tokens)]
        assert [(t, r) for t, r, _ in results] == d.output_order()
        # The unit reads exactly read_bytes: the image ending at the last byte of memory is taken,
        # one word further is refused.
        end = len(unit.mem)
        small = replace(cfg, mem_bytes=end)
        top = NdpGoldenUnit(small, mem=bytearray(end))
        top.write(0, image)
        top.execute(load)
        top.write(end - packed.numel(), packed)
        assert top.execute(d.at(end - packed.numel())) == results and top.error == ErrorCode.NONE
        top.execute(d.at(end - packed.numel() + cfg.word_bytes))
        assert top.error == ErrorCode.ADDR_RANGE


def test_load_act_in_features_is_a_multiple_of_the_port_width():
    """The contract's text: LOAD_ACT's in_features is act_row_len(n), a multiple of P, never n."""
    cfg = get_config("small")                                   # P = 64
    unit = NdpGoldenUnit(cfg)
    unit.write(0, act_image(torch.zeros(2, 96, dtype=torch.int8), cfg.word_bits))
    unit.execute(Descriptor.load_act(tokens=2, in_features=96))
    assert unit.error == ErrorCode.BAD_IN_FEATURES
    unit.execute(Descriptor.load_act(tokens=2, in_features=act_row_len(96, cfg.word_bits)))
    assert unit.error == ErrorCode.NONE and unit.loaded == (2, 128)


def test_nop_reads_nothing_and_emits_nothing():
    cfg = get_config("small")
    unit = NdpGoldenUnit(cfg)
    nop = Descriptor(Opcode.NOP, addr=12345)
    assert (nop.words(cfg), nop.read_bytes(cfg), nop.beats(cfg), nop.results, nop.output_order()) == (0, 0, 0, 0, [])
    assert unit.execute(nop) == [] and unit.error == ErrorCode.NONE


def test_golden_takes_only_descriptors():
    with pytest.raises(TypeError, match="expected a contract.Descriptor"):
        NdpGoldenUnit(get_config("small")).execute({"opcode": 1})


def test_contract_width_table_is_the_constants():
    """The contract's text states the internal widths; they are the derived constants, each holds
    its extreme, and the term and the scaled term would not hold it with one bit fewer."""
    from ndpmoe.model import contract as c
    rows = dict(re.findall(r"^\s+([A-Z_]+_BITS)\s+(\d+)\s", c.__doc__, re.M))
    assert set(rows) == {"GROUP_QX_BITS", "GROUP_X_BITS", "TERM_BITS", "SCALED_TERM_BITS", "ACC_BITS"}
    for name, bits in rows.items():
        assert getattr(c, name) == int(bits), name
    g, x, code, zero = max(SUPPORTED_GROUPS), c.ACT_MAX + 1, 255, 1 << (c.ZERO_BITS - 1)
    term = g * x * ((1 << c.ZERO_FRAC_BITS) * code + zero)        # x = -128, codes 255, zero -2^15
    for bits, extreme in ((c.GROUP_QX_BITS, g * code * x), (c.GROUP_X_BITS, g * x), (c.TERM_BITS, term),
                          (c.SCALED_TERM_BITS, term * c.SCALE_MAX)):
        assert -extreme >= -(1 << (bits - 1)), (bits, extreme)
    assert (c.TERM_BITS, c.SCALED_TERM_BITS) == (31, 47)
    assert term > 1 << (c.TERM_BITS - 2) and term * c.SCALE_MAX > 1 << (c.SCALED_TERM_BITS - 2)
