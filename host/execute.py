"""Runs a LayerPlan: GPU work on a TorchGpuBackend, NDP work through an NdpDriver on any
NdpBackend (golden model here, RTL in co-simulation), weighted combine on the GPU.

Per expert task, in T_max-token chunks when the NDP takes part, the NDP descriptors are issued in
exactly the order `ExpertSizes.ndp_steps` models: LOAD x; w1, w3; B1, B3; LOAD B1x, A1;
LOAD B3x, A3; LOAD h; w2; B2; LOAD B2h, A2. Compensation at a per-token rank r_t below the task's
rank zeroes B x past r_t, which is exactly the rank-r_t prefix compensator.

Numerics: NDP products see per-token int8 activations (the host keeps the scale) and int8
factors; GPU products are float32 with the store's fp16 factors.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ndpmoe.model.moe_quant import MATRICES
from ndpmoe.model.ndp_golden import acc_to_float, quantize_activations

from .backends import TorchGpuBackend
from .cache import ExpertCache
from .ndp import IssuedDescriptor, NdpDriver
from .perf_model import weight_link_kind
from .plan import ExpertTask, LayerPlan
from .sizes import result_bytes
from .store import ExpertStore

_IDX = {"w1": "1", "w3": "3", "w2": "2"}


@dataclass
class ExecutionRecord:
    """What actually moved and ran (compare with the plan's modeled usage)."""
    link_bytes: Counter = field(default_factory=Counter)
    ndp_descriptors: list[IssuedDescriptor] = field(default_factory=list)
    unplanned_uploads: int = 0            # cached per the plan but absent on the device


class LayerExecutor:
    def __init__(self, store: ExpertStore, gpu: TorchGpuBackend, cache: ExpertCache, ndp: NdpDriver | None = None,
                 factor_cache: ExpertCache | None = None):
        self.store, self.gpu, self.cache, self.ndp = store, gpu, cache, ndp
        self.factor_cache = factor_cache
        self.sizes = store.sizes(ndp.config if ndp is not None else None)

    # -- NDP residency -------------------------------------------------------------------------
    def place_layer(self, layer: int) -> None:
        """Put a layer's images (low-bit, hi copies, int8 factors) in NDP memory, once."""
        if self.ndp is None:
            raise ValueError("no NDP driver to place images on")
        s = self.sizes
        for e in range(self.store.manifest.experts):
            for m in MATRICES:
                rows, n_in = s.shape(m)
                self.ndp.place((layer, e, m, "lo"), self.store.image(layer, e, m), s.fmt, rows, n_in)
                if s.hi_fmt is not None and s.hi_fmt.bits in self.ndp.config.bits:
                    self.ndp.place((layer, e, m, "hi"), self.store.image(layer, e, m, "hi"), s.hi_fmt, rows, n_in)
                if s.stored_rank:
                    a_img, b_img = self.store.factor_images(layer, e, m)
                    fa, fb = s.int8_factor_fmts(m)
                    self.ndp.place((layer, e, m, "A8"), a_img, fa, rows, s.padded_rank)
                    self.ndp.place((layer, e, m, "B8"), b_img, fb, s.stored_rank, n_in)

    # -- GPU data ------------------------------------------------------------------------------
    def _weights(self, layer: int, task: ExpertTask, rec: ExecutionRecord) -> dict[str, torch.Tensor]:
        key = (layer, task.expert, task.variant)
        held = self.gpu.get(key)
        if held is not None and all(m in held for m in MATRICES):
            return held
        if not task.fetch_weights:
            rec.unplanned_uploads += 1
        mats = {m: self.store.matrix(layer, task.expert, m, task.variant) for m in MATRICES}
        nbytes = sum(int(self.store.image(layer, task.expert, m, task.variant).numel()) for m in MATRICES)
        rec.link_bytes[weight_link_kind(task.variant)] += nbytes
        return self.gpu.put(key, {m: q.dequantize() for m, q in mats.items()}, weight_link_kind(task.variant), nbytes)

    def _factors(self, layer: int, task: ExpertTask, rec: ExecutionRecord) -> dict[str, torch.Tensor]:
        key, r = (layer, task.expert, "factors"), task.comp_rank
        held = self.gpu.get(key) or {}
        have = held["w1.A"].shape[1] if "w1.A" in held else 0
        if have >= r:
            return held
        if task.fetch_factor_ranks < r - have:
            rec.unplanned_uploads += 1
        new, nbytes = {}, 0
        for m in MATRICES:
            a, b = self.store.factors_fp16(layer, task.expert, m)
            a_inc, b_inc = a[:, have:r].contiguous(), b[have:r].contiguous()
            nbytes += a_inc.numel() * a_inc.element_size() + b_inc.numel() * b_inc.element_size()
            a_dev, b_dev = self.gpu.upload(a_inc.float()), self.gpu.upload(b_inc.float())
            new[f"{m}.A"] = torch.cat([held[f"{m}.A"], a_dev], 1) if have else a_dev
            new[f"{m}.B"] = torch.cat([held[f"{m}.B"], b_dev], 0) if have else b_dev
        rec.link_bytes["factors"] += nbytes
        self.gpu.moved_bytes["factors"] += nbytes
        self.gpu.resident[key] = new
        return new

    # -- the products --------------------------------------------------------------------------
    def _ndp_gemm(self, layer, task, m, t, x_scale) -> torch.Tensor:
        mat = self.ndp.resident((layer, task.expert, m, task.variant))
        acc = self.ndp.matmul(mat, t)
        return acc_to_float(acc, self.store.scale_exp(layer, task.expert, m, task.variant), x_scale)

    def _ndp_b(self, layer, task, m, t, x_scale, ranks) -> torch.Tensor:
        """B x on the NDP at the task's rank, zeroed past each token's own rank: [t, r]."""
        mat = self.ndp.resident((layer, task.expert, m, "B8"))
        b = acc_to_float(self.ndp.matmul(mat, t, task.comp_rank), self.store.scale_exp(layer, task.expert, m, "B8"), x_scale)
        keep = torch.arange(task.comp_rank)[None, :] < ranks[:, None]
        return b * keep

    def _ndp_a(self, layer, task, m, bx) -> torch.Tensor:
        pad = torch.zeros(bx.shape[0], self.sizes.padded_rank)
        pad[:, :bx.shape[1]] = bx
        b_q, b_scale = quantize_activations(pad)
        self.ndp.load(b_q)
        acc = self.ndp.matmul(self.ndp.resident((layer, task.expert, m, "A8")), bx.shape[0])
        return acc_to_float(acc, self.store.scale_exp(layer, task.expert, m, "A8"), b_scale)

    def _gpu_mm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.gpu.to_host(self.gpu.to_device(x) @ w.t())

    def _gpu_comp(self, f: dict[str, torch.Tensor], m: str, x: torch.Tensor, ranks: torch.Tensor, r: int) -> torch.Tensor:
        xd = self.gpu.to_device(x)
        bx = xd @ f[f"{m}.B"][:r].t()
        bx = bx * (torch.arange(r, device=xd.device)[None, :] < ranks[:, None].to(xd.device))
        return self.gpu.to_host(bx @ f[f"{m}.A"][:, :r].t())

    def _run_task(self, layer: int, task: ExpertTask, x: torch.Tensor, rec: ExecutionRecord) -> torch.Tensor:
        """Expert output [len(task.tokens), D] for the task's tokens."""
        gpu_w = self._weights(layer, task, rec) if task.gemm_unit == "gpu" else None
        gpu_f = self._factors(layer, task, rec) if task.comp_unit == "gpu" else None
        ndp_gemm, ndp_comp = task.gemm_unit == "ndp", task.comp_unit == "ndp"
        uses_ndp = ndp_gemm or ndp_comp
        if uses_ndp and self.ndp is None:
            raise ValueError(f"plan puts expert {task.expert} on the NDP but the executor has no NDP driver")
        r = task.comp_rank
        xs = x[list(task.tokens)]
        ranks_all = torch.tensor(task.ranks)
        step = self.ndp.config.t_max if uses_ndp else len(task.tokens)
        outs = []
        for start in range(0, len(task.tokens), step):
            xc, rc = xs[start:start + step], ranks_all[start:start + step]
            t = xc.shape[0]
            if uses_ndp:
                x_q, x_s = quantize_activations(xc)
                self.ndp.load(x_q)
            y = {}
            for m in ("w1", "w3"):
                y[m] = self._ndp_gemm(layer, task, m, t, x_s) if ndp_gemm else self._gpu_mm(xc, gpu_w[m])
            if r and ndp_comp:
                bx = {m: self._ndp_b(layer, task, m, t, x_s, rc) for m in ("w1", "w3")}
                for m in ("w1", "w3"):
                    y[m] = y[m] + self._ndp_a(layer, task, m, bx[m])
            elif r:
                for m in ("w1", "w3"):
                    y[m] = y[m] + self._gpu_comp(gpu_f, m, xc, rc, r)
            h = F.silu(y["w1"]) * y["w3"]
            if uses_ndp:
                h_q, h_s = quantize_activations(h)
                self.ndp.load(h_q)
            out = self._ndp_gemm(layer, task, "w2", t, h_s) if ndp_gemm else self._gpu_mm(h, gpu_w["w2"])
            if r and ndp_comp:
                out = out + self._ndp_a(layer, task, "w2", self._ndp_b(layer, task, "w2", t, h_s, rc))
            elif r:
                out = out + self._gpu_comp(gpu_f, "w2", h, rc, r)
            outs.append(out)
        return torch.cat(outs)

    def run(self, plan: LayerPlan, x: torch.Tensor, shared: Callable[[torch.Tensor], torch.Tensor] | None = None
            ) -> tuple[torch.Tensor, ExecutionRecord]:
        """x [T, D] -> (layer output [T, D] float32 on the host, what moved and ran)."""
        rec = ExecutionRecord()
        first = len(self.ndp.log) if self.ndp is not None else 0
        xf = x.float()
        out = torch.zeros_like(xf)
        for task in plan.tasks:
            y = self._run_task(plan.layer, task, xf, rec)
            w = torch.tensor([plan.weights[t][s] for t, s in zip(task.tokens, task.slots)])
            out.index_add_(0, torch.tensor(task.tokens), y.float() * w[:, None])
        if shared is not None:
            out = out + shared(xf)
        if self.ndp is not None:
            rec.ndp_descriptors = self.ndp.log[first:]
            rb = result_bytes(self.ndp.config)
            for d in rec.ndp_descriptors:
                rec.link_bytes["act_to_ndp"] += d.bytes_written
                rec.link_bytes["results_from_ndp"] += d.results * rb
        self._sync(plan, rec)
        return out, rec

    def _sync(self, plan: LayerPlan, rec: ExecutionRecord) -> None:
        """Mirror the cache: drop what it evicted, upload what it prefetched."""
        for key in plan.prefetches:
            nbytes = sum(int(self.store.image(key[0], key[1], m, key[2]).numel()) for m in MATRICES)
            mats = {m: self.store.matrix(key[0], key[1], m, key[2]).dequantize() for m in MATRICES}
            self.gpu.put(key, mats, "prefetch", nbytes)
            rec.link_bytes["prefetch"] += nbytes
        keep = set(self.cache.keys())
        if self.factor_cache is not None:
            keep |= set(self.factor_cache.keys())
        self.gpu.keep_only(keep)
