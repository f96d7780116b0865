"""Group-wise asymmetric weight quantizers (round-to-nearest, HQQ, activation-aware search).

Each returns a QuantizedMatrix whose codes were rounded against the *fixed-point* scale and zero
the NDP consumes, so the GPU path and the NDP path see the same weights.
"""
from __future__ import annotations

import torch

from .contract import QuantFormat
from .qtensor import QuantizedMatrix, to_fixed


def check_weight(w: torch.Tensor, fmt: QuantFormat) -> None:
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2:
        raise TypeError(f"weight must be a 2-D float tensor, not {getattr(w, 'dtype', type(w))} "
                        f"of shape {tuple(getattr(w, 'shape', ()))}")
    fmt.check_in_features(w.shape[1])
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).nonzero()[0].tolist()
        raise ValueError(f"weight contains NaN or Inf (first at index {bad})")


def groups_of(w: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """[R, in] -> [R, in / G, G] view along the input dimension."""
    return w.reshape(w.shape[0], -1, fmt.group_size)


def minmax_params(wg: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float (scale, zero) per group from its min and max; constant groups stay exact."""
    wmin, wmax = wg.amin(-1), wg.amax(-1)
    span = wmax - wmin
    const = span <= 1e-12 * wg.abs().amax(-1).clamp_min(1e-30)
    mag = torch.maximum(wmax.abs(), wmin.abs())
    scale = torch.where(const, torch.where(mag > 0, mag / qmax, torch.ones_like(mag)), span / qmax)
    zero = torch.where(const & (mag == 0), torch.zeros_like(mag), -wmin / scale)
    return scale, zero


def encode(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: QuantFormat) -> QuantizedMatrix:
    """Fix the float (scale, zero) to the contract's fixed point and round codes against it."""
    mant, zfx, exp = to_fixed(scale, zero)
    s = mant.double() * 2.0 ** -exp
    z = zfx.double() / 16.0
    q = torch.round(groups_of(w.double(), fmt) / s[..., None] + z[..., None]).clamp(0, fmt.qmax)
    return QuantizedMatrix(fmt, q.reshape(w.shape).to(torch.uint8), mant, zfx, exp)


def quantize_rtn(w: torch.Tensor, fmt: QuantFormat) -> QuantizedMatrix:
    """Round-to-nearest with the group's min and max as the range."""
    check_weight(w, fmt)
    scale, zero = minmax_params(groups_of(w.double(), fmt), fmt.qmax)
    return encode(w, scale, zero, fmt)
