"""Low-rank compensators of quantization error: W - Q(W) ~= A @ B.

Both fits store the factors so that a prefix (A[:, :r], B[:r]) is itself the best rank-r
compensator of the same objective, so any rank up to the stored one can be sent without refitting:
- `fit_svd`: truncated SVD of the error (minimizes the weight-space Frobenius error);
- `fit_activation_aware`: minimizes ||(E - A B) X^T||_F over calibration activations X, by
  whitening with the Cholesky factor L of H = X^T X (+ damping): SVD of E L gives A = U S^1/2,
  B = S^1/2 V^T L^-1 (the LQER / QERA closed form).
`spectrum[i]` is the objective reduction of component i, which rank allocation uses as its gain.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .contract import INT8_FACTOR_ZERO, ZERO_FRAC_BITS, fp16_factor_bytes, int8_factor_columns, int8_factor_format
from .qtensor import QuantizedMatrix, to_fixed
from .quantize import check_precision, resolve_device


@dataclass(frozen=True, eq=False)
class LowRank:
    """Compensation factors A [out, r] and B [r, in] (float32), best-first components."""
    A: torch.Tensor
    B: torch.Tensor
    spectrum: torch.Tensor          # [r] objective reduction per component, non-increasing

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    @property
    def out_features(self) -> int:
        return self.A.shape[0]

    @property
    def in_features(self) -> int:
        return self.B.shape[1]

    def truncate(self, rank: int) -> "LowRank":
        if not 0 <= rank <= self.rank:
            raise ValueError(f"rank must be in [0, {self.rank}], not {rank}")
        return LowRank(self.A[:, :rank], self.B[:rank], self.spectrum[:rank])

    def delta(self) -> torch.Tensor:
        return self.A @ self.B

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] -> A (B x) as [T, out]."""
        return (x @ self.B.t()) @ self.A.t()

    def nbytes_fp16(self, rank: int | None = None) -> int:
        return fp16_factor_bytes(self.out_features, self.in_features, self.rank if rank is None else rank)


def _check_rank(err: torch.Tensor, rank: int, dims: int = 2) -> None:
    if not isinstance(err, torch.Tensor) or err.dim() != dims or not err.is_floating_point():
        what = "a 2-D float tensor" if dims == 2 else "a 3-D float tensor [E, out, in]"
        raise TypeError(f"error matrix must be {what}, not {getattr(err, 'dtype', type(err))} "
                        f"of shape {tuple(getattr(err, 'shape', ()))}")
    limit = min(err.shape[-2:])
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= limit:
        raise ValueError(f"rank must be an integer in [0, min(out, in) = {limit}], not {rank!r}")
    if not torch.isfinite(err).all():
        raise ValueError("error matrix contains NaN or Inf")


# ---------------------------------------------------------------------------------------------
# Leading singular triplets
# ---------------------------------------------------------------------------------------------
KRYLOV_EXTRA = 16        # block width = rank + KRYLOV_EXTRA
KRYLOV_DEPTH = 6         # blocks after the first: 2 * depth + 2 products with the matrix


def block_krylov(apply, apply_t, rows: int, cols: int, rank: int, *, extra: int = KRYLOV_EXTRA,
                 depth: int = KRYLOV_DEPTH, dtype=torch.float32, device=None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading `rank` singular triplets of a stack of matrices M [E, rows, cols] known only
    through apply(X) = M X and apply_t(Y) = M^T Y, by randomized block Krylov iteration (Musco &
    Musco 2015): the span of M O, (M M^T) M O, ..., (M M^T)^depth M O for one Gaussian block O.
    Quantization errors have flat spectra, where this converges much faster than subspace
    iteration: on SmolLM2's real errors it keeps >= 99.9% of the exact rank-16/32 energy (a test
    holds >= 99.5%). O is drawn from a fixed seed and is the same for every matrix, so a matrix's
    result does not depend on the stack it came in. Returns float64 (u [E, rows, r], s [E, r],
    vh [E, r, cols])."""
    width = min(rank + extra, rows, cols)
    g = torch.Generator(device=device).manual_seed(0)
    omega = torch.randn(cols, width, generator=g, dtype=dtype, device=device)
    y = apply(omega)
    basis = torch.linalg.qr(y)[0]
    last = basis
    for _ in range(depth):
        y = apply(apply_t(last))
        for _ in range(2):            # block Gram-Schmidt against everything so far, twice
            y = y - basis @ (basis.mT @ y)
        last = torch.linalg.qr(y)[0]
        basis = torch.cat([basis, last], -1)
    # Q^T M = (M^T Q)^T = U~ S V~^T is small (K x cols): U~ and S^2 from the eigenvectors of its
    # K x K Gram matrix in float64 (only the leading, well separated, components are kept), then
    # V~ = (Q^T M)^T U~ S^-1.
    bt = apply_t(basis).double()                                     # [E, cols, K]
    lam, vecs = torch.linalg.eigh(bt.mT @ bt)                        # ascending
    top = vecs[..., -rank:].flip(-1) if rank else vecs[..., :0]
    s = lam[..., -rank:].flip(-1).clamp_min(0).sqrt() if rank else lam[..., :0]
    v = (bt @ top) / s.clamp_min(torch.finfo(torch.float64).tiny)[..., None, :]
    return basis.double() @ top, s, v.mT


def _krylov_is_cheaper(rows: int, cols: int, rank: int) -> bool:
    """A Krylov space as wide as half the smaller side saves nothing over an exact SVD."""
    return min(rows, cols) > 2 * (rank + KRYLOV_EXTRA) * (KRYLOV_DEPTH + 1)


def top_svd(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading `rank` singular triplets (u, s, vh) of one matrix, in float64. Large matrices
    with a small rank go through block Krylov in float32 (see block_krylov), the rest through an
    exact float64 SVD."""
    small = min(m.shape)
    if small > 1024 and rank <= small // 8:
        mf = m.float()[None]
        u, s, vh = block_krylov(lambda x: mf @ x, lambda y: mf.mT @ y, *m.shape, rank, device=m.device)
        return u[0], s[0], vh[0]
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def _lowrank(u, s, vh_or_b, rank, b_given=False) -> LowRank:
    root = s[:rank].sqrt()
    b = vh_or_b if b_given else root[:, None] * vh_or_b[:rank]
    return LowRank((u[:, :rank] * root).float().cpu(), b.float().cpu(), (s[:rank] ** 2).float().cpu())


def fit_svd(err: torch.Tensor, rank: int) -> LowRank:
    """Plain truncated SVD of the quantization error."""
    _check_rank(err, rank)
    u, s, vh = top_svd(err, rank)
    return _lowrank(u, s, vh, rank)


def fit_svd_stack(err: torch.Tensor, rank: int, *, precision: str = "float32", device=None) -> list[LowRank]:
    """fit_svd of every matrix of err [E, out, in]. "float64": the single-matrix arithmetic;
    "float32": SVD (exact or block Krylov, whichever is cheaper) in float32."""
    _check_rank(err, rank, dims=3)
    check_precision(precision)
    dev = resolve_device(device, err.device)
    out = []
    for part in _chunks(err, dev):
        if precision == "float64":
            out += [fit_svd(m, rank) for m in part]
            continue
        m = part.float()
        if _krylov_is_cheaper(m.shape[1], m.shape[2], rank):
            u, s, vh = block_krylov(lambda x: m @ x, lambda y: m.mT @ y, m.shape[1], m.shape[2], rank, device=dev)
        else:
            u, s, vh = torch.linalg.svd(m, full_matrices=False)
        out += [_lowrank(u[e], s[e], vh[e], rank) for e in range(m.shape[0])]
    return out


def _chunks(t: torch.Tensor, device: torch.device, per_elements: int = 1 << 26):
    step = max(1, per_elements // (t.shape[-2] * t.shape[-1]))
    for i in range(0, t.shape[0], step):
        yield t[i:i + step].to(device)


def gram(x: torch.Tensor) -> torch.Tensor:
    """H = X^T X in float64 from calibration activations x [N, in]."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise TypeError(f"calibration activations must be a 2-D tensor [N, in], not {tuple(getattr(x, 'shape', ()))}")
    x = x.double()
    return x.t() @ x


def whitening_factor(h: torch.Tensor, damp: float = 1e-2) -> torch.Tensor:
    """Lower Cholesky factor L of H + damp * mean(diag H) * I (the damping keeps it invertible)."""
    h = h.double()
    lam = damp * float(h.diagonal().mean().clamp_min(1e-12))
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for extra in (1.0, 10.0, 100.0):
        l, info = torch.linalg.cholesky_ex(h + extra * lam * eye)
        if int(info) == 0:
            return l
    raise ValueError("calibration Gram matrix is not positive definite even after damping")


def whitening_factors(h: torch.Tensor, damp: float = 1e-2, device=None) -> torch.Tensor:
    """whitening_factor of every Gram matrix of h [E, in, in], float64 [E, in, in] on `device`
    (Cholesky and the triangular solve stay in float64: they set how well B is resolved)."""
    if not isinstance(h, torch.Tensor) or h.dim() != 3 or h.shape[1] != h.shape[2]:
        raise TypeError(f"Gram stack must be a 3-D tensor [E, in, in], not {tuple(getattr(h, 'shape', ()))}")
    dev = resolve_device(device, h.device)
    return torch.stack([whitening_factor(h[e].to(dev), damp) for e in range(h.shape[0])])


def fit_activation_aware(err: torch.Tensor, h: torch.Tensor, rank: int, damp: float = 1e-2,
                         whiten: torch.Tensor | None = None) -> LowRank:
    """Rank-r A, B minimizing ||(err - A B) X^T||_F with H = X^T X (pass `whiten` to reuse L)."""
    _check_rank(err, rank)
    if tuple(h.shape) != (err.shape[1], err.shape[1]):
        raise ValueError(f"Gram matrix has shape {tuple(h.shape)}, expected {(err.shape[1],) * 2}")
    return _aware_one(err, whitening_factor(h, damp) if whiten is None else whiten, rank)


def fit_activation_aware_stack(err: torch.Tensor, h: torch.Tensor | None, rank: int, *, damp: float = 1e-2,
                               whiten: torch.Tensor | None = None, precision: str = "float32",
                               device=None) -> list[LowRank]:
    """fit_activation_aware of every matrix of err [E, out, in] with its Gram matrix h [E, in, in]
    (or its whitening factors `whiten`, to reuse them across bit widths and matrices that see the
    same inputs). "float32": M = err L is never formed for large matrices: given h, block Krylov on
    M M^T = err H' err^T needs neither a Cholesky factor nor a triangular solve (_aware_from_gram);
    given `whiten`, it applies err and L in turn."""
    _check_rank(err, rank, dims=3)
    check_precision(precision)
    n_in = err.shape[2]
    src = whiten if whiten is not None else h
    if src is None or tuple(src.shape) != (err.shape[0], n_in, n_in):
        raise ValueError(f"Gram matrices / whitening factors have shape "
                         f"{None if src is None else tuple(src.shape)}, expected {(err.shape[0], n_in, n_in)}")
    dev = resolve_device(device, err.device)
    out = []
    rows = err.shape[1]
    from_gram = precision == "float32" and whiten is None and _krylov_is_cheaper(rows, n_in, rank)
    step = max(1, (1 << 26) // (err.shape[1] * n_in + n_in * n_in))
    for i in range(0, err.shape[0], step):
        part = err[i:i + step].to(dev)
        if from_gram:
            # On the CPU one matrix at a time: each Krylov block then reuses one H' from cache (a
            # stack of 8 OLMoE experts ran 30% slower per matrix than one by one)
            one = 1 if dev.type == "cpu" else part.shape[0]
            for j in range(0, part.shape[0], one):
                out += _aware_from_gram(part[j:j + one].float(), h[i + j:i + j + one].to(dev), rank, damp)
            continue
        l = (whiten[i:i + step].to(dev).double() if whiten is not None
             else whitening_factors(h[i:i + step], damp, dev))
        if precision == "float64":
            out += [_aware_one(part[e], l[e], rank) for e in range(part.shape[0])]
            continue
        m, l32 = part.float(), l.float()
        if _krylov_is_cheaper(rows, n_in, rank):
            u, s, vh = block_krylov(lambda x: m @ (l32 @ x), lambda y: l32.mT @ (m.mT @ y), rows, n_in, rank,
                                    device=dev)
        else:
            u, s, vh = (t.double() for t in torch.linalg.svd(m @ l32, full_matrices=False))
        root = s[..., :rank].sqrt()
        b = torch.linalg.solve_triangular(l.mT, vh[..., :rank, :].mT * root[..., None, :], upper=True).mT
        out += [_lowrank(u[e], s[e], b[e], rank, b_given=True) for e in range(m.shape[0])]
    return out


def _aware_from_gram(e: torch.Tensor, h: torch.Tensor, rank: int, damp: float) -> list[LowRank]:
    """The activation-aware fit of float32 errors e [E, out, in] from the Gram matrices h alone,
    with no Cholesky factor and no triangular solve: for M = E L with L L^T = H' = H + damping,
    M M^T = E H' E^T, so block Krylov on it gives M's leading left singular vectors U and values S,
    and B = S^1/2 V^T L^-1 = S^-1/2 U^T M L^-1 = S^-1/2 U^T E (the same factors as the whitened
    fit, with H' damped as whitening_factor damps it on its first, normally only, try). Each Krylov
    block's E^T Q and H' E^T Q are kept, so the Rayleigh-Ritz step costs one more block, not all."""
    lam = damp * h.diagonal(dim1=-2, dim2=-1).double().mean(-1).clamp_min(1e-12)
    h32 = h.float().clone()
    h32.diagonal(dim1=-2, dim2=-1).add_(lam.float()[:, None])
    rows, cols = e.shape[1:]
    width = min(rank + KRYLOV_EXTRA, rows, cols)
    g = torch.Generator(device=e.device).manual_seed(0)
    omega = torch.randn(cols, width, generator=g, dtype=torch.float32, device=e.device)
    last = torch.linalg.qr(e @ (h32 @ omega))[0]           # = M (L^T omega): a random block in M's range
    basis, z, hz = last, [], []
    for _ in range(KRYLOV_DEPTH):
        z.append(e.mT @ last)
        hz.append(h32 @ z[-1])
        y = e @ hz[-1]                                     # (M M^T) last
        for _ in range(2):
            y = y - basis @ (basis.mT @ y)
        last = torch.linalg.qr(y)[0]
        basis = torch.cat([basis, last], -1)
    z.append(e.mT @ last)
    hz.append(h32 @ z[-1])
    z, hz = torch.cat(z, -1).double(), torch.cat(hz, -1).double()      # E^T Q and H' E^T Q [E, in, K]
    t = z.mT @ hz                                                       # Q^T M M^T Q
    lam_k, vecs = torch.linalg.eigh(0.5 * (t + t.mT))                   # ascending
    top = vecs[..., -rank:].flip(-1) if rank else vecs[..., :0]
    s = lam_k[..., -rank:].flip(-1).clamp_min(0).sqrt() if rank else lam_k[..., :0]   # singular values of M
    u = basis.double() @ top
    b = (top.mT @ z.mT) / s.clamp_min(torch.finfo(torch.float64).tiny).sqrt()[..., None]
    return [_lowrank(u[i], s[i], b[i], rank, b_given=True) for i in range(e.shape[0])]


def _aware_one(err: torch.Tensor, l: torch.Tensor, rank: int) -> LowRank:
    """fit_activation_aware with the whitening factor L given (the reference arithmetic)."""
    big = min(err.shape) > 1024
    u, s, vh = top_svd(err.float() @ l.float() if big else err.double() @ l, rank)
    root = s[:rank].sqrt()
    # B = S^1/2 V^T L^-1, solved rather than inverted: B^T = L^-T (V S^1/2).
    b = torch.linalg.solve_triangular(l.t(), (vh[:rank].t() * root), upper=True).t()
    return _lowrank(u, s, b, rank, b_given=True)


# ---------------------------------------------------------------------------------------------
# int8 storage of the factors for the NDP (the same 8-bit format the unit streams)
# ---------------------------------------------------------------------------------------------
def quantize_int8_symmetric(w: torch.Tensor, word_bits: int = 128) -> QuantizedMatrix:
    """Symmetric int8 per group, as unsigned codes with zero 128 (so the NDP datapath runs it).
    Columns are zero-padded to whole groups first (A has only `rank` columns)."""
    fmt = int8_factor_format(w.shape[1], word_bits)
    w = torch.nn.functional.pad(w.double(), (0, int8_factor_columns(w.shape[1]) - w.shape[1]))
    wg = w.reshape(w.shape[0], -1, fmt.group_size)
    amax = wg.abs().amax(-1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    mant, _, exp = to_fixed(scale, torch.zeros_like(scale))
    s = mant.double() * 2.0 ** -exp
    codes = (torch.round(wg / s[..., None]).clamp(-127, 127) + INT8_FACTOR_ZERO).to(torch.uint8)
    zero = torch.full_like(mant, INT8_FACTOR_ZERO << ZERO_FRAC_BITS)
    return QuantizedMatrix(fmt, codes.reshape(w.shape), mant, zero, exp)


@dataclass(frozen=True, eq=False)
class Int8LowRank:
    """Factors as the NDP holds them: A_q [out, roundup(r, 32)] and B_q [r, in], int8 symmetric."""
    A_q: QuantizedMatrix
    B_q: QuantizedMatrix
    rank: int

    @classmethod
    def from_lowrank(cls, f: LowRank, word_bits: int = 128) -> "Int8LowRank":
        if f.rank == 0:
            raise ValueError("cannot store a rank-0 compensator")
        return cls(quantize_int8_symmetric(f.A, word_bits), quantize_int8_symmetric(f.B, word_bits), f.rank)

    @property
    def nbytes(self) -> int:
        return self.A_q.nbytes + self.B_q.nbytes

    def dequantize(self) -> LowRank:
        a = self.A_q.dequantize()[:, :self.rank]
        b = self.B_q.dequantize()
        return LowRank(a, b, torch.zeros(self.rank))
