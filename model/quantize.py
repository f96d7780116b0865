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


def encode(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: QuantFormat,
           exp: int | None = None) -> QuantizedMatrix:
    """Fix the float (scale, zero) to the contract's fixed point and round codes against it."""
    mant, zfx, exp = to_fixed(scale, zero, exp)
    s = mant.double() * 2.0 ** -exp
    z = zfx.double() / 16.0
    q = torch.round(groups_of(w.double(), fmt) / s[..., None] + z[..., None]).clamp(0, fmt.qmax)
    return QuantizedMatrix(fmt, q.reshape(w.shape).to(torch.uint8), mant, zfx, exp)


def quantize_rtn(w: torch.Tensor, fmt: QuantFormat) -> QuantizedMatrix:
    """Round-to-nearest with the group's min and max as the range."""
    check_weight(w, fmt)
    scale, zero = minmax_params(groups_of(w.double(), fmt), fmt.qmax)
    return encode(w, scale, zero, fmt)


# ---------------------------------------------------------------------------------------------
# HQQ: half-quadratic refinement of the zero point (Badri & Shaji, 2023)
# ---------------------------------------------------------------------------------------------
def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of the l_p (p < 1) norm: the sparsity-promoting error model of HQQ."""
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * x.abs().clamp_min(1e-12).pow(p - 1))


def hqq_params(wg: torch.Tensor, qmax: int, iters: int = 20, p: float = 0.7, beta: float = 10.0,
               kappa: float = 1.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Float (scale, zero) per group: min-max scale, zero refined by HQQ's alternating solver."""
    scale, zero = minmax_params(wg, qmax)
    inv = 1.0 / scale[..., None]
    z = zero[..., None].clone()
    best_z, best_err = z.clone(), torch.full_like(zero, float("inf"))
    for _ in range(iters):
        q = torch.round(wg * inv + z).clamp(0, qmax)
        w_r = (q - z) / inv
        err = (wg - w_r).abs().mean(-1)
        better = err < best_err
        best_z = torch.where(better[..., None], z, best_z)
        best_err = torch.where(better, err, best_err)
        w_e = _shrink_lp(wg - w_r, beta, p)
        z = (q - (wg - w_e) * inv).mean(-1, keepdim=True)
        beta *= kappa
    return scale, best_z[..., 0]


def quantize_hqq(w: torch.Tensor, fmt: QuantFormat, iters: int = 20) -> QuantizedMatrix:
    check_weight(w, fmt)
    scale, _ = minmax_params(groups_of(w.double(), fmt), fmt.qmax)   # the exact min-max scale
    _, zero = hqq_params(groups_of(w.float(), fmt), fmt.qmax, iters)
    return encode(w, scale, zero.double(), fmt)


# ---------------------------------------------------------------------------------------------
# Activation-aware search: per group, the (scale, zero) candidate with the smallest error
# weighted by the calibration inputs' energy diag(X^T X); rows that come out worse than
# round-to-nearest on the full output error fall back to it, so the result is never worse on
# the calibration data.
# ---------------------------------------------------------------------------------------------
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)


def _candidate_error(wg, scale, zero, qmax, weight):
    q = torch.round(wg / scale[..., None] + zero[..., None]).clamp(0, qmax)
    return (((q - zero[..., None]) * scale[..., None] - wg) ** 2 * weight).sum(-1)


def row_output_error(w: torch.Tensor, qm: QuantizedMatrix, h: torch.Tensor) -> torch.Tensor:
    """Per row, e H e^T with e = w - Q(w): the row's squared output error on the calibration set."""
    e = (w.double() - qm.dequantize(torch.float64))
    return ((e @ h.double()) * e).sum(-1)


def quantize_optimized(w: torch.Tensor, fmt: QuantFormat, h: torch.Tensor | None) -> QuantizedMatrix:
    """Activation-aware clipping search (with HQQ's zero as one more candidate) under H = X^T X."""
    check_weight(w, fmt)
    if h is None:
        raise ValueError("the activation-aware quantizer needs a calibration Gram matrix h = X^T X")
    if tuple(h.shape) != (w.shape[1],) * 2:
        raise ValueError(f"h has shape {tuple(h.shape)}, expected {(w.shape[1],) * 2}")
    wg = groups_of(w.float(), fmt)
    weight = h.diagonal().float().reshape(-1, fmt.group_size).clamp_min(0)      # [n_groups, G]
    rtn_scale, rtn_zero = minmax_params(wg.double(), fmt.qmax)
    best_s, best_z = rtn_scale.float(), rtn_zero.float()
    best_err = _candidate_error(wg, best_s, best_z, fmt.qmax, weight)
    wmin, wmax = wg.amin(-1), wg.amax(-1)
    candidates = [hqq_params(wg, fmt.qmax)]
    for ratio in CLIP_RATIOS[1:]:
        lo, hi = wmin * ratio, wmax * ratio
        s = ((hi - lo) / fmt.qmax).clamp_min(1e-12)
        candidates.append((s, -lo / s))
    for s, z in candidates:
        err = _candidate_error(wg, s, z, fmt.qmax, weight)
        better = err < best_err
        best_s, best_z, best_err = (torch.where(better, s, best_s), torch.where(better, z, best_z),
                                    torch.where(better, err, best_err))
    exp = scale_exponent_of(rtn_scale)
    rtn = encode(w, rtn_scale, rtn_zero, fmt, exp)
    opt = encode(w, best_s.double(), best_z.double(), fmt, exp)
    worse = row_output_error(w, opt, h) > row_output_error(w, rtn, h)
    pick = lambda a, b: torch.where(worse[:, None], b, a)
    return QuantizedMatrix(fmt, pick(opt.codes, rtn.codes), pick(opt.scale, rtn.scale),
                           pick(opt.zero, rtn.zero), exp)


def scale_exponent_of(scale: torch.Tensor) -> int:
    from .qtensor import scale_exponent
    return scale_exponent(float(scale.max()))


QUANTIZERS = {
    "rtn": lambda w, fmt, h=None: quantize_rtn(w, fmt),
    "hqq": lambda w, fmt, h=None: quantize_hqq(w, fmt),
    "optimized": quantize_optimized,
}


def get_quantizer(name: str):
    try:
        return QUANTIZERS[name]
    except KeyError:
        raise ValueError(f"unknown quantizer {name!r}; expected one of {sorted(QUANTIZERS)}") from None
