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


def _check_rank(err: torch.Tensor, rank: int) -> None:
    if not isinstance(err, torch.Tensor) or err.dim() != 2 or not err.is_floating_point():
        raise TypeError(f"error matrix must be a 2-D float tensor, not {getattr(err, 'dtype', type(err))}")
    limit = min(err.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= limit:
        raise ValueError(f"rank must be an integer in [0, min(out, in) = {limit}], not {rank!r}")
    if not torch.isfinite(err).all():
        raise ValueError("error matrix contains NaN or Inf")


def top_svd(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading `rank` singular triplets (u, s, vh). Large matrices with a small rank use a
    randomized range finder (Halko et al.; 4 power iterations, 16 extra columns), which on
    quantization errors matches the exact leading spectrum to well under 1%."""
    small = min(m.shape)
    if small > 1024 and rank <= small // 8:
        u, s, v = torch.svd_lowrank(m.float(), q=rank + 16, niter=4)
        return u[:, :rank].double(), s[:rank].double(), v[:, :rank].t().double()
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def fit_svd(err: torch.Tensor, rank: int) -> LowRank:
    """Plain truncated SVD of the quantization error."""
    _check_rank(err, rank)
    u, s, vh = top_svd(err, rank)
    root = s[:rank].sqrt()
    return LowRank((u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float(), (s[:rank] ** 2).float())


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
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for extra in (1.0, 10.0, 100.0):
        l, info = torch.linalg.cholesky_ex(h + extra * lam * eye)
        if int(info) == 0:
            return l
    raise ValueError("calibration Gram matrix is not positive definite even after damping")


def fit_activation_aware(err: torch.Tensor, h: torch.Tensor, rank: int, damp: float = 1e-2,
                         whiten: torch.Tensor | None = None) -> LowRank:
    """Rank-r A, B minimizing ||(err - A B) X^T||_F with H = X^T X (pass `whiten` to reuse L)."""
    _check_rank(err, rank)
    if tuple(h.shape) != (err.shape[1], err.shape[1]):
        raise ValueError(f"Gram matrix has shape {tuple(h.shape)}, expected {(err.shape[1],) * 2}")
    l = whitening_factor(h, damp) if whiten is None else whiten
    big = min(err.shape) > 1024
    u, s, vh = top_svd(err.float() @ l.float() if big else err.double() @ l, rank)
    root = s[:rank].sqrt()
    # B = S^1/2 V^T L^-1, solved rather than inverted: B^T = L^-T (V S^1/2).
    b = torch.linalg.solve_triangular(l.t(), (vh[:rank].t() * root), upper=True).t()
    return LowRank((u[:, :rank] * root).float(), b.float(), (s[:rank] ** 2).float())


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
