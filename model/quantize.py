"""Group-wise asymmetric weight quantizers (round-to-nearest, HQQ, activation-aware search).

Every quantizer works on a stack of matrices at once (w [E, R, I], and for the activation-aware
one a calibration Gram matrix h [E, I, I] per matrix) on any torch device, and returns one
QuantizedMatrix (on the CPU) per matrix. Codes are rounded against the *fixed-point* scale and
zero the NDP consumes, so the GPU path and the NDP path see the same weights.

Two arithmetics (`precision`):
- "float64": the reference. Scales, zeros, codes and the optimized quantizer's row check in
  float64 (HQQ's solver and the clipping search in float32), exactly as the single-matrix
  functions below always computed them: the study's cached results are made with it.
- "float32": the same min-max parameters and HQQ zeros bit for bit, codes rounded in float32
  (near-ties redone in float64), the clipping search and the optimized quantizer's row check (one
  product instead of two) in float32, the elementwise work fused (model/quant_fused.py). It moves
  the held-out output error by well under 0.1% relative (`ndpmoe quant-bench --precision-check`
  prints it per quantizer on SmolLM2's real matrices), at a fraction of the time and memory.

Legend: E matrices, R rows (output features), I input features, n groups per row, G group size.
"""
from __future__ import annotations

import torch

from . import quant_fused
from .contract import QuantFormat
from .qtensor import QuantizedMatrix, scale_exponent, to_fixed

PRECISIONS = ("float64", "float32")
# Elements of w processed at once on the CPU (a Mixtral expert matrix is 58.7M): bounds the peak
# memory of a stack to about ten float32 copies of one chunk.
CPU_CHUNK_ELEMENTS = 1 << 26


def check_weight(w: torch.Tensor, fmt: QuantFormat) -> None:
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2:
        raise TypeError(f"weight must be a 2-D float tensor, not {getattr(w, 'dtype', type(w))} "
                        f"of shape {tuple(getattr(w, 'shape', ()))}")
    _check_values(w, fmt)


def check_stack(w: torch.Tensor, fmt: QuantFormat) -> None:
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 3:
        raise TypeError(f"weight stack must be a 3-D float tensor [E, rows, in], not "
                        f"{getattr(w, 'dtype', type(w))} of shape {tuple(getattr(w, 'shape', ()))}")
    _check_values(w, fmt)


def _check_values(w: torch.Tensor, fmt: QuantFormat) -> None:
    fmt.check_in_features(w.shape[-1])
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).nonzero()[0].tolist()
        raise ValueError(f"weight contains NaN or Inf (first at index {bad})")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")


def resolve_device(device, default: torch.device) -> torch.device:
    """`device` as a torch.device (None: `default`); a CUDA device that is not there is refused."""
    dev = default if device is None else torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(dev)!r} was asked for but CUDA is not available "
                         f"(torch {torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA)")
    return dev


def groups_of(w: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """[..., R, I] -> [..., R, n, G] view along the input dimension."""
    return w.reshape(*w.shape[:-1], -1, fmt.group_size)


def group_range(wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group its min, max and largest magnitude, in one pass over wg (the largest magnitude
    is max(|min|, |max|), exactly)."""
    wmin, wmax = torch.aminmax(wg, dim=-1)
    return wmin, wmax, torch.maximum(wmin.abs(), wmax.abs())


def minmax_params(wg: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float (scale, zero) per group from its min and max; constant groups stay exact."""
    return range_params(*group_range(wg), qmax)


def minmax_params64(wg: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """minmax_params(wg.double()) bit for bit, from float32 wg: a group's min, max and largest
    magnitude are elements of it, so only the per-group arithmetic needs float64."""
    return range_params(*(t.double() for t in group_range(wg)), qmax)


def range_params(wmin, wmax, absmax, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per group from its min, max and largest magnitude."""
    span = wmax - wmin
    const = span <= 1e-12 * absmax.clamp_min(1e-30)
    mag = torch.maximum(wmax.abs(), wmin.abs())
    scale = torch.where(const, torch.where(mag > 0, mag / qmax, torch.ones_like(mag)), span / qmax)
    zero = torch.where(const & (mag == 0), torch.zeros_like(mag), -wmin / scale)
    return scale, zero


# ---------------------------------------------------------------------------------------------
# Fixed point: one scale exponent per matrix, uint16 mantissas, Q11.4 zeros
# ---------------------------------------------------------------------------------------------
class Encoded:
    """A stack of quantized matrices on the working device: codes [E, R, I] uint8, mantissas and
    zeros [E, R, n] int32, one exponent per matrix."""

    def __init__(self, codes, mant, zfx, exps: list[int]):
        self.codes, self.mant, self.zfx, self.exps = codes, mant, zfx, exps

    def dequantize(self, fmt: QuantFormat, dtype: torch.dtype) -> torch.Tensor:
        """[E, R, I]; in float64 the same arithmetic as QuantizedMatrix.dequantize."""
        step = _pow2(self.exps, -1, dtype, self.codes.device)
        q = groups_of(self.codes.to(dtype), fmt)
        w = (q - (self.zfx.to(dtype) / 16.0)[..., None]) * (self.mant.to(dtype) * step)[..., None]
        return w.reshape(self.codes.shape)

    def matrices(self, fmt: QuantFormat) -> list[QuantizedMatrix]:
        codes, mant, zfx = self.codes.cpu(), self.mant.cpu(), self.zfx.cpu()
        return [QuantizedMatrix(fmt, codes[e], mant[e], zfx[e], x) for e, x in enumerate(self.exps)]


def _pow2(exps: list[int], sign: int, dtype, device) -> torch.Tensor:
    """2^(sign * exp) per matrix as an [E, 1, 1] tensor (exact: a power of two)."""
    return torch.tensor([2.0 ** (sign * x) for x in exps], dtype=dtype, device=device).reshape(-1, 1, 1)


def scale_exponents(scale: torch.Tensor) -> list[int]:
    """Per matrix of a [E, R, n] stack, the exponent that puts its largest group scale at the top
    of the mantissa."""
    return [scale_exponent(v) for v in scale.flatten(1).amax(1).double().tolist()]


def encode_stack(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: QuantFormat,
                 precision: str, exps: list[int] | None = None) -> Encoded:
    """Fix the float (scale, zero) [E, R, n] to the contract's fixed point, round codes against it."""
    exps = scale_exponents(scale) if exps is None else exps
    mant, zfx = _fixed_stack(scale, zero, exps)
    dt = torch.float64 if precision == "float64" else torch.float32
    s = mant.to(dt) * _pow2(exps, -1, dt, w.device)
    z = zfx.to(dt) / 16.0
    q = torch.round(groups_of(w.to(dt), fmt) / s[..., None] + z[..., None]).clamp(0, fmt.qmax)
    return Encoded(q.reshape(w.shape).to(torch.uint8), mant, zfx, exps)


def encode(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: QuantFormat,
           exp: int | None = None) -> QuantizedMatrix:
    """One matrix: fix the float (scale, zero) to the contract's fixed point, round codes against it."""
    enc = encode_stack(w[None], scale[None], zero[None], fmt, "float64", None if exp is None else [exp])
    return enc.matrices(fmt)[0]


# ---------------------------------------------------------------------------------------------
# Round-to-nearest
# ---------------------------------------------------------------------------------------------
def _rtn(w: torch.Tensor, fmt: QuantFormat, precision: str) -> Encoded:
    if precision == "float64":
        scale, zero = minmax_params(groups_of(w.double(), fmt), fmt.qmax)
        return encode_stack(w, scale, zero, fmt, precision)
    wg = groups_of(w.float(), fmt)
    scale, zero = minmax_params64(wg, fmt.qmax)
    return _encode32(quant_fused.kernels(w.numel()), wg, scale, zero, fmt)


def _fixed_stack(scale, zero, exps):
    fixed = [to_fixed(scale[e], zero[e], x) for e, x in enumerate(exps)]
    return torch.stack([m for m, _, _ in fixed]), torch.stack([z for _, z, _ in fixed])


def _encode32(k, wg: torch.Tensor, scale, zero, fmt: QuantFormat, exps: list[int] | None = None) -> Encoded:
    """encode_stack in float32 with the fused kernel (wg [E, R, n, G] float32)."""
    exps = scale_exponents(scale) if exps is None else exps
    mant, zfx = _fixed_stack(scale, zero, exps)
    s, z = _float_params(mant, zfx, exps)
    codes, margin = quant_fused.run(k, "encode_codes", wg, s, z, fmt.qmax)
    near = margin < 0
    if bool(near.any()):        # groups with a near-tie: coded in float64, so the same codes
        at = near.nonzero(as_tuple=True)
        u = wg[at].double() / s[at].double()[:, None] + z[at].double()[:, None]
        codes[at] = torch.round(u).clamp(0, fmt.qmax).to(torch.uint8)
    return Encoded(codes.reshape(*wg.shape[:2], -1), mant, zfx, exps)


def _float_params(mant, zfx, exps):
    """Fixed-point scales and zeros as float32 (exact: 16-bit mantissas, Q11.4 zeros)."""
    return mant.float() * _pow2(exps, -1, torch.float32, mant.device), zfx.float() / 16.0


# ---------------------------------------------------------------------------------------------
# HQQ: half-quadratic refinement of the zero point (Badri & Shaji, 2023)
# ---------------------------------------------------------------------------------------------
def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of the l_p (p < 1) norm: the sparsity-promoting error model of HQQ."""
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * x.abs().clamp_min(1e-12).pow(p - 1))


def hqq_params(wg: torch.Tensor, qmax: int, iters: int = 20, p: float = 0.7, beta: float = 10.0,
               kappa: float = 1.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Float (scale, zero) per group [..., n, G]: min-max scale, zero refined by HQQ's alternating
    solver; the zero with the smallest mean |error| over the iterations is kept.

    The shrinkage is exactly zero while every |residual| < beta^(-1/(2-p)) (it is for weights of
    the usual magnitude); an iteration then depends on the zero alone, so a group whose zero
    came back unchanged is at a fixed point for good and leaves the working set. The result is
    the same, bit for bit, as iterating every group `iters` times."""
    scale, zero = minmax_params(wg, qmax)
    g = wg.shape[-1]
    w = wg.reshape(-1, g)
    inv = (1.0 / scale).reshape(-1, 1)
    z = zero.reshape(-1, 1).clone()
    best_z, best_err = z.clone(), torch.full((w.shape[0],), float("inf"), dtype=w.dtype, device=w.device)
    # |residual| below which the shrinkage is zero (with a factor 2 of margin) for every beta used
    quiet = 0.5 * (beta * kappa ** max(iters - 1, 0)) ** (-1.0 / (2.0 - p))
    rows = None                                # working set: indices into the full arrays (None: all)
    wa, inva, za, bz, be = w, inv, z, best_z, best_err
    for _ in range(iters):
        if wa.shape[0] == 0:
            break
        q = torch.round(wa * inva + za).clamp(0, qmax)
        w_r = (q - za) / inva
        d = wa - w_r
        err = d.abs().mean(-1)
        better = err < be
        bz = torch.where(better[:, None], za, bz)
        be = torch.where(better, err, be)
        if float(d.abs().max()) < quiet:
            z_new = (q - wa * inva).mean(-1, keepdim=True)          # = with the (zero) shrinkage
            moving = (z_new != za)[:, 0]
        else:
            z_new = (q - (wa - _shrink_lp(d, beta, p)) * inva).mean(-1, keepdim=True)
            moving = None
        za = z_new
        beta *= kappa
        if moving is not None and int(moving.sum()) * 2 < wa.shape[0]:
            # Write the fixed points back and keep iterating the rest only.
            idx = torch.arange(w.shape[0], device=w.device) if rows is None else rows
            best_z[idx], best_err[idx] = bz, be
            keep = moving.nonzero()[:, 0]
            rows = idx[keep]
            wa, inva, za, bz, be = wa[keep], inva[keep], za[keep], bz[keep], be[keep]
    idx = torch.arange(w.shape[0], device=w.device) if rows is None else rows
    best_z[idx] = bz
    return scale, best_z.reshape(zero.shape)


# The fused solver drops the groups at a fixed point once fewer than this share of its working set
# still moves: an iteration reads the working set about six times, dropping copies it twice.
HQQ_SHRINK_BELOW = 0.8


def hqq_zero_fused(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int, k,
                   iters: int = 20, p: float = 0.7, beta: float = 10.0, kappa: float = 1.01) -> torch.Tensor:
    """hqq_params' zero, bit for bit, with each iteration's elementwise work fused (scale, zero:
    the min-max start, float32)."""
    g = wg.shape[-1]
    w = wg.reshape(-1, g)
    inv = (1.0 / scale).reshape(-1, 1)
    t = w * inv
    best_z = zero.reshape(-1, 1).clone()
    best_err = torch.full((w.shape[0],), float("inf"), dtype=w.dtype, device=w.device)
    quiet = 0.5 * (beta * kappa ** max(iters - 1, 0)) ** (-1.0 / (2.0 - p))
    rows = None
    wa, ta, inva, za, bz, be = w, t, inv, best_z.clone(), best_z.clone(), best_err
    for _ in range(iters):
        if ta.shape[0] == 0:
            break
        q_t, d = quant_fused.run(k, "hqq_step", wa, ta, inva, za, qmax)
        z_new, err, worst = q_t.mean(-1, keepdim=True), d.mean(-1), d.amax()
        del q_t, d
        better = err < be
        bz = torch.where(better[:, None], za, bz)
        be = torch.where(better, err, be)
        moving = None
        if float(worst) >= quiet:          # shrinkage active somewhere: the full step, eagerly
            q = torch.round(ta + za).clamp(0, qmax)
            d = wa - (q - za) / inva
            z_new = (q - (wa - _shrink_lp(d, beta, p)) * inva).mean(-1, keepdim=True)
        else:
            moving = (z_new != za)[:, 0]
        za = z_new
        beta *= kappa
        if moving is not None and int(moving.sum()) < HQQ_SHRINK_BELOW * ta.shape[0]:
            idx = torch.arange(w.shape[0], device=w.device) if rows is None else rows
            best_z[idx], best_err[idx] = bz, be
            keep = moving.nonzero()[:, 0]
            rows = idx[keep]
            wa, ta, inva, za, bz, be = wa[keep], ta[keep], inva[keep], za[keep], bz[keep], be[keep]
    idx = torch.arange(w.shape[0], device=w.device) if rows is None else rows
    best_z[idx] = bz
    return best_z.reshape(zero.shape)


def _hqq(w: torch.Tensor, fmt: QuantFormat, precision: str, iters: int = 20) -> Encoded:
    if precision == "float64":
        scale, _ = minmax_params(groups_of(w.double(), fmt), fmt.qmax)   # the exact min-max scale
        _, zero = hqq_params(groups_of(w.float(), fmt), fmt.qmax, iters)
        return encode_stack(w, scale, zero.double(), fmt, precision)
    k = quant_fused.kernels(w.numel())
    wg = groups_of(w.float(), fmt)
    lo_hi_mag = group_range(wg)
    scale, zero = range_params(*lo_hi_mag, fmt.qmax)
    zero = hqq_zero_fused(wg, scale, zero, fmt.qmax, k, iters)
    return _encode32(k, wg, range_params(*(t.double() for t in lo_hi_mag), fmt.qmax)[0], zero.double(), fmt)


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


def _optimized32(w: torch.Tensor, fmt: QuantFormat, h: torch.Tensor) -> Encoded:
    """_optimized in float32: the same candidates and fallback, fused."""
    k = quant_fused.kernels(w.numel())
    e_, g = w.shape[0], fmt.group_size
    wg = groups_of(w.float(), fmt)                                                   # [E, R, n, G]
    weight = h.diagonal(dim1=-2, dim2=-1).float().reshape(e_, 1, -1, g).clamp_min(0)  # [E, 1, n, G]
    wmin, wmax, absmax = group_range(wg)
    rtn_scale, rtn_zero = range_params(wmin.double(), wmax.double(), absmax.double(), fmt.qmax)
    s32, z32 = range_params(wmin, wmax, absmax, fmt.qmax)   # HQQ starts from the float32 ones, as in float64
    scales, zeros = [rtn_scale.float(), s32], [rtn_zero.float(), hqq_zero_fused(wg, s32, z32, fmt.qmax, k)]
    for ratio in CLIP_RATIOS[1:]:
        lo, hi = wmin * ratio, wmax * ratio
        s = ((hi - lo) / fmt.qmax).clamp_min(1e-12)
        scales.append(s)
        zeros.append(-lo / s)
    best_s, best_z = quant_fused.run(k, "clip_search", wg, weight, torch.stack(scales), torch.stack(zeros), fmt.qmax)
    del scales, zeros, weight
    exps = scale_exponents(rtn_scale)
    rtn = _encode32(k, wg, rtn_scale, rtn_zero, fmt, exps)
    opt = _encode32(k, wg, best_s.double(), best_z.double(), fmt, exps)
    shape = wg.shape
    d, s = quant_fused.run(k, "row_check_operands", wg, rtn.codes.reshape(shape), *_float_params(rtn.mant, rtn.zfx, exps),
                           opt.codes.reshape(shape), *_float_params(opt.mant, opt.zfx, exps))
    del wg
    # e_o H e_o^T - e_r H e_r^T = (e_o - e_r) H (e_o + e_r)^T with H symmetric: one product, and
    # no cancellation between two large numbers.
    dh = d.reshape(w.shape) @ h.float()
    del d
    worse = quant_fused.run(k, "row_check_reduce", dh, s.reshape(w.shape))
    pick = lambda a, b: torch.where(worse[..., None], b, a)
    return Encoded(pick(opt.codes, rtn.codes), pick(opt.mant, rtn.mant), pick(opt.zfx, rtn.zfx), exps)


def _optimized(w: torch.Tensor, fmt: QuantFormat, h: torch.Tensor, precision: str) -> Encoded:
    if precision == "float32":
        return _optimized32(w, fmt, h)
    e_, g = w.shape[0], fmt.group_size
    wg = groups_of(w.float(), fmt)                                                   # [E, R, n, G]
    weight = h.diagonal(dim1=-2, dim2=-1).float().reshape(e_, 1, -1, g).clamp_min(0)  # [E, 1, n, G]
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
    del wg, weight, best_err, candidates
    exps = scale_exponents(rtn_scale)
    rtn = encode_stack(w, rtn_scale, rtn_zero, fmt, precision, exps)
    opt = encode_stack(w, best_s.double(), best_z.double(), fmt, precision, exps)
    worse = torch.stack([_row_error(w[e], opt, e, fmt, h[e]) > _row_error(w[e], rtn, e, fmt, h[e])
                         for e in range(e_)])
    pick = lambda a, b: torch.where(worse[..., None], b, a)
    return Encoded(pick(opt.codes, rtn.codes), pick(opt.mant, rtn.mant), pick(opt.zfx, rtn.zfx), exps)


def _row_error(w: torch.Tensor, enc: Encoded, e: int, fmt: QuantFormat, h: torch.Tensor) -> torch.Tensor:
    """row_output_error of matrix e of a stack, in float64 (the reference arithmetic)."""
    one = Encoded(enc.codes[e:e + 1], enc.mant[e:e + 1], enc.zfx[e:e + 1], enc.exps[e:e + 1])
    err = w.double() - one.dequantize(fmt, torch.float64)[0]
    return ((err @ h.double()) * err).sum(-1)


# ---------------------------------------------------------------------------------------------
# The stacked entry point, and the single-matrix functions (the reference arithmetic)
# ---------------------------------------------------------------------------------------------
QUANTIZER_NAMES = ("rtn", "hqq", "optimized")


def quantize_stack(w: torch.Tensor, fmt: QuantFormat, method: str, h: torch.Tensor | None = None, *,
                   precision: str = "float32", device=None) -> list[QuantizedMatrix]:
    """Quantize every matrix of w [E, R, I] with `method` (h [E, I, I]: the calibration Gram
    matrix of each, for "optimized"), on `device` (default: w's), in `precision`."""
    if method not in QUANTIZER_NAMES:
        raise ValueError(f"unknown quantizer {method!r}; expected one of {sorted(QUANTIZER_NAMES)}")
    check_precision(precision)
    check_stack(w, fmt)
    if method == "optimized":
        if h is None:
            raise ValueError("the activation-aware quantizer needs a calibration Gram matrix h = X^T X")
        want = (w.shape[0], w.shape[2], w.shape[2])
        if tuple(h.shape) != want:
            raise ValueError(f"h has shape {tuple(h.shape)}, expected {want}")
    dev = resolve_device(device, w.device)
    step = max(1, chunk_elements(dev) // (w.shape[1] * w.shape[2]))
    out: list[QuantizedMatrix] = []
    for i in range(0, w.shape[0], step):
        wc = w[i:i + step].to(dev)
        if method == "rtn":
            enc = _rtn(wc, fmt, precision)
        elif method == "hqq":
            enc = _hqq(wc, fmt, precision)
        else:
            enc = _optimized(wc, fmt, h[i:i + step].to(dev), precision)
        out += enc.matrices(fmt)
    return out


def chunk_elements(device: torch.device) -> int:
    """Weights quantized at once: bounded on the CPU, a share of the free memory on a GPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(CPU_CHUNK_ELEMENTS, free // (4 * 24))     # ~24 float32 temporaries per weight
    return CPU_CHUNK_ELEMENTS


def quantize_rtn(w: torch.Tensor, fmt: QuantFormat) -> QuantizedMatrix:
    """Round-to-nearest with the group's min and max as the range."""
    check_weight(w, fmt)
    return quantize_stack(w[None], fmt, "rtn", precision="float64")[0]


def quantize_hqq(w: torch.Tensor, fmt: QuantFormat, iters: int = 20) -> QuantizedMatrix:
    check_weight(w, fmt)
    return _hqq(w[None], fmt, "float64", iters).matrices(fmt)[0]


def quantize_optimized(w: torch.Tensor, fmt: QuantFormat, h: torch.Tensor | None) -> QuantizedMatrix:
    """Activation-aware clipping search (with HQQ's zero as one more candidate) under H = X^T X."""
    check_weight(w, fmt)
    if h is None:
        raise ValueError("the activation-aware quantizer needs a calibration Gram matrix h = X^T X")
    if tuple(h.shape) != (w.shape[1],) * 2:
        raise ValueError(f"h has shape {tuple(h.shape)}, expected {(w.shape[1],) * 2}")
    return quantize_stack(w[None], fmt, "optimized", h[None], precision="float64")[0]


def scale_exponent_of(scale: torch.Tensor) -> int:
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
