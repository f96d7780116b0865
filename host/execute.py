"""Runs a LayerPlan: GPU work on a TorchGpuBackend, NDP work through an NdpDriver on any
NdpBackend (golden model here, RTL in co-simulation), weighted combine on the GPU.

When the NDP takes part in an expert task, the executor walks the steps `ExpertSizes.ndp_steps`
yields (the sequence the cost model prices: per T_max-token chunk LOAD x; w1, w3; B1, B3;
LOAD B1x, A1; LOAD B3x, A3; LOAD h; w2; B2; LOAD B2h, A2) and has the driver issue each step's
descriptor, refused when the data does not make exactly that descriptor. The GPU's share of a
chunk runs on its input (x, or h once the steps before LOAD h have run). Compensation at a
per-token rank r_t below the task's rank zeroes B x past r_t, which is exactly the rank-r_t
prefix compensator.

Numerics: NDP products see per-token int8 activations (the host keeps the scale). Compensators
at factor precision fp16 (the default): the GPU applies the store's fp16 factors, the NDP the int8
ones. At int8 / int4 / int3 both units read the store's packed low-bit factors: the GPU fetches
rows of the B and A^T images (the bytes ExpertSizes.gpu_rank_bytes counts) and dequantizes them;
the NDP multiplies the B rows and the transposed A image, with the intermediate B x scaled per
rank and re-quantized to int8 as model/ndp_golden.ndp_compensation defines.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ndpmoe.model.moe_quant import MATRICES
from ndpmoe.model.factor_quant import rank_scales
from ndpmoe.model.ndp_golden import acc_to_float, quantize_activations

from .backends import TorchGpuBackend
from .cache import ExpertCache
from .ndp import IssuedDescriptor, NdpDriver
from .perf_model import weight_link_kind
from .plan import ExpertTask, LayerPlan
from .sizes import STEP_KINDS, NdpStep, result_bytes
from .store import ExpertStore


@dataclass
class ExecutionRecord:
    """What actually moved and ran (compare with the plan's modeled usage)."""
    link_bytes: Counter = field(default_factory=Counter)
    ndp_descriptors: list[IssuedDescriptor] = field(default_factory=list)
    unplanned_uploads: int = 0            # cached per the plan but absent on the device
    fetches: int = 0                      # weight and factor fetches (each a miss of the device)
    staged_fetches: int = 0               # of those, found staged by the next-layer prefetch


class LayerExecutor:
    def __init__(self, store: ExpertStore, gpu: TorchGpuBackend, cache: ExpertCache, ndp: NdpDriver | None = None,
                 factor_cache: ExpertCache | None = None, factor_precision: str = "fp16"):
        self.store, self.gpu, self.cache, self.ndp = store, gpu, cache, ndp
        self.factor_cache = factor_cache
        self.sizes = store.sizes(ndp.config if ndp is not None else None, factor_precision)
        self.factor_precision = factor_precision
        self.prefetcher = None                # a NextLayerPrefetcher (host/prefetch.py) may stage fetches
        bits = self.sizes.factor_bits
        self._a_slot, self._b_slot = ("A8", "B8") if bits is None else (f"Aq{bits}", f"Bq{bits}")
        self._rank_scales: dict[tuple, torch.Tensor] = {}

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
                    a_img, b_img = self.store.ndp_factor_images(layer, e, m, self.factor_precision)
                    fa, fb = s.ndp_factor_fmts(m)
                    self.ndp.place((layer, e, m, self._a_slot), a_img, fa, rows, s.padded_rank)
                    self.ndp.place((layer, e, m, self._b_slot), b_img, fb, s.stored_rank, n_in)

    # -- GPU data ------------------------------------------------------------------------------
    def load_weights(self, layer: int, expert: int, variant: str) -> tuple[dict[str, torch.Tensor], int]:
        """What a weight fetch moves: the unpacked host matrices and the packed bytes they cost."""
        mats = {m: self.store.matrix(layer, expert, m, variant) for m in MATRICES}
        nbytes = sum(int(self.store.image(layer, expert, m, variant).numel()) for m in MATRICES)
        return {m: q.dequantize() for m, q in mats.items()}, nbytes

    def load_factors(self, layer: int, expert: int, have: int, r: int) -> tuple[dict[str, torch.Tensor], int]:
        """What a factor fetch of ranks [have, r) moves: host float increments {m.A: [out, r - have],
        m.B: [r - have, in]} and their bytes over the link."""
        out, nbytes = {}, 0
        for m in MATRICES:
            if self.sizes.factor_bits is None:
                a, b = self.store.factors_fp16(layer, expert, m)
                a_inc, b_inc = a[:, have:r].contiguous(), b[have:r].contiguous()
                nbytes += a_inc.numel() * a_inc.element_size() + b_inc.numel() * b_inc.element_size()
            else:                        # rows [have, r) of the packed B and A^T images, dequantized
                b_rows, at_rows, moved = self.store.packed_factor_rows(layer, expert, m, self.factor_precision, have, r)
                a_inc, b_inc = at_rows.dequantize().t().contiguous(), b_rows.dequantize()
                nbytes += moved
            out[f"{m}.A"], out[f"{m}.B"] = a_inc.float(), b_inc.float()
        return out, nbytes

    def _weights(self, layer: int, task: ExpertTask, rec: ExecutionRecord) -> dict[str, torch.Tensor]:
        key = (layer, task.expert, task.variant)
        held = self.gpu.get(key)
        if held is not None and all(m in held for m in MATRICES):
            return held
        if not task.fetch_weights:
            rec.unplanned_uploads += 1
        kind = weight_link_kind(task.variant)
        rec.fetches += 1
        staged = self.prefetcher.take_weights(*key) if self.prefetcher is not None else None
        if staged is not None:                # moved earlier, on the side stream: same bytes, same values
            rec.staged_fetches += 1
            dev, nbytes = staged
            rec.link_bytes[kind] += nbytes
            return self.gpu.adopt(key, dev, kind, nbytes)
        host, nbytes = self.load_weights(*key)
        rec.link_bytes[kind] += nbytes
        return self.gpu.put(key, host, kind, nbytes)

    def _factors(self, layer: int, task: ExpertTask, rec: ExecutionRecord) -> dict[str, torch.Tensor]:
        key, r = (layer, task.expert, "factors"), task.comp_rank
        held = self.gpu.get(key) or {}
        have = held["w1.A"].shape[1] if "w1.A" in held else 0
        if have >= r:
            return held
        if task.fetch_factor_ranks < r - have:
            rec.unplanned_uploads += 1
        rec.fetches += 1
        staged = self.prefetcher.take_factors(layer, task.expert, have, r) if self.prefetcher is not None else None
        if staged is not None:
            rec.staged_fetches += 1
            inc, nbytes = staged
        else:
            host, nbytes = self.load_factors(layer, task.expert, have, r)
            inc = {k: self.gpu.upload(v) for k, v in host.items()}
        new = {}
        for m in MATRICES:
            a_dev, b_dev = inc[f"{m}.A"], inc[f"{m}.B"]
            new[f"{m}.A"] = torch.cat([held[f"{m}.A"], a_dev], 1) if have else a_dev
            new[f"{m}.B"] = torch.cat([held[f"{m}.B"], b_dev], 0) if have else b_dev
        rec.link_bytes["factors"] += nbytes
        self.gpu.moved_bytes["factors"] += nbytes
        self.gpu.resident[key] = new
        return new

    def _rank_scale(self, layer: int, expert: int, m: str) -> torch.Tensor:
        """float32 [R] scale of each A column of the packed factors (the host folds it into B x)."""
        key = (layer, expert, m)
        if key not in self._rank_scales:
            at = self.store.packed_factor_rows(layer, expert, m, self.factor_precision, 0, self.sizes.stored_rank)[1]
            self._rank_scales[key] = rank_scales(at).float()
        return self._rank_scales[key]

    # -- the products --------------------------------------------------------------------------
    def _ndp_product(self, layer: int, task: ExpertTask, m: str, slot: str, step: NdpStep,
                     x_scale: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """MATMUL of the first `rows` rows (all when None) of resident image (m, slot) against the
        loaded activations of x_scale's tokens, which must be the step's: [t, rows]."""
        mat = self.ndp.resident((layer, task.expert, m, slot))
        acc = self.ndp.matmul(mat, x_scale.shape[0], rows, step=step.descriptor)
        return acc_to_float(acc, self.store.scale_exp(layer, task.expert, m, slot), x_scale)

    def _ndp_load(self, x: torch.Tensor, step: NdpStep) -> torch.Tensor:
        """LOAD_ACT of x [t, n] as per-token int8; returns the scales the host keeps."""
        x_q, x_scale = quantize_activations(x)
        self.ndp.load(x_q, step=step.descriptor)
        return x_scale

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
        if (ndp_gemm or ndp_comp) and self.ndp is None:
            raise ValueError(f"plan puts expert {task.expert} on the NDP but the executor has no NDP driver")
        xs = x[list(task.tokens)]
        ranks = torch.tensor(task.ranks)
        steps = self.sizes.ndp_steps(task.variant, len(task.tokens), ndp_gemm,
                                     task.comp_rank if ndp_comp else 0) if ndp_gemm or ndp_comp else []
        chunks: dict[int, list[NdpStep]] = {}
        for step in steps:
            chunks.setdefault(step.start, []).append(step)
        if not chunks:                                        # all on the GPU: one chunk, no steps
            chunks = {0: []}
        outs = []
        for start, chunk in chunks.items():
            t = chunk[0].descriptor.tokens if chunk else len(task.tokens)
            outs.append(self._run_chunk(layer, task, chunk, xs[start:start + t], ranks[start:start + t],
                                        gpu_w, gpu_f))
        return torch.cat(outs)

    def _run_chunk(self, layer: int, task: ExpertTask, steps: list[NdpStep], x: torch.Tensor, ranks: torch.Tensor,
                   gpu_w: dict | None, gpu_f: dict | None) -> torch.Tensor:
        """One chunk of a task: the NDP steps in their order, the GPU's share on x and on h."""
        r = task.comp_rank
        y: dict[str, torch.Tensor] = {}                       # each matrix's output, summed over its products

        def add(m: str, value: torch.Tensor) -> None:
            y[m] = y[m] + value if m in y else value

        def gpu_share(inp: torch.Tensor, mats: tuple[str, ...]) -> None:
            for m in mats:
                if gpu_w is not None:
                    add(m, self._gpu_mm(inp, gpu_w[m]))
                if gpu_f is not None and r:
                    add(m, self._gpu_comp(gpu_f, m, inp, ranks, r))

        def hidden() -> torch.Tensor:
            h = F.silu(y["w1"]) * y["w3"]
            gpu_share(h, ("w2",))
            return h

        gpu_share(x, ("w1", "w3"))
        h = None
        x_scale = None                                        # host scales of what the NDP buffer holds
        bx: dict[str, torch.Tensor] = {}
        for step in steps:
            m = step.matrix
            if step.kind == "x":
                x_scale = self._ndp_load(x, step)
            elif step.kind == "h":
                h = hidden()
                x_scale = self._ndp_load(h, step)
            elif step.kind == "Bx":
                pad = torch.zeros(x.shape[0], self.sizes.padded_rank)
                pad[:, :r] = bx[m] if self.sizes.factor_bits is None else bx[m] * self._rank_scale(layer, task.expert, m)[:r]
                x_scale = self._ndp_load(pad, step)
            elif step.kind == "w":
                add(m, self._ndp_product(layer, task, m, task.variant, step, x_scale))
            elif step.kind == "B":
                keep = torch.arange(r)[None, :] < ranks[:, None]
                bx[m] = self._ndp_product(layer, task, m, self._b_slot, step, x_scale, rows=r) * keep
            elif step.kind == "A":
                add(m, self._ndp_product(layer, task, m, self._a_slot, step, x_scale))
            else:
                raise ValueError(f"unknown NDP step kind {step.kind!r}; expected one of {STEP_KINDS}")
        if h is None:
            hidden()
        return y["w2"]

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
            mats, nbytes = self.load_weights(*key)
            self.gpu.put(key, mats, "prefetch", nbytes)
            rec.link_bytes["prefetch"] += nbytes
        keep = set(self.cache.keys())
        if self.factor_cache is not None:
            keep |= set(self.factor_cache.keys())
        self.gpu.keep_only(keep)
