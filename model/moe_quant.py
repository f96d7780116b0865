"""Golden model, layer 2: the quantized + compensated MoE block, computed in float.

Every expert matrix is low-bit; per (token, slot) a restoration decision says how much of the
expert's compensation to apply (a rank; 0 = none) or whether to use a higher-precision copy.
Top-n is one such decision: the n highest-weighted slots get full rank (slots are sorted by router
weight, see model.moe.route). n = 0 is plain low-bit, n = k compensates everything.

Legend: T tokens, D hidden, I expert intermediate, K top-k, N calibration tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .compensate import LowRank, fit_activation_aware, fit_svd, gram
from .contract import SUPPORTED_GROUPS, QuantFormat
from .moe import MoEWeights, RouterConfig, combine, route, shared_expert
from .qtensor import QuantizedMatrix
from .quantize import quantize_rtn

MATRICES = ("w1", "w3", "w2")
FULL_RANK = 1 << 30          # "all the rank that is stored"


@dataclass(eq=False)
class QuantizedExpert:
    """One expert's three low-bit matrices and their compensators (any may be absent)."""
    q: dict[str, QuantizedMatrix]
    comp: dict[str, LowRank] = field(default_factory=dict)
    _deq: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def weight(self, name: str) -> torch.Tensor:
        """Dequantized float weight, cached (the study reruns the same experts many times)."""
        if name not in self._deq:
            self._deq[name] = self.q[name].dequantize()
        return self._deq[name]

    def stored_rank(self, name: str) -> int:
        return self.comp[name].rank if name in self.comp else 0

    def linear(self, name: str, x: torch.Tensor, rank: int) -> torch.Tensor:
        y = x @ self.weight(name).t()
        r = min(rank, self.stored_rank(name))
        if r > 0:
            y = y + self.comp[name].truncate(r).apply(x)
        return y

    def forward(self, x: torch.Tensor, rank: int = 0) -> torch.Tensor:
        h = F.silu(self.linear("w1", x, rank)) * self.linear("w3", x, rank)
        return self.linear("w2", h, rank)

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.q.values())


@dataclass(eq=False)
class QuantizedMoE:
    """A whole MoE block in low-bit form (+ optional higher-precision copies of every expert)."""
    fmt: QuantFormat
    experts: list[QuantizedExpert]
    router: torch.Tensor
    cfg: RouterConfig
    float_weights: MoEWeights               # shared expert and reference
    hi_experts: list[QuantizedExpert] | None = None

    @property
    def num_experts(self) -> int:
        return len(self.experts)


def topn_restore(t: int, k: int, n: int) -> torch.Tensor:
    """The paper's rule: full rank on the n highest-weighted of the k slots. [T, K] int."""
    if not 0 <= n <= k:
        raise ValueError(f"n must be in [0, k = {k}], not {n}")
    r = torch.zeros(t, k, dtype=torch.long)
    r[:, :n] = FULL_RANK
    return r


def moe_forward_quant(x: torch.Tensor, qm: QuantizedMoE, restore: torch.Tensor | None = None,
                      hi: torch.Tensor | None = None, routing: tuple[torch.Tensor, torch.Tensor] | None = None
                      ) -> torch.Tensor:
    """x [T, D] -> [T, D]. restore [T, K] ranks (None: plain low-bit); hi [T, K] bool selects the
    higher-precision copy for that slot (no compensation there). routing overrides the router."""
    ids, weights = routing if routing is not None else route(x, qm.router, qm.cfg)
    t, k = ids.shape
    restore = torch.zeros(t, k, dtype=torch.long) if restore is None else restore
    hi = torch.zeros(t, k, dtype=torch.bool) if hi is None else hi
    if tuple(restore.shape) != (t, k) or tuple(hi.shape) != (t, k):
        raise ValueError(f"restore and hi must be [T, K] = {(t, k)}, not {tuple(restore.shape)}, {tuple(hi.shape)}")
    if hi.any() and qm.hi_experts is None:
        raise ValueError("hi-precision slots requested but the block has no higher-precision copies")
    xf = x.float()

    def expert_fn(e, xs, tok, slot):
        out = torch.empty(xs.shape[0], xs.shape[1])
        key = torch.where(hi[tok, slot], torch.full_like(tok, -1), restore[tok, slot].clamp(max=FULL_RANK))
        for variant in torch.unique(key).tolist():
            sel = key == variant
            ex = qm.hi_experts[e] if variant == -1 else qm.experts[e]
            out[sel] = ex.forward(xs[sel], 0 if variant == -1 else variant)
        return out

    return combine(xf, ids, weights, expert_fn) + shared_expert(xf, qm.float_weights)


# ---------------------------------------------------------------------------------------------
# Building a quantized block
# ---------------------------------------------------------------------------------------------
Quantizer = Callable[[torch.Tensor, QuantFormat, torch.Tensor | None], QuantizedMatrix]


def rtn(w: torch.Tensor, fmt: QuantFormat, h: torch.Tensor | None = None) -> QuantizedMatrix:
    return quantize_rtn(w, fmt)


def expert_grams(w: MoEWeights, cfg: RouterConfig, calib: torch.Tensor, mix: float = 0.1
                 ) -> list[dict[str, torch.Tensor]]:
    """Per expert, normalized Gram matrices of the inputs its matrices see on calibration tokens
    routed to it (w1/w3 see the block input, w2 the expert's hidden). A share `mix` of the
    all-token statistics keeps rarely-chosen experts well conditioned."""
    ids, _ = route(calib, w.router, cfg)
    h_all = gram(calib) / calib.shape[0]
    out = []
    for e in range(w.num_experts):
        xe = calib[(ids == e).any(-1)]
        if xe.shape[0] == 0:
            xe = calib
        hid = F.silu(xe @ w.w1[e].t().float()) * (xe @ w.w3[e].t().float())
        hx = (1 - mix) * gram(xe) / xe.shape[0] + mix * h_all
        out.append({"w1": hx, "w3": hx, "w2": gram(hid) / hid.shape[0]})
    return out


def check_block_fits(w: MoEWeights, fmt: QuantFormat, layer: int | None = None) -> None:
    """Refuse a block whose expert matrices `fmt` cannot hold, naming the layer, expert and matrix
    (the experts of a block are stacked, so they share shapes and the first one stands for all)."""
    for name in MATRICES:
        rows, n_in = getattr(w, name).shape[1:]
        try:
            fmt.check_in_features(n_in)
        except ValueError as err:
            fits = [g for g in SUPPORTED_GROUPS if n_in % g == 0]
            hint = (f"group sizes that divide {n_in}: {', '.join(map(str, fits))}" if fits else
                    f"no supported group size {SUPPORTED_GROUPS} divides {n_in}")
            where = "" if layer is None else f"layer {layer}, "
            raise ValueError(f"{where}expert 0, matrix {name} [{rows} x {n_in}] (every expert has this "
                             f"shape): {err} ({hint})") from None


def quantize_moe(w: MoEWeights, cfg: RouterConfig, fmt: QuantFormat, *, quantizer: Quantizer = rtn,
                 rank: int | dict = 0, fit: str = "aware", calib: torch.Tensor | None = None,
                 grams: list[dict[str, torch.Tensor]] | None = None) -> QuantizedMoE:
    """Quantize every expert; fit compensators of `rank` (an int, or {(e, name): rank} from a
    rank allocation) with `fit` in {"aware", "svd"}. Activation-aware fits and activation-aware
    quantizers need calibration inputs of the block (`calib` [N, D]) or precomputed `grams`."""
    _check_fit(fit)
    check_block_fits(w, fmt)
    if grams is None and calib is not None:
        grams = expert_grams(w, cfg, calib.float())
    if fit == "aware" and rank and grams is None:
        raise ValueError("activation-aware compensation needs calibration activations (calib)")
    experts = []
    for e in range(w.num_experts):
        q = {name: quantizer(getattr(w, name)[e].float(), fmt, grams[e][name] if grams is not None else None)
             for name in MATRICES}
        experts.append(QuantizedExpert(q))
    qm = QuantizedMoE(fmt, experts, w.router, cfg, w)
    return compensate_moe(qm, rank, fit, grams) if rank else qm


def compensate_moe(qm: QuantizedMoE, rank: int | dict, fit: str = "aware",
                   grams: list[dict[str, torch.Tensor]] | None = None) -> QuantizedMoE:
    """The same low-bit experts with compensators of `rank` fitted to their quantization error
    (the quantized matrices and their dequantized cache are shared, not copied)."""
    _check_fit(fit)
    if fit == "aware" and rank and grams is None:
        raise ValueError("activation-aware compensation needs calibration activations (grams)")
    w = qm.float_weights
    experts = []
    for e, ex in enumerate(qm.experts):
        comp = {}
        for name in MATRICES:
            r = rank.get((e, name), 0) if isinstance(rank, dict) else rank
            if r:
                err = getattr(w, name)[e].float() - ex.weight(name)
                comp[name] = fit_activation_aware(err, grams[e][name], r) if fit == "aware" else fit_svd(err, r)
        experts.append(QuantizedExpert(ex.q, comp, ex._deq))
    return QuantizedMoE(qm.fmt, experts, qm.router, qm.cfg, w, qm.hi_experts)


def _check_fit(fit: str) -> None:
    if fit not in ("aware", "svd"):
        raise ValueError(f"fit must be 'aware' or 'svd', not {fit!r}")
