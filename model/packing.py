"""Bit packing of codes and metadata into the contract's memory image (see model/contract.py).

Pure layout: no quantization here. Everything is vectorized over rows; the only Python loop is
over the superblocks of one row (at most MAX_IN_FEATURES / (32 * E) of them).
"""
from __future__ import annotations

import torch

from .contract import META_ENTRY_BITS, SCALE_MAX, ZERO_MAX, ZERO_MIN, QuantFormat

_META_BYTES = META_ENTRY_BITS // 8


def _check_codes(codes: torch.Tensor, fmt: QuantFormat) -> None:
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 or codes.dim() != 2:
        raise TypeError(f"codes must be a 2-D torch.uint8 tensor, not "
                        f"{getattr(codes, 'dtype', type(codes))} of shape {tuple(getattr(codes, 'shape', ()))}")
    if codes.numel() and int(codes.max()) > fmt.qmax:
        raise ValueError(f"codes must be at most {fmt.qmax} for {fmt.bits}-bit, found {int(codes.max())}")


def _pack_sequential(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, N] codes of `bits` in {1, 2, 4, 8} -> [R, N * bits / 8] bytes, code i at bits [b*i, b*i+b)."""
    per_byte = 8 // bits
    c = codes.to(torch.int32).reshape(codes.shape[0], -1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    return (c << shifts).sum(dim=-1).to(torch.uint8)


def _unpack_sequential(data: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    c = (data.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return c.reshape(data.shape[0], -1).to(torch.uint8)


def pack_codes(codes: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """[R, N] codes (N a multiple of C) -> [R, weight_words(N) * word_bytes] bytes."""
    _check_codes(codes, fmt)
    rows, n = codes.shape
    if fmt.bits != 3:
        return _pack_sequential(codes, fmt.bits)
    blocks = codes.reshape(rows, n // fmt.codes_per_block, fmt.codes_per_block)
    hi = _pack_sequential((blocks >> 2).reshape(-1, fmt.codes_per_block), 1)
    lo = _pack_sequential((blocks & 3).reshape(-1, fmt.codes_per_block), 2)
    return torch.cat([hi, lo], dim=1).reshape(rows, -1)


def unpack_codes(data: torch.Tensor, fmt: QuantFormat, n_codes: int) -> torch.Tensor:
    rows = data.shape[0]
    if fmt.bits != 3:
        return _unpack_sequential(data, fmt.bits)[:, :n_codes]
    c, wb = fmt.codes_per_block, fmt.word_bytes
    blocks = data.reshape(-1, 3 * wb)
    hi = _unpack_sequential(blocks[:, :wb], 1)
    lo = _unpack_sequential(blocks[:, wb:], 2)
    return ((hi << 2) | lo).reshape(rows, -1)[:, :n_codes]


def pack_meta(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """[R, G] scale mantissas and Q11.4 zeros -> [R, G * 4] bytes (scale low half, zero high half)."""
    if int(scale.min()) < 0 or int(scale.max()) > SCALE_MAX:
        raise ValueError(f"scale mantissas must lie in [0, {SCALE_MAX}], found "
                         f"[{int(scale.min())}, {int(scale.max())}]")
    if int(zero.min()) < ZERO_MIN or int(zero.max()) > ZERO_MAX:
        raise ValueError(f"zero points must lie in [{ZERO_MIN}, {ZERO_MAX}], found "
                         f"[{int(zero.min())}, {int(zero.max())}]")
    entry = scale.to(torch.int64) | ((zero.to(torch.int64) & 0xFFFF) << 16)
    shifts = torch.arange(_META_BYTES, dtype=torch.int64) * 8
    return ((entry.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8).reshape(scale.shape[0], -1)


def unpack_meta(data: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    b = data.to(torch.int64).reshape(data.shape[0], -1, _META_BYTES)[:, :groups]
    entry = (b << (torch.arange(_META_BYTES, dtype=torch.int64) * 8)).sum(-1)
    scale = (entry & 0xFFFF).to(torch.int32)
    zero = (((entry >> 16) & 0xFFFF) ^ 0x8000) - 0x8000        # sign-extend int16
    return scale, zero.to(torch.int32)


def pack_matrix(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Codes [R, in], scale and zero [R, in / G] -> the flat uint8 memory image of the matrix."""
    _check_codes(codes, fmt)
    rows, in_features = codes.shape
    groups, pgroups = fmt.groups(in_features), fmt.padded_groups(in_features)
    for name, t in (("scale", scale), ("zero", zero)):
        if tuple(t.shape) != (rows, groups):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {(rows, groups)}")
    pad_codes = fmt.padded_in(in_features) - in_features
    codes = torch.nn.functional.pad(codes, (0, pad_codes))
    # Phantom groups: scale 0, zero 0, so they contribute nothing.
    scale = torch.nn.functional.pad(scale.to(torch.int64), (0, pgroups - groups))
    zero = torch.nn.functional.pad(zero.to(torch.int64), (0, pgroups - groups))
    wbytes, mbytes = pack_codes(codes, fmt), pack_meta(scale, zero)
    parts, e, g = [], fmt.meta_per_word, fmt.group_size
    for s, n_groups in enumerate(fmt.superblock_groups(in_features)):
        meta = mbytes[:, s * e * _META_BYTES:(s * e + n_groups) * _META_BYTES]
        parts.append(torch.nn.functional.pad(meta, (0, fmt.word_bytes - meta.shape[1])))
        start = fmt.weight_words(s * e * g) * fmt.word_bytes
        parts.append(wbytes[:, start:start + fmt.weight_words(n_groups * g) * fmt.word_bytes])
    image = torch.cat(parts, dim=1)
    assert image.shape[1] == fmt.row_bytes(in_features)
    return image.reshape(-1).contiguous()


def unpack_matrix(image: torch.Tensor, fmt: QuantFormat, rows: int, in_features: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of pack_matrix: image -> (codes [R, in], scale [R, in/G], zero [R, in/G])."""
    need = fmt.matrix_bytes(rows, in_features)
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8:
        raise TypeError(f"image must be a torch.uint8 tensor, not {getattr(image, 'dtype', type(image))}")
    if image.numel() != need:
        raise ValueError(f"image holds {image.numel()} bytes, expected {need} for {rows} x {in_features} {fmt}")
    data = image.reshape(rows, -1)
    e, g, wb = fmt.meta_per_word, fmt.group_size, fmt.word_bytes
    metas, weights, pos = [], [], 0
    for n_groups in fmt.superblock_groups(in_features):
        metas.append(data[:, pos:pos + n_groups * _META_BYTES])
        pos += wb
        n = fmt.weight_words(n_groups * g) * wb
        weights.append(data[:, pos:pos + n])
        pos += n
    groups = fmt.groups(in_features)
    scale, zero = unpack_meta(torch.cat(metas, dim=1), groups)
    codes = unpack_codes(torch.cat(weights, dim=1), fmt, in_features)
    return codes, scale, zero
