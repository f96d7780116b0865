"""Compensators stored low-bit, in the contract's packed format: a factor is just another matrix.

Layout. A rank-r compensator of W [out, in] is stored as two packed matrices, one row per rank
component: B [r, in] (grouped along `in`) and A^T [r, out] (grouped along `out`). Each image is
row after row, so the rank-r' prefix of both is one contiguous prefix of each image, and its bytes
grow linearly with r' (`bytes_per_rank`). Storing A as [out, r] instead (what the NDP's int8
factors do, `compensate.Int8LowRank`) pads r to a whole group and costs the full padded A even at
rank 1: on the default model's 64 x 576 experts, ~22 kB per expert at 3 bits against ~0.3 kB per
rank here. B x is an ordinary MATMUL descriptor on the stored B rows; A (Bx) is an r-long
weighted sum of A^T rows.

Fit. Greedy, one component at a time on the residual, so that every prefix is exactly the
compensator the fit built at that step (the prefix property the fp16 fits have by construction):
1. the leading activation-aware component of the residual R (top singular pair of R L, with
   H + damping = L L^T; LQER / QERA);
2. its B row is quantized;
3. its A column is refitted against the *quantized* row on the calibration statistics
   (a = R H b^T / (b H b^T), the least-squares optimum given b), then quantized;
4. R -= a_q b_q.
Each step's objective reduction tr(R H R^T) before minus after is recorded as that component's
measured gain (`spectrum`), quantization of both factors included.
The per-matrix scale exponent of each image is fixed before the fit from the fp16 factors' range
(with one bit of headroom), so each row is rounded against exactly the fixed point it is stored in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .compensate import LowRank, _krylov_is_cheaper, block_krylov, whitening_factor
from .contract import (FP16_BYTES, SCALE_MAX, ZERO_FRAC_BITS, QuantFormat, int8_factor_columns,
                       largest_group)
from .qtensor import QuantizedMatrix, scale_exponent
from .quantize import check_precision, encode, groups_of, minmax_params

FACTOR_BITS = (3, 4, 8)                 # low-bit factor precisions (fp16 is the unquantized store)
FACTOR_PRECISIONS = ("fp16", "int8", "int4", "int3")
# The residual after k greedy steps has its leading direction close to the fp16 fit's (k+1)-th:
# a few power iterations from it agree with a full SVD per step (kept reductions within 0.1 %).
POWER_ITERS = 12


def factor_bits(precision: str) -> int | None:
    """'fp16' -> None, 'int8' / 'int4' / 'int3' -> 8 / 4 / 3; anything else is refused."""
    if precision == "fp16":
        return None
    if precision in FACTOR_PRECISIONS:
        return int(precision[3:])
    raise ValueError(f"factor precision must be one of {FACTOR_PRECISIONS}, not {precision!r}")


def factor_format(bits: int, n: int, group: int, word_bits: int) -> QuantFormat:
    """The packed format of a factor row of length n: the experts' group size where it divides n,
    else the largest supported group that does."""
    if bits not in FACTOR_BITS:
        raise ValueError(f"factor bits must be one of {FACTOR_BITS}, not {bits!r}")
    if n % group == 0:
        return QuantFormat(bits, group, word_bits)
    for g in (128, 64, 32):
        if n % g == 0:
            return QuantFormat(bits, g, word_bits)
    raise ValueError(f"a factor row of {n} values is not a multiple of 32; pad the matrix")


def bytes_per_rank(out_features: int, in_features: int, bits: int | None, group: int = 64,
                   word_bits: int = 64) -> int:
    """Bytes one rank component moves: one B row and one A^T row (fp16: 2 bytes per value)."""
    if bits is None:
        return FP16_BYTES * (out_features + in_features)
    return (factor_format(bits, in_features, group, word_bits).row_bytes(in_features)
            + factor_format(bits, out_features, group, word_bits).row_bytes(out_features))


@dataclass(frozen=True, eq=False)
class QuantLowRank:
    """A rank-r compensator as two packed images, B [r, in] and A^T [r, out], best-first rows."""
    B_q: QuantizedMatrix
    At_q: QuantizedMatrix
    spectrum: torch.Tensor          # [r] measured objective reduction per component

    @property
    def rank(self) -> int:
        return self.B_q.rows

    @property
    def bits(self) -> int:
        return self.B_q.fmt.bits

    def nbytes(self, rank: int | None = None) -> int:
        """Bytes of the rank-`rank` prefix of both images (whole rows, metadata included)."""
        r = self.rank if rank is None else rank
        if not 0 <= r <= self.rank:
            raise ValueError(f"rank must be in [0, {self.rank}], not {r!r}")
        return r * (self.B_q.fmt.row_bytes(self.B_q.in_features) + self.At_q.fmt.row_bytes(self.At_q.in_features))

    def lowrank(self, rank: int | None = None) -> LowRank:
        """The dequantized rank-`rank` prefix as float factors (what the GPU applies)."""
        r = self.rank if rank is None else rank
        if not 0 <= r <= self.rank:
            raise ValueError(f"rank must be in [0, {self.rank}], not {r!r}")
        return LowRank(self.At_q.dequantize()[:r].t().contiguous(), self.B_q.dequantize()[:r], self.spectrum[:r])


def _row_exponent(rows: torch.Tensor, fmt: QuantFormat) -> int:
    """Scale exponent for rows like these, with one bit of headroom for later components."""
    scale, _ = minmax_params(groups_of(rows.double(), fmt), fmt.qmax)
    return scale_exponent(2.0 * float(scale.max()))


def _quantize_row(v: torch.Tensor, fmt: QuantFormat, exp: int) -> QuantizedMatrix:
    scale, zero = minmax_params(groups_of(v[None].double(), fmt), fmt.qmax)
    if float(scale.max()) * 2.0 ** exp > SCALE_MAX:
        exp = scale_exponent(float(scale.max()))       # a row outgrew the headroom: its own exponent
    return encode(v[None], scale, zero, fmt, exp)


def _quantize_row_symmetric(v: torch.Tensor, fmt: QuantFormat, exp: int) -> QuantizedMatrix:
    """One rank component's A column: one scale for the whole row and the mid-range zero, so the
    row is s_k * (code - Z) and the NDP can fold s_k into the intermediate (see ndp_a_image)."""
    n_groups = fmt.groups(v.numel())
    half = fmt.qmax / 2.0
    s = float(v.abs().max()) / half
    if s <= 0:
        s = 1.0 / half                                   # an all-zero row: any scale, codes at Z
    if s * 2.0 ** exp > SCALE_MAX:
        exp = scale_exponent(s)
    scale = torch.full((1, n_groups), s, dtype=torch.float64)
    zero = torch.full((1, n_groups), half, dtype=torch.float64)
    return encode(v[None], scale, zero, fmt, exp)


def _stack(rows: list[QuantizedMatrix], fmt: QuantFormat) -> QuantizedMatrix:
    """One packed matrix from 1-row matrices; rows rounded at a larger exponent are re-expressed
    at the common (smallest) one, which represents their scale exactly when it is a power-of-two
    shift of the mantissa and otherwise within one mantissa step."""
    exp = min(r.scale_exp for r in rows)
    scale = torch.cat([torch.round(r.scale.double() * 2.0 ** (exp - r.scale_exp)).clamp(1, SCALE_MAX).to(torch.int32)
                       for r in rows])
    return QuantizedMatrix(fmt, torch.cat([r.codes for r in rows]), scale, torch.cat([r.zero for r in rows]), exp)


TRIANGLE_BLOCKS = 8


def _times_lower(e: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """e @ l for a lower-triangular l without its zero upper triangle: column block J of the
    product needs only rows J.. of l, so TRIANGLE_BLOCKS blocks take (blocks + 1) / (2 blocks)
    of the multiply-adds (the same products, summed without the zero terms)."""
    n = l.shape[0]
    out = torch.empty(e.shape[0], n, dtype=e.dtype, device=e.device)
    step = -(-n // TRIANGLE_BLOCKS)
    for j in range(0, n, step):
        out[:, j:j + step] = e[:, j:] @ l[j:, j:j + step]
    return out


def _gram_of_columns(x: torch.Tensor) -> torch.Tensor:
    """x^T x from the blocks on and above its diagonal (TRIANGLE_BLOCKS row blocks; the rest
    mirrored): (blocks + 1) / (2 blocks) of the multiply-adds."""
    n = x.shape[1]
    g = torch.empty(n, n, dtype=x.dtype, device=x.device)
    step = -(-n // TRIANGLE_BLOCKS)
    for i in range(0, n, step):
        g[i:i + step, i:] = x[:, i:i + step].t() @ x[:, i:]
        g[i + step:, i:i + step] = g[i:i + step, i + step:].t()
    return g


class _WhitenedResidual:
    """The whitened residual M = M0 - A C^T (M0 = E L; A and C = L^T B^T the quantized components
    so far) held as M0 and the components, and its smaller Gram matrix (M M^T or M^T M) kept up
    to date by rank-2 updates, so that power iterations read the Gram matrix and no updated copy
    of M is ever written."""

    def __init__(self, m: torch.Tensor, rank: int = 0):
        self.m0, self.k = m, 0
        self.wide = m.shape[0] <= m.shape[1]
        self.g = _gram_of_columns(m.t() if self.wide else m)
        self.a = torch.empty(m.shape[0], rank, dtype=m.dtype, device=m.device)
        self.c = torch.empty(m.shape[1], rank, dtype=m.dtype, device=m.device)

    def times(self, v: torch.Tensor) -> torch.Tensor:
        """M v."""
        return self.m0 @ v - self.a[:, :self.k] @ (self.c[:, :self.k].t() @ v)

    def times_t(self, u: torch.Tensor) -> torch.Tensor:
        """M^T u."""
        return self.m0.t() @ u - self.c[:, :self.k] @ (self.a[:, :self.k].t() @ u)

    def leading_right(self, start: torch.Tensor, iters: int = POWER_ITERS) -> tuple[torch.Tensor, float]:
        """On the tall side: unit leading right singular vector w of M, by `iters` power iterations
        w <- M^T M w from `start`, and |M w| (from the Gram matrix)."""
        w = start / start.norm()
        for _ in range(iters):
            w = self.g @ w
            w = w / w.norm().clamp_min(1e-300)
        return w, max(float(w @ (self.g @ w)), 0.0) ** 0.5

    def leading_left(self, m_start: torch.Tensor, iters: int = POWER_ITERS) -> torch.Tensor:
        """On the wide side: the unit vector u whose M^T u is the power iterations' right vector
        (M^T M)^iters start = M^T (M M^T)^(iters - 1) M start, given M start."""
        u = m_start
        for _ in range(iters - 1):
            u = u / u.norm().clamp_min(1e-300)
            u = self.g @ u
        return u / u.norm().clamp_min(1e-300)

    def lose(self, a: torch.Tensor, c: torch.Tensor) -> None:
        """M becomes M - a c^T: one symmetric rank-2 update of the Gram matrix in place,
        g -= x d^T + d x^T with (x, d) = (a, M c - |c|^2 a / 2) on the wide side (M M^T) and
        (c, M^T a - |a|^2 c / 2) on the tall side (M^T M)."""
        if self.wide:
            x, d = a, self.times(c) - (0.5 * float(c @ c)) * a
        else:
            x, d = c, self.times_t(a) - (0.5 * float(a @ a)) * c
        self.g.addmm_(torch.stack([x, d], 1), torch.stack([d, x]), alpha=-1)
        self.a[:, self.k], self.c[:, self.k] = a, c
        self.k += 1


# Start directions (see leading_eigenpairs): the Krylov block is the wanted count plus this many,
# its convergence is checked first at this many blocks and then every second block, and a Ritz pair
# counts as converged when its residual |G y - t y| is under START_TOL of the largest eigenvalue.
START_EXTRA = 8
START_FIRST_CHECK = 12
START_TOL = 1e-6


def leading_eigenpairs(g: torch.Tensor, k: int, exact: bool = False) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The k largest eigenvalues (descending) and their unit eigenvectors [n, k] of a symmetric
    positive semi-definite float64 matrix, and whether they came from block Krylov. A full
    eigendecomposition costs O(n^3) for all n pairs (on OLMoE's 1024 x 1024 Gram matrices most
    of a fit's time); block Krylov (a Gaussian block from a fixed seed, G applied to the newest
    block, Gram-Schmidt twice, Rayleigh-Ritz) gets the leading ones to START_TOL. Quantization
    errors have flat spectra, so that takes a basis of a few hundred vectors; where it would take
    more than half of n, where n is too small for START_FIRST_CHECK blocks, or where G has fewer
    independent directions than the basis (or `exact`), the full eigendecomposition is used instead."""
    n = g.shape[0]
    block = min(k + START_EXTRA, n)
    limit = n // 2 // block                       # most blocks worth building
    if exact or limit < START_FIRST_CHECK:
        lam, vec = torch.linalg.eigh(g)
        return lam[-k:].flip(-1), vec[:, -k:].flip(-1), False
    gen = torch.Generator(device=g.device).manual_seed(0)
    basis = torch.empty(n, limit * block, dtype=g.dtype, device=g.device)
    images = torch.empty_like(basis)                  # G times each basis column
    basis[:, :block] = torch.linalg.qr(torch.randn(n, block, generator=gen, dtype=g.dtype, device=g.device))[0]
    images[:, :block] = g @ basis[:, :block]
    check, trace = START_FIRST_CHECK, float(g.diagonal().sum())
    for depth in range(1, limit + 1):
        width = depth * block
        if depth == check or depth == limit:
            q, gq = basis[:, :width], images[:, :width]
            t = q.t() @ gq
            theta, y = torch.linalg.eigh((t + t.t()) / 2)
            theta, y = theta[-k:].flip(-1), y[:, -k:].flip(-1)
            ritz = q @ y
            residual = (gq @ y - ritz * theta).norm(dim=0)
            if float(residual.max()) <= START_TOL * float(theta[0]):
                return theta, ritz, True
            check += 2
        if depth == limit:
            break
        new = images[:, width - block:width].clone()
        for _ in range(2):
            new -= basis[:, :width] @ (basis[:, :width].t() @ new)
        q, r = torch.linalg.qr(new)
        if float(r.diagonal().abs().min()) <= 1e-12 * trace:
            break                                     # G has (numerically) no more directions
        basis[:, width:width + block] = q
        images[:, width:width + block] = g @ q
    lam, vec = torch.linalg.eigh(g)
    return lam[-k:].flip(-1), vec[:, -k:].flip(-1), False


def leading_components(m: torch.Tensor, k: int, gram: _WhitenedResidual | None = None, exact: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading k singular triplets (u [out, k], s [k], vh [k, in]) of a float64 matrix, from the
    leading eigenpairs of its smaller Gram matrix (m m^T or m^T m; `gram` if given;
    leading_eigenpairs, `exact` passed on): exact to float64 rounding for the leading components where that is a
    full eigendecomposition (they hold most of the energy, so squaring loses nothing there), to
    START_TOL where it is block Krylov. Each vh row's largest-magnitude entry is made positive,
    so the result does not depend on the routine's sign choice."""
    gram = _WhitenedResidual(m) if gram is None else gram
    tiny = torch.finfo(torch.float64).tiny
    lam, vec, _ = leading_eigenpairs(gram.g, k, exact)
    s = lam.clamp_min(0).sqrt()
    if gram.wide:
        u = vec
        vh = (u.t() @ m) / s.clamp_min(tiny)[:, None]
    else:
        vh = vec.t().contiguous()
        u = (m @ vh.t()) / s.clamp_min(tiny)
    sign = torch.sign(vh.gather(1, vh.abs().argmax(1, keepdim=True)))
    sign[sign == 0] = 1
    return u * sign.t(), s, vh * sign


def fit_quantized(err: torch.Tensor, h: torch.Tensor, rank: int, bits: int, *, group: int = 64,
                  word_bits: int = 64, damp: float = 1e-2, whiten: torch.Tensor | None = None,
                  precision: str = "float64", exact_starts: bool = False) -> QuantLowRank:
    """Greedy rank-`rank` compensator of `err` [out, in] with both factors at `bits` (see the module
    text); `h` is the calibration Gram X^T X [in, in], `whiten` its damped lower Cholesky factor
    (whitening_factor) where the caller has it. "float64": the reference arithmetic (the
    leading components of the whitened error, power iterations on the whitened residual; their
    start directions from block Krylov on large matrices, from a full eigendecomposition with
    `exact_starts`, which checks the former). "float32": _greedy32."""
    check_precision(precision)
    if not isinstance(err, torch.Tensor) or err.dim() != 2 or not err.is_floating_point():
        raise TypeError(f"error matrix must be a 2-D float tensor, not {getattr(err, 'dtype', type(err))}")
    out_f, in_f = err.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(out_f, in_f):
        raise ValueError(f"rank must be an integer in [1, {min(out_f, in_f)}], not {rank!r}")
    if tuple(h.shape) != (in_f, in_f):
        raise ValueError(f"Gram matrix has shape {tuple(h.shape)}, expected {(in_f, in_f)}")
    fmt_b, fmt_a = factor_format(bits, in_f, group, word_bits), factor_format(bits, out_f, group, word_bits)
    h = h.double()
    l = whitening_factor(h, damp) if whiten is None else whiten.double()
    if precision == "float32":
        return _greedy32(err, h, l, rank, fmt_b, fmt_a)
    err = err.double()
    m = _times_lower(err, l)                        # the whitened error M0 = E L
    # The leading fp16 components of the whitened error: their range fixes the exponents and each
    # greedy step's leading direction is found by power iteration started from the next one.
    gram = _WhitenedResidual(m, rank)
    u, s, vh = leading_components(m, rank, gram, exact_starts)
    lead_b = torch.linalg.solve_triangular(l.t(), vh[:1].t(), upper=True).t() * s[0].sqrt()
    exp_b, exp_a = _row_exponent(lead_b, fmt_b), _row_exponent((u[:, :1] * s[0].sqrt()).t(), fmt_a)
    m_starts = m @ vh.t() if gram.wide else None           # M0 times every start direction, at once
    b_mat = torch.empty(rank, in_f, dtype=torch.float64, device=err.device)     # the components so far
    b_rows, a_rows, gains = [], [], []
    for i in range(rank):
        a_i, c_i, b_i = gram.a[:, :i], gram.c[:, :i], b_mat[:i]
        if gram.wide:
            # w = M^T u / |M^T u| and |M w| = |M M^T u| / |M^T u|; b = L^-T w |M w|^1/2, where
            # L^-T M^T u = R^T u (M = R L, R = E - A B): no triangular solve
            u_i = gram.leading_left(m_starts[:, i] - a_i @ (c_i.t() @ vh[i]))
            gu = gram.g @ u_i
            mtu = max(float(u_i @ gu), 0.0) ** 0.5
            rtu = err.t() @ u_i - b_i.t() @ (a_i.t() @ u_i)
            b = rtu / max(mtu, 1e-300) * (float(gu.norm()) / max(mtu, 1e-300)) ** 0.5
        else:
            w, norm = gram.leading_right(vh[i])
            b = torch.linalg.solve_triangular(l.t(), w[:, None], upper=True)[:, 0] * norm ** 0.5
        b_q = _quantize_row(b, fmt_b, exp_b)
        b_hat = b_q.dequantize(torch.float64)[0]
        hb = h @ b_hat
        bhb = float(b_hat @ hb)
        rhb = err @ hb - a_i @ (b_i @ hb)                     # R H b
        a = rhb / bhb if bhb > 0 else torch.zeros(out_f, dtype=torch.float64, device=err.device)
        a_q = _quantize_row_symmetric(a, fmt_a, exp_a)
        a_hat = a_q.dequantize(torch.float64)[0]
        # tr(R H R^T) falls by 2 a^T R H b - |a|^2 b^T H b when R loses a b^T
        gains.append(2 * float(a_hat @ rhb) - float(a_hat @ a_hat) * bhb)
        b_mat[i] = b_hat
        gram.lose(a_hat, _times_lower(b_hat[None], l)[0])         # c = L^T b
        b_rows.append(b_q)
        a_rows.append(a_q)
    return QuantLowRank(_stack(b_rows, fmt_b), _stack(a_rows, fmt_a), torch.tensor(gains, dtype=torch.float32))


def symmetric_zero(bits: int) -> int:
    """The Q11.4 zero point of every A row: the middle of the code range, (2^b - 1) / 2."""
    return ((1 << bits) - 1) << (ZERO_FRAC_BITS - 1)


def rank_scales(At_q: QuantizedMatrix) -> torch.Tensor:
    """[r] float64 scale s_k of each stored A column (row k of A^T is s_k * (code - Z))."""
    if not (bool((At_q.scale == At_q.scale[:, :1]).all()) and bool((At_q.zero == symmetric_zero(At_q.fmt.bits)).all())):
        raise ValueError("A^T rows must have one scale per row and the mid-range zero (fit_quantized makes them)")
    return At_q.group_scale()[:, 0]


def ndp_rank_columns(rank: int) -> int:
    """Inputs of the NDP's A image: the stored rank padded to whole groups (of 32)."""
    return int8_factor_columns(rank)


def ndp_a_image(At_q: QuantizedMatrix) -> QuantizedMatrix:
    """A [out, roundup(r, 32)] as the NDP multiplies it: the codes of A^T transposed, unit scale
    mantissa, scale_exp 0 and the mid-range zero, so that one MATMUL computes
    sum_k (code[o, k] - Z) z_k; the host folds the per-rank scale into the intermediate
    (z_k = s_k (Bx)_k, rank_scales) before it re-quantizes it to int8. Columns past r hold code 0
    and meet z_k = 0."""
    rank_scales(At_q)                                     # checks the per-row symmetric form
    r, out = At_q.shape
    cols = ndp_rank_columns(r)
    fmt = QuantFormat(At_q.fmt.bits, largest_group(cols), At_q.fmt.word_bits)
    codes = torch.zeros(out, cols, dtype=torch.uint8)
    codes[:, :r] = At_q.codes.t()
    groups = fmt.groups(cols)
    return QuantizedMatrix(fmt, codes, torch.ones(out, groups, dtype=torch.int32),
                           torch.full((out, groups), symmetric_zero(fmt.bits), dtype=torch.int32), 0)


SUBSPACE_EXTRA = 16      # leading components of the whitened error the float32 greedy fit keeps beyond its rank


def _greedy32(err: torch.Tensor, h: torch.Tensor, l: torch.Tensor, rank: int, fmt_b: QuantFormat,
              fmt_a: QuantFormat) -> QuantLowRank:
    """fit_quantized's greedy steps in float32 without the whitened residual M = E L - A C^T
    (C = L^T B^T) ever formed: M's power iterations run on the leading rank + SUBSPACE_EXTRA
    components of E L (block Krylov, applying E and L in turn) with the quantized components so
    far subtracted exactly, and each step's norms and refit use E itself (R H b = E H b - A (B H b)).
    The error matrix is read about 50 times instead of about 400, with no full SVD. The greedy fit
    is chaotic on some matrices: on eight of SmolLM2's nine checked matrices the held-out objective
    stays within 0.007% of the float64 fit's, on one it moves 0.27% (`ndpmoe quant-bench
    --precision-check`), so the study keeps float64. The factors' rounding and the gains stay float64."""
    out_f, in_f = err.shape
    e32, l32, h32 = err.float(), l.float(), h.float()
    k = min(rank + SUBSPACE_EXTRA, out_f, in_f)
    if _krylov_is_cheaper(out_f, in_f, k):
        eb, lb = e32[None], l32[None]
        u, s, vh = (t[0].float() for t in block_krylov(lambda x: eb @ (lb @ x), lambda y: lb.mT @ (eb.mT @ y),
                                                        out_f, in_f, k))
    else:
        u, s, vh = torch.linalg.svd(e32 @ l32, full_matrices=False)
        u, s, vh = u[:, :k], s[:k], vh[:k]
    lead_b = torch.linalg.solve_triangular(l.t(), vh[:1].double().t(), upper=True).t() * float(s[0]) ** 0.5
    exp_b = _row_exponent(lead_b, fmt_b)
    exp_a = _row_exponent((u[:, :1].double() * float(s[0]) ** 0.5).t(), fmt_a)
    us = u * s
    a_cols = torch.zeros(out_f, rank)               # A, C = L^T B^T and B of the components so far
    c_cols = torch.zeros(in_f, rank)
    b_mat = torch.zeros(rank, in_f)
    b_rows, a_rows, gains = [], [], []
    for i in range(rank):
        a_i, c_i, b_i = a_cols[:, :i], c_cols[:, :i], b_mat[:i]
        w = vh[i] / vh[i].norm()
        for _ in range(POWER_ITERS):
            y = us @ (vh @ w) - a_i @ (c_i.t() @ w)
            w = vh.t() @ (us.t() @ y) - c_i @ (a_i.t() @ y)
            w = w / w.norm().clamp_min(1e-30)
        mw = e32 @ (l32 @ w) - a_i @ (c_i.t() @ w)
        b = torch.linalg.solve_triangular(l.t(), w.double()[:, None], upper=True)[:, 0] * float(mw.norm()) ** 0.5
        b_q = _quantize_row(b, fmt_b, exp_b)
        b_hat = b_q.dequantize(torch.float64)[0]
        hb = h32 @ b_hat.float()
        bhb = float(b_hat @ hb.double())
        rhb = (e32 @ hb - a_i @ (b_i @ hb)).double()
        a = rhb / bhb if bhb > 0 else torch.zeros(out_f, dtype=torch.float64)
        a_q = _quantize_row_symmetric(a, fmt_a, exp_a)
        a_hat = a_q.dequantize(torch.float64)[0]
        gains.append(2 * float(a_hat @ rhb) - float(a_hat @ a_hat) * bhb)
        a_cols[:, i], b_mat[i] = a_hat.float(), b_hat.float()
        c_cols[:, i] = b_hat.float() @ l32
        b_rows.append(b_q)
        a_rows.append(a_q)
    return QuantLowRank(_stack(b_rows, fmt_b), _stack(a_rows, fmt_a), torch.tensor(gains, dtype=torch.float32))


def fit_quantized_matrices(errs: dict[str, torch.Tensor], grams: dict[str, torch.Tensor], rank: int, bits: int, *,
                           group: int = 64, word_bits: int = 64, damp: float = 1e-2,
                           precision: str = "float64") -> dict[str, QuantLowRank]:
    """fit_quantized of each of an expert's matrices {name: error} with its Gram matrix {name: H},
    one whitening per Gram matrix (matrices that see the same inputs, w1 and w3, share the object
    and so the factor): in float64 the same factors, bit for bit, as fitting each alone."""
    whiten: dict[int, torch.Tensor] = {}
    out = {}
    for name, err in errs.items():
        h = grams[name]
        if id(h) not in whiten:
            whiten[id(h)] = whitening_factor(h.double(), damp)
        out[name] = fit_quantized(err, h, rank, bits, group=group, word_bits=word_bits, damp=damp,
                                  whiten=whiten[id(h)], precision=precision)
    return out


def objective(err: torch.Tensor, h: torch.Tensor, delta: torch.Tensor | None = None) -> float:
    """tr((E - D) H (E - D)^T): the calibration output-error energy left after compensation D."""
    r = err.double() if delta is None else err.double() - delta.double()
    return float(torch.einsum("oi,ij,oj->", r, h.double(), r))


def kept_reduction(err: torch.Tensor, h: torch.Tensor, quantized: LowRank, reference: LowRank) -> float:
    """The share of the reference (fp16) factors' error reduction that quantized factors keep, on the
    statistics `h` (pass held-out calibration statistics for an honest figure)."""
    base = objective(err, h)
    ref = base - objective(err, h, reference.delta())
    if ref <= 0:
        return math.nan
    return (base - objective(err, h, quantized.delta())) / ref


def rank_share(hidden: int, intermediate: int, fmt: QuantFormat, precision: str) -> float:
    """Bytes of one rank of factors for all three matrices (w1, w3 [I, D], w2 [D, I]) over the bytes
    of one expert in `fmt`: the regime line (small = the paper's regime, where ranks are cheap)."""
    bits = factor_bits(precision)
    rank = sum(bytes_per_rank(o, i, bits, fmt.group_size, fmt.word_bits)
               for o, i in ((intermediate, hidden), (intermediate, hidden), (hidden, intermediate)))
    expert = 2 * fmt.matrix_bytes(intermediate, hidden) + fmt.matrix_bytes(hidden, intermediate)
    return rank / expert
