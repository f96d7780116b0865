"""Exact round trips of the packed format for every (bits, group, word) combination."""
import itertools

import pytest
import torch

from ndpmoe.model.contract import (SCALE_MAX, SUPPORTED_BITS, SUPPORTED_GROUPS, SUPPORTED_WORD_BITS, ZERO_MAX,
                            ZERO_MIN, QuantFormat)
from ndpmoe.model.packing import pack_codes, pack_matrix, unpack_matrix


@pytest.mark.parametrize("bits,group,word", list(itertools.product(SUPPORTED_BITS, SUPPORTED_GROUPS, SUPPORTED_WORD_BITS)))
def test_matrix_round_trip(bits, group, word):
    fmt = QuantFormat(bits, group, word)
    g = torch.Generator().manual_seed(bits * 1000 + group + word)
    for in_features in (group, 3 * group, 9 * group):
        rows = 5
        codes = torch.randint(0, fmt.qmax + 1, (rows, in_features), generator=g, dtype=torch.uint8)
        scale = torch.randint(0, SCALE_MAX + 1, (rows, in_features // group), generator=g)
        zero = torch.randint(ZERO_MIN, ZERO_MAX + 1, (rows, in_features // group), generator=g)
        image = pack_matrix(codes, scale, zero, fmt)
        assert image.numel() == fmt.matrix_bytes(rows, in_features)
        c2, s2, z2 = unpack_matrix(image, fmt, rows, in_features)
        assert torch.equal(c2, codes)
        assert torch.equal(s2, scale.int())
        assert torch.equal(z2, zero.int())


def test_bit_layout_matches_docstring():
    # 2-bit: code i at bits [2i, 2i+2) of the little-endian word.
    fmt = QuantFormat(2, 32, 64)
    codes = torch.tensor([[1, 2, 3, 0] + [0] * 28], dtype=torch.uint8)
    assert pack_codes(codes, fmt)[0, 0].item() == 1 | 2 << 2 | 3 << 4
    # 3-bit: hi plane word first, then the two lo-plane words.
    fmt3 = QuantFormat(3, 32, 64)
    codes = torch.zeros(1, 64, dtype=torch.uint8)
    codes[0, 0], codes[0, 33] = 5, 6        # 0b101 and 0b110
    raw = pack_codes(codes, fmt3)[0]
    assert raw[0].item() == 1 and raw[4].item() == 2            # hi bits of code 0 and code 33
    assert raw[8].item() == 1                                   # lo bits of code 0 in word 1
    assert raw[16].item() == 2 << 2                             # lo bits of code 33 = code 1 of word 2


def test_metadata_word_leads_each_superblock():
    fmt = QuantFormat(4, 32, 128)       # E = 4 groups per metadata word
    codes = torch.zeros(1, 32 * 5, dtype=torch.uint8)
    scale = torch.arange(1, 6).reshape(1, 5)
    zero = -torch.arange(1, 6).reshape(1, 5)
    image = pack_matrix(codes, scale, zero, fmt)
    words = image.reshape(-1, 16)
    # Superblock 0: meta word, then 4 groups x 32 codes x 4 bits = 4 words; superblock 1: meta + 1 word.
    assert words.shape[0] == 1 + 4 + 1 + 1 == fmt.row_words(160)
    assert int.from_bytes(bytes(words[0, :4].tolist()), "little") == 1 | (0xFFFF << 16)
    assert int.from_bytes(bytes(words[5, :4].tolist()), "little") == 5 | ((-5 & 0xFFFF) << 16)


def test_padding_is_phantom_groups():
    fmt = QuantFormat(3, 64, 128)       # C = 128 codes per block, so 576 pads to 640
    assert fmt.padded_in(576) == 640
    assert fmt.padded_groups(576) == 10 and fmt.groups(576) == 9
    codes = torch.ones(2, 576, dtype=torch.uint8)
    image = pack_matrix(codes, torch.ones(2, 9, dtype=torch.int32), torch.zeros(2, 9, dtype=torch.int32), fmt)
    words = image.reshape(2, -1, 16)
    assert words.shape[1] == fmt.row_words(576) == 18     # superblocks of 4, 4 and 2 groups
    last_meta = words[0, 14]                               # 7 + 7 words precede it
    entry = lambda j: int.from_bytes(bytes(last_meta[4 * j:4 * j + 4].tolist()), "little")
    assert entry(0) == 1                                   # group 8: scale 1, zero 0
    assert entry(1) == 0                                   # phantom group 9: scale 0, zero 0


def test_codes_out_of_range_refused():
    fmt = QuantFormat(2, 32)
    with pytest.raises(ValueError, match="at most 3"):
        pack_matrix(torch.full((1, 32), 4, dtype=torch.uint8), torch.ones(1, 1), torch.zeros(1, 1), fmt)
    with pytest.raises(TypeError, match="uint8"):
        pack_codes(torch.zeros(1, 32, dtype=torch.int32), fmt)
    with pytest.raises(ValueError, match="expected 1 bytes|expected"):
        unpack_matrix(torch.zeros(7, dtype=torch.uint8), fmt, 1, 32)
