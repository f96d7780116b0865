"""A small quantized MoE block and its store, shared by the host runtime tests (fixed seeds).

Legend: E experts, D hidden, I expert intermediate, K top-k, T tokens.
"""
from __future__ import annotations

import torch

from ndpmoe.host.store import open_store, write_store
from ndpmoe.model.contract import NdpConfig, QuantFormat
from ndpmoe.model.moe import MoEWeights, RouterConfig
from ndpmoe.model.moe_quant import expert_grams, quantize_moe

E, D, I, K, T = 6, 128, 64, 3, 12
RANK = 16
FMT = QuantFormat(3, 64, 128)
HI_FMT = QuantFormat(8, 64, 128)
# A small NDP build: T_max 4 so a 12-token layer runs in chunks; buffer large enough for D and I.
NDP_CFG = NdpConfig("host-test", word_bits=128, t_max=4, max_in_features=256, mem_bytes=1 << 22)


def block(seed: int = 0, layers: int = 1):
    g = torch.Generator().manual_seed(seed)
    cfg = RouterConfig(top_k=K)
    out = []
    for _ in range(layers):
        w = MoEWeights(torch.randn(E, D, generator=g) * 0.05, torch.randn(E, I, D, generator=g) * 0.1,
                       torch.randn(E, I, D, generator=g) * 0.1, torch.randn(E, D, I, generator=g) * 0.1)
        calib = torch.randn(256, D, generator=g)
        grams = expert_grams(w, cfg, calib)
        qm = quantize_moe(w, cfg, FMT, rank=RANK, grams=grams)
        qm.hi_experts = quantize_moe(w, cfg, HI_FMT).experts
        out.append((w, qm, grams))
    x = torch.randn(T, D, generator=g)
    return cfg, out, x


def make_store(path, seed: int = 0, layers: int = 1, source: str = "host-test-block", factor_bits=()):
    cfg, blocks, x = block(seed, layers)
    write_store(path, [qm for _, qm, _ in blocks], source=source, grams=[gr for _, _, gr in blocks],
                factor_bits=factor_bits)
    return cfg, blocks, x, open_store(path, expect_source=source)
