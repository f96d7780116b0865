"""A quantized matrix: codes plus fixed-point group metadata, in the contract's format."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .contract import SCALE_MAX, ZERO_FRAC_BITS, ZERO_MAX, ZERO_MIN, QuantFormat
from .packing import pack_matrix, unpack_matrix


@dataclass(frozen=True, eq=False)
class QuantizedMatrix:
    """W [rows, in] ~= (codes - zero / 2^ZERO_FRAC_BITS) * scale * 2^-scale_exp, per group.

    codes uint8 [rows, in]; scale int32 [rows, in / G] (uint16 mantissas); zero int32
    [rows, in / G] (Q11.4); scale_exp one integer for the whole matrix.
    """
    fmt: QuantFormat
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    scale_exp: int

    def __post_init__(self):
        rows, in_features = self.codes.shape
        groups = self.fmt.groups(in_features)
        for name in ("scale", "zero"):
            got = tuple(getattr(self, name).shape)
            if got != (rows, groups):
                raise ValueError(f"{name} has shape {got}, expected {(rows, groups)}")

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.in_features)

    @property
    def nbytes(self) -> int:
        """Bytes moved to fetch the matrix: its whole memory image, metadata included."""
        return self.fmt.matrix_bytes(self.rows, self.in_features)

    def group_scale(self) -> torch.Tensor:
        """Float group scales [rows, groups] as the fixed point represents them."""
        return self.scale.to(torch.float64) * 2.0 ** -self.scale_exp

    def group_zero(self) -> torch.Tensor:
        return self.zero.to(torch.float64) / (1 << ZERO_FRAC_BITS)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g = self.fmt.group_size
        q = self.codes.to(torch.float64).reshape(self.rows, -1, g)
        w = (q - self.group_zero()[..., None]) * self.group_scale()[..., None]
        return w.reshape(self.rows, self.in_features).to(dtype)

    def to_image(self) -> torch.Tensor:
        return pack_matrix(self.codes, self.scale, self.zero, self.fmt)

    @classmethod
    def from_image(cls, image: torch.Tensor, fmt: QuantFormat, rows: int, in_features: int,
                   scale_exp: int) -> "QuantizedMatrix":
        codes, scale, zero = unpack_matrix(image, fmt, rows, in_features)
        return cls(fmt, codes, scale, zero, scale_exp)


def scale_exponent(max_scale: float) -> int:
    """The per-matrix exponent that puts the largest group scale at the top of the mantissa."""
    if not math.isfinite(max_scale) or max_scale <= 0:
        raise ValueError(f"largest group scale must be positive and finite, not {max_scale}")
    return math.floor(math.log2(SCALE_MAX / max_scale))


def to_fixed(scale: torch.Tensor, zero: torch.Tensor, exp: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Float group scales and zeros -> (uint16 mantissas, Q11.4 zeros, exponent). A given `exp`
    must leave the largest scale representable."""
    exp = scale_exponent(float(scale.max())) if exp is None else exp
    if float(scale.max()) * 2.0 ** exp > SCALE_MAX + 0.5:
        raise ValueError(f"scale exponent {exp} overflows the {SCALE_MAX} mantissa for scale {float(scale.max())}")
    mant = torch.round(scale.double() * 2.0 ** exp).clamp(1, SCALE_MAX).to(torch.int32)
    zfx = torch.round(zero.double() * (1 << ZERO_FRAC_BITS)).clamp(ZERO_MIN, ZERO_MAX).to(torch.int32)
    return mant, zfx, exp
