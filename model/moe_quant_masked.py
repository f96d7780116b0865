"""The quantized block of `moe_quant.moe_forward_quant`, computed all experts at once for the
study's perplexity runs (the reference stays the per-expert loop, which the bit-exact paths use).

Like `block.FloatMoE`'s masked path: every expert's low-bit weight runs on every token in three
big matmuls, unselected and higher-precision slots are zeroed by the gate, and only the restored
slots pay a per-expert loop for their low-rank corrections (w1/w3 before the nonlinearity, w2 after
it). With E / K = 2 (the default model) that is ~2x faster than gathering each expert's tokens.
Same result up to fp32 summation order.

Legend: T tokens, D hidden, E experts, I expert intermediate, K top-k.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .moe import shared_expert
from .moe_quant import FULL_RANK, QuantizedMoE


class MaskedQuantMoE:
    """Holds a block's dequantized weights stacked: w1/w3 [E*I, D], w2 [D, E*I]."""

    def __init__(self, qm: QuantizedMoE):
        self.qm = qm
        self.intermediate = qm.experts[0].q["w1"].rows
        self.w1 = torch.cat([ex.weight("w1") for ex in qm.experts])
        self.w3 = torch.cat([ex.weight("w3") for ex in qm.experts])
        self.w2 = torch.cat([ex.weight("w2") for ex in qm.experts], dim=1)

    def __call__(self, x: torch.Tensor, restore: torch.Tensor, hi: torch.Tensor,
                 routing: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [T, D]; restore [T, K] ranks; hi [T, K] bool; routing (ids, weights) [T, K]."""
        qm, size = self.qm, self.intermediate
        ids, weights = routing
        t = ids.shape[0]
        xf, weights = x.float(), weights.float()
        low = ~hi
        gate = torch.zeros(t, qm.num_experts).scatter_(1, ids, torch.where(low, weights, 0.0))
        a1, a3 = xf @ self.w1.t(), xf @ self.w3.t()                        # [T, E*I]
        fixes = []
        rest = (restore > 0) & low
        if rest.any():
            tok_all, slot_all = rest.nonzero(as_tuple=True)
            e_all = ids[tok_all, slot_all]
            r_all = restore[tok_all, slot_all].clamp(max=FULL_RANK)
            for e, r in torch.unique(torch.stack([e_all, r_all], 1), dim=0).tolist():
                sel = (e_all == e) & (r_all == r)
                tok, slot = tok_all[sel], slot_all[sel]          # a token picks an expert once
                cols = slice(e * size, (e + 1) * size)
                for name, a in (("w1", a1), ("w3", a3)):
                    f = self._factor(e, name, r)
                    if f is not None:
                        a[tok, cols] += f.apply(xf[tok])
                fixes.append((tok, slot, e, r))
        h = F.silu(a1) * a3
        out = (h.view(t, -1, size) * gate[:, :, None]).flatten(1) @ self.w2.t()
        for tok, slot, e, r in fixes:
            f = self._factor(e, "w2", r)
            if f is not None:
                out.index_add_(0, tok, f.apply(h[tok, e * size:(e + 1) * size]) * weights[tok, slot, None])
        if hi.any():
            tok_all, slot_all = hi.nonzero(as_tuple=True)
            e_all = ids[tok_all, slot_all]
            for e in torch.unique(e_all).tolist():
                sel = e_all == e
                tok, slot = tok_all[sel], slot_all[sel]
                out.index_add_(0, tok, qm.hi_experts[e].forward(xf[tok]) * weights[tok, slot, None])
        return out + shared_expert(xf, qm.float_weights)

    def _factor(self, e: int, name: str, rank: int):
        ex = self.qm.experts[e]
        r = min(rank, ex.stored_rank(name))
        return ex.comp[name].truncate(r) if r > 0 else None
