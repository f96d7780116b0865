"""Every MoE layer of a model through the runtime: a block function per layer that routes, plans
(restoration policy, placement, cache actions) and executes the plan (GPU backend, NDP driver on
any NDP backend), measuring where the time goes.

    rt = ModelRuntime(model_store, dm.blocks, policy=TopN(2), placement="auto", cache_bytes=8 << 20,
                      ndp=GoldenNdpBackend(cfg, mem), system=system)
    rt.install(dm.model)          # the model's MoE blocks now run through the runtime
    rt.begin_step(tokens); model(...); stats = rt.end_step(wall_s)

All layers share one expert cache (keys carry the layer), one planner and one executor, so the
cache sees the cyclic layer order of real decoding. Experts come from the store on disk
(safetensors, memory-mapped) and are unpacked on the host when fetched (host/backends.py says
why); an NDP unit holds every layer's images, placed once. With `prefetch_next`, each layer
guesses the next one's experts and stages its fetches while it runs (host/prefetch.py); that
changes where fetched bytes come from, never what is planned or computed. (`prefetch` is the
planner's own: NDP-run experts copied into the cache with idle link time, host/plan.py.)

Time per step is split by instrumenting the public seams: the store's reads (fetch), the GPU
backend's copies (upload), the NDP backend's calls (the simulated unit's host time), the
planner, the next-layer prefetch; expert compute is what remains of the executor's time. The NDP unit's own time is its
busy cycles at its clock: measured by the RTL, from the cost model on the golden backend.

Legend: T tokens, D hidden, K top-k.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from ndpmoe.model.block import set_blocks
from ndpmoe.model.moe import shared_expert
from ndpmoe.model.moe import route as route_tokens

from .backends import TorchGpuBackend
from .cache import ExpertCache
from .execute import LayerExecutor
from .ndp import NdpDriver
from .plan import LayerPlanner, check_plan
from .prefetch import NextLayerPrefetcher, PrefetchStats, staging_budget
from .presets import SystemPreset
from .sizes import MATRICES, ExpertSizes

_now = time.perf_counter


@dataclass
class StepStats:
    """One forward pass of the model (the prompt's prefill, or one decoded token)."""
    tokens: int
    wall_s: float = 0.0
    planning_s: float = 0.0           # LayerPlanner.plan: policy, placement, cache actions
    planning_decide_s: float = 0.0    # its decide part, which the layer's launch waits for (the cache
                                      # bookkeeping of finish could run while the layer executes)
    routing_s: float = 0.0            # router matmul and top-k
    expert_compute_s: float = 0.0     # executor time not spent in the seams below (with the NDP, this
                                      # includes quantizing its activations and converting its results)
    fetch_s: float = 0.0              # store reads + unpacking of fetched experts and factors
    upload_s: float = 0.0             # host -> device copies (and activations to / from the device)
    ndp_backend_s: float = 0.0        # host time inside the NDP backend (functional model or simulator)
    ndp_cycles: float = 0.0           # the unit's busy cycles (counter deltas)
    ndp_cycles_planned: float = 0.0   # what the plans modeled for the same descriptors
    ndp_descriptors: int = 0
    ndp_cycles_measured: bool = False  # True: every descriptor of the step ran on a clocked unit (RTL)
    moe_layers: int = 0
    link_planned: Counter = field(default_factory=Counter)
    link_executed: Counter = field(default_factory=Counter)
    unplanned_uploads: int = 0
    fetches: int = 0                  # weight and factor fetches to the device (misses of its cache)
    staged_fetches: int = 0           # of those, staged ahead by the next-layer prefetch
    prefetch_s: float = 0.0           # guessing the next layer and staging its fetches (host time)
    prefetch: dict = field(default_factory=dict)     # this pass's PrefetchStats (host/prefetch.py)

    @property
    def demand_fetches(self) -> int:
        """Fetches that waited for the link when the layer needed them."""
        return self.fetches - self.staged_fetches

    @property
    def moe_s(self) -> float:
        return (self.planning_s + self.routing_s + self.expert_compute_s + self.fetch_s + self.upload_s
                + self.ndp_backend_s + self.prefetch_s)

    @property
    def other_model_s(self) -> float:
        """Attention, embeddings, dense layers and the LM head: the step's wall time outside MoE blocks."""
        return max(self.wall_s - self.moe_s, 0.0)

    def to_json(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if not isinstance(v, Counter)}
        d.update(link_planned=dict(self.link_planned), link_executed=dict(self.link_executed),
                 moe_s=self.moe_s, other_model_s=self.other_model_s, demand_fetches=self.demand_fetches)
        return d


class _Clock:
    __slots__ = ("seconds",)

    def __init__(self):
        self.seconds = 0.0


class _TimedMatrix:
    """A store matrix whose unpacking (dequantize) is counted as fetch time."""
    __slots__ = ("_q", "_clock")

    def __init__(self, q, clock: _Clock):
        self._q, self._clock = q, clock

    def dequantize(self, *args, **kwargs):
        t0 = _now()
        try:
            return self._q.dequantize(*args, **kwargs)
        finally:
            self._clock.seconds += _now() - t0

    def __getattr__(self, name):
        return getattr(self._q, name)


class TimedStore:
    """The executor's view of an ExpertStore, timing the reads that fetch experts and factors."""

    def __init__(self, store, clock: _Clock):
        self._store, self._clock = store, clock

    def __getattr__(self, name):
        return getattr(self._store, name)

    def _timed(self, fn, *args):
        t0 = _now()
        try:
            return fn(*args)
        finally:
            self._clock.seconds += _now() - t0

    def image(self, *args):
        return self._timed(self._store.image, *args)

    def matrix(self, *args):
        return _TimedMatrix(self._timed(self._store.matrix, *args), self._clock)

    def factors_fp16(self, *args):
        return self._timed(self._store.factors_fp16, *args)

    def packed_factor_rows(self, *args):
        return self._timed(self._store.packed_factor_rows, *args)


class TimedGpuBackend(TorchGpuBackend):
    """TorchGpuBackend whose copies are timed. On CUDA an upload is issued on the side stream and
    not waited for (that would undo the overlap), so its time here is the host's part (pinning,
    issuing); the copy itself shows in whatever waits for it. ModelRuntime synchronizes once per
    layer, so each layer's total is right. (The CUDA path has not run on hardware yet.)"""

    def __init__(self, device="cpu"):
        super().__init__(device)
        self.clock = _Clock()

    def synchronize(self):
        """Wait for this layer's work: the compute stream (which waited on the upload stream).
        Not the whole device: the next-layer prefetch's copies may run on past the layer."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def upload(self, host):
        t0 = _now()
        dev = super().upload(host)
        self.clock.seconds += _now() - t0
        return dev

    def to_device(self, x):
        t0 = _now()
        dev = super().to_device(x)
        self.clock.seconds += _now() - t0
        return dev

    def to_host(self, x):
        t0 = _now()
        host = super().to_host(x)
        self.clock.seconds += _now() - t0
        return host


class TimedNdpBackend:
    """An NdpBackend whose calls are timed; counters pass through. A backend that runs its
    descriptors on a clocked unit says so with `measured_cycles = True` (the RTL)."""

    def __init__(self, backend):
        self.backend = backend
        self.config = backend.config
        self.clock = _Clock()

    @property
    def mem_bytes(self) -> int:
        size = getattr(self.backend, "mem_bytes", None)
        return size if size is not None else len(self.backend.unit.mem)

    @property
    def measured_cycles(self) -> bool:
        return bool(getattr(self.backend, "measured_cycles", False))

    def write(self, addr, data):
        t0 = _now()
        try:
            self.backend.write(addr, data)
        finally:
            self.clock.seconds += _now() - t0

    def run(self, descriptor):
        t0 = _now()
        try:
            return self.backend.run(descriptor)
        finally:
            self.clock.seconds += _now() - t0

    def counters(self):
        return self.backend.counters()


def ndp_memory_bytes(sizes: ExpertSizes, experts: int, layers: int) -> int:
    """NDP memory for every layer's placed images (LayerExecutor.place_layer) and the
    activation scratch (NdpDriver), each image word aligned."""
    cfg = sizes.ndp
    wb = cfg.word_bytes
    up = lambda n: -(-n // wb) * wb
    per_expert = 0
    for m in MATRICES:
        per_expert += up(sizes.matrix_bytes("lo", m))
        if sizes.hi_fmt is not None and sizes.hi_fmt.bits in cfg.bits:
            per_expert += up(sizes.matrix_bytes("hi", m))
        if sizes.stored_rank:
            a, b = sizes.ndp_factor_bytes(m)
            per_expert += up(a) + up(b)
    return layers * experts * per_expert + cfg.t_max * cfg.max_in_features


class ModelRuntime:
    """The runtime behind every MoE block of a model (see the module docstring)."""

    def __init__(self, model_store, blocks: dict, *, policy, placement: str = "auto", cache_bytes: int,
                 eviction: str = "lru", ndp=None, system: SystemPreset | None = None, device: str = "cpu",
                 prefetch: bool = True, record: bool = False, verify: bool = False, factor_precision: str = "fp16",
                 prefetch_next: bool = False):
        store = model_store.store
        self.store, self.layer_index = store, dict(model_store.layer_index)
        self.blocks = {l: blocks[l] for l in self.layer_index}
        self.ndp = None if ndp is None else TimedNdpBackend(ndp)
        sizes = store.sizes(None if ndp is None else ndp.config, factor_precision)
        self.sizes = sizes
        self.cache = ExpertCache(cache_bytes, eviction, min_entry_bytes=sizes.weight_bytes("lo"))
        self.gpu = TimedGpuBackend(device)
        self._fetch = _Clock()
        self.executor = LayerExecutor(TimedStore(store, self._fetch), self.gpu, self.cache,
                                      None if ndp is None else NdpDriver(self.ndp), factor_precision=factor_precision)
        self.planner = LayerPlanner(sizes, self.cache, policy, system=system, placement=placement,
                                    sensitivity=store.sensitivity, prefetch=prefetch)
        self.system, self.policy, self.placement = system, policy, placement
        order = sorted(self.layer_index)
        self._next_layer = dict(zip(order, order[1:]))           # within a pass; the last has none
        self.prefetcher = None
        if prefetch_next:
            top_k = max(cfg.top_k for _, cfg in self.blocks.values())
            self.prefetcher = NextLayerPrefetcher(self.planner, self.executor, device,
                                                  staging_budget(sizes, top_k, self.planner.weight_variant))
            self.executor.prefetcher = self.prefetcher
        self._prefetch0 = PrefetchStats()
        self.record, self.verify = record, verify
        self.decisions: list[dict] = []          # with record=True: per block call, in call order
        self.position: tuple[int, int] | None = None     # (pass, model layer) while inside an MoE block
        self.steps: list[StepStats] = []
        self._step: StepStats | None = None
        self.setup_s = 0.0
        if ndp is not None:
            t0 = _now()
            for sl in sorted(self.layer_index.values()):
                self.executor.place_layer(sl)
            self.setup_s = _now() - t0

    # -- steps -------------------------------------------------------------------------------------
    def begin_step(self, tokens: int) -> None:
        self._step = StepStats(tokens)
        self._step.ndp_cycles_measured = self.ndp is not None and self.ndp.measured_cycles
        if self.prefetcher is not None:
            self._prefetch0 = PrefetchStats(**self.prefetcher.stats.__dict__)

    def end_step(self, wall_s: float) -> StepStats:
        step, self._step = self._step, None
        step.wall_s = wall_s
        if self.prefetcher is not None:
            now, before = self.prefetcher.stats, self._prefetch0
            step.prefetch = {k: v - getattr(before, k) for k, v in now.__dict__.items()}
        self.steps.append(step)
        return step

    # -- the block ---------------------------------------------------------------------------------
    def block_fn(self, model_layer: int):
        if model_layer not in self.layer_index:
            raise ValueError(f"layer {model_layer} is not in the store (it holds {sorted(self.layer_index)})")
        sl = self.layer_index[model_layer]
        weights, cfg = self.blocks[model_layer]

        def shared(x: torch.Tensor) -> torch.Tensor:
            return shared_expert(x, weights)

        def block(x: torch.Tensor) -> torch.Tensor:
            return self._run_layer(model_layer, sl, weights, cfg, shared, x)
        return block

    def install(self, model) -> None:
        set_blocks(model, {l: self.block_fn(l) for l in self.layer_index})

    def _run_layer(self, model_layer, sl, weights, cfg, shared, x):
        if self._step is None:
            raise RuntimeError("ModelRuntime.begin_step must be called before the model runs")
        self.position = (len(self.steps), model_layer)
        y = self._layer(model_layer, sl, weights, cfg, shared, x)
        self.position = None          # left as it was when an interrupt stops the layer
        return y

    def _layer(self, model_layer, sl, weights, cfg, shared, x):
        step = self._step
        device = x.device
        xh = x.detach().float()
        t0 = _now()
        if xh.device.type != "cpu":
            xh = xh.cpu()                                  # the executor takes host activations
        t1 = _now()
        ids, wts = route_tokens(xh, weights.router, cfg)
        t2 = _now()
        decision = self.planner.decide(sl, ids, wts)
        t_decided = _now()
        plan = self.planner.finish(decision)
        t3 = _now()
        if self.verify:
            check_plan(plan)
        pf = self.prefetcher
        if pf is not None:
            pf.begin(sl, ids)
            nxt = self._next_layer.get(model_layer)
            if nxt is not None:             # the next layer's guess, staged while this one runs
                tp = _now()
                w_next, cfg_next = self.blocks[nxt]
                pf.stage(self.layer_index[nxt], xh, w_next.router, cfg_next)
                step.prefetch_s += _now() - tp
        fetch0, up0 = self._fetch.seconds, self.gpu.clock.seconds
        ndp0 = self.ndp.clock.seconds if self.ndp is not None else 0.0
        cyc0 = self.ndp.counters()["busy_cycles"] if self.ndp is not None else 0
        measured = self.ndp is not None and self.ndp.measured_cycles
        t4 = _now()
        y, rec = self.executor.run(plan, xh, shared=shared)
        if pf is not None:
            pf.end()
        self.gpu.synchronize()
        t5 = _now()
        if device.type != "cpu":
            y = y.to(device)
        t6 = _now()
        fetch = self._fetch.seconds - fetch0
        upload = self.gpu.clock.seconds - up0 + (t1 - t0) + (t6 - t5)
        ndp_s = (self.ndp.clock.seconds - ndp0) if self.ndp is not None else 0.0
        step.routing_s += t2 - t1
        step.planning_s += t3 - t2
        step.planning_decide_s += t_decided - t2
        step.fetch_s += fetch
        step.upload_s += upload
        step.ndp_backend_s += ndp_s
        step.expert_compute_s += max((t5 - t4) - fetch - (self.gpu.clock.seconds - up0) - ndp_s, 0.0)
        step.moe_layers += 1
        if self.ndp is not None:
            step.ndp_cycles += self.ndp.counters()["busy_cycles"] - cyc0
            step.ndp_cycles_planned += plan.usage.ndp_wall_cycles
            step.ndp_descriptors += len(rec.ndp_descriptors)
            step.ndp_cycles_measured = step.ndp_cycles_measured and measured
        for kind, v in plan.usage.link.items():
            if v:
                step.link_planned[kind] += int(v)
        for kind, v in rec.link_bytes.items():
            if v:
                step.link_executed[kind] += int(v)
        step.unplanned_uploads += rec.unplanned_uploads
        step.fetches += rec.fetches
        step.staged_fetches += rec.staged_fetches
        if self.record:
            self.decisions.append({"layer": model_layer, "ids": ids, "weights": wts,
                                   "restore": plan.restoration.restore_tensor(), "hi": plan.restoration.hi_tensor()})
        return y.to(x.dtype)
