"""The float32 quantizers' elementwise work, as functions torch.compile fuses into single passes.

Eager PyTorch makes one pass over the weights per operation: an HQQ iteration is about ten, the
clipping search about eighty. Compiled, an HQQ iteration, the whole clipping search, the
encoding and the row check's operands are one pass each. `kernels(large)` hands out the compiled
versions for large stacks (compiling costs tens of seconds the first time in a process tree,
seconds once PyTorch's on-disk cache has them) and the same functions run eagerly otherwise, or
when compiling fails (no C++ compiler, say). NDPMOE_COMPILE=0 turns compiling off, =1 on for
every size.

Legend: E matrices, R rows, n groups per row, G group size, M = E * R * n groups, C candidates.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.fx.experimental._config as fx_config

# Sizes that happen to be equal in the first call (64 groups of 64) must not become one symbol.
fx_config.use_duck_shape = False

# Stacks smaller than this run eagerly: the compile would cost more than it saves.
COMPILE_MIN_ELEMENTS = 1 << 22


def hqq_step(w: torch.Tensor, t: torch.Tensor, inv: torch.Tensor, z: torch.Tensor, qmax: int):
    """The elementwise part of one HQQ iteration where the l_p shrinkage is zero (w [M, G],
    inv = 1 / scale [M, 1], t = w * inv, z [M, 1]): (q - t, |error|) [M, G], in the reference's
    operations. The means over each group are left to the caller: PyTorch's own reduction order
    then makes the result the reference's, bit for bit (a compiled sum would order the additions
    differently, and HQQ's choice between near-equal zeros follows such last-bit differences)."""
    q = torch.round(t + z).clamp(0, qmax)
    return q - t, (w - (q - z) / inv).abs()


def clip_search(wg: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, qmax: int):
    """The candidate (scale, zero) [C, E, R, n] with the smallest weighted squared error per group
    (wg [E, R, n, G], weight [E, 1, n, G]); the first candidate wins ties."""
    best_s, best_z = scales[0], zeros[0]
    best = _weighted_error(wg, best_s, best_z, weight, qmax)
    for c in range(1, scales.shape[0]):
        s, z = scales[c], zeros[c]
        err = _weighted_error(wg, s, z, weight, qmax)
        better = err < best
        best_s, best_z, best = torch.where(better, s, best_s), torch.where(better, z, best_z), torch.minimum(err, best)
    return best_s, best_z


def _weighted_error(wg, s, z, weight, qmax):
    q = torch.round(wg / s[..., None] + z[..., None]).clamp(0, qmax)
    return (((q - z[..., None]) * s[..., None] - wg) ** 2 * weight).sum(-1)


def encode_codes(wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int):
    """uint8 codes [E, R, n, G] of wg against fixed-point scales and zeros [E, R, n], and per group
    the distance of its closest element to a rounding tie, less float32's error bound: where that is
    negative float32 may round differently from float64 (a per-group reduction: a boolean mask
    per element would cost more than the codes)."""
    u = wg / s[..., None] + z[..., None]
    margin = ((u - torch.floor(u) - 0.5).abs() - 1e-5 * (u.abs() + 1)).amin(-1)
    return torch.round(u).clamp(0, qmax).to(torch.uint8), margin


def row_check_operands(wg, codes_r, s_r, z_r, codes_o, s_o, z_o):
    """(Q_r - Q_o, 2 W - Q_r - Q_o) as [E, R, n, G]: e_o H e_o^T - e_r H e_r^T = (Q_r - Q_o) H (2 W - Q_r - Q_o)^T."""
    w_r = (codes_r.float() - z_r[..., None]) * s_r[..., None]
    w_o = (codes_o.float() - z_o[..., None]) * s_o[..., None]
    return w_r - w_o, 2 * wg - w_r - w_o


def row_check_reduce(dh: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Rows [E, R] where the optimized candidate is worse than round-to-nearest."""
    return (dh * s).sum(-1) > 0


class _Kernels:
    def __init__(self, compiled: bool):
        self.compiled = compiled
        wrap = (lambda f: torch.compile(f, dynamic=True)) if compiled else (lambda f: f)
        self.hqq_step = wrap(hqq_step)
        self.clip_search = wrap(clip_search)
        self.encode_codes = wrap(encode_codes)
        self.row_check_operands = wrap(row_check_operands)
        self.row_check_reduce = wrap(row_check_reduce)


_EAGER = _Kernels(False)
_compiled: _Kernels | None = None
_compile_failed = False


def kernels(elements: int) -> _Kernels:
    """The compiled kernels for a stack of `elements` weights where that pays, else the eager ones."""
    global _compiled
    setting = os.environ.get("NDPMOE_COMPILE", "auto")
    want = setting == "1" or (setting == "auto" and elements >= COMPILE_MIN_ELEMENTS)
    if not want or _compile_failed or sys.platform == "win32":
        return _EAGER
    if _compiled is None:
        _compiled = _Kernels(True)
    return _compiled


def run(k: _Kernels, name: str, *args):
    """k.name(*args); a compiled kernel that fails to build falls back to eager, once, with a warning."""
    global _compile_failed
    try:
        return getattr(k, name)(*args)
    except Exception as exc:                 # a compiler missing or refusing: eager computes the same
        if not k.compiled:
            raise
        _compile_failed = True
        warnings.warn(f"torch.compile failed ({type(exc).__name__}: {str(exc)[:200]}); "
                      f"quantizing with eager kernels (set NDPMOE_COMPILE=0 to skip the attempt)")
        return getattr(_EAGER, name)(*args)
