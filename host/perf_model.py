"""Performance model: bytes, words, cycles and FLOPs of planned work (`Usage`, `task_usage`) ->
seconds per resource and modeled time per layer (`TimeModel`, the one time model: the placer
weighs its options with it and the layer time and the throughput model read it).

Resources run concurrently within a layer and the layer takes the longest of them, plus the link
latency of each host round trip its data flow needs (NDP GEMMs need two: x then h; NDP
compensation two more, because the host requantizes B x before A runs):

    link    full duplex: max(bytes to the GPU, bytes to the memory) / bandwidth
    ndp     per descriptor: overhead + cycles_per_word x beats (host/ndp_cost.py: metadata and
            3-bit hi-plane words once, code words once per pass); a
            MATMUL's rows are split over the units (words / units each), a LOAD_ACT is broadcast
            (each unit reads the whole activation); at the NDP clock, and never faster than the
            expert memory's bandwidth
    gpu     max(FLOPs / FLOP rate, bytes read / HBM bandwidth)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .presets import SystemPreset
from .sizes import MATRICES, ExpertSizes

LINK_KINDS = ("weights", "hi_weights", "fp16_weights", "factors", "prefetch", "act_to_ndp", "results_from_ndp")


class Usage:
    """Work of some tasks, additive. A plain slotted class: the planner adds thousands per second."""
    __slots__ = ("link", "ndp_descriptors", "ndp_words", "ndp_wall_cycles", "gpu_flops", "gpu_bytes", "round_trips")

    def __init__(self):
        self.link: dict[str, int] = dict.fromkeys(LINK_KINDS, 0)    # bytes per link kind
        self.ndp_descriptors = 0
        self.ndp_words = 0
        self.ndp_wall_cycles = 0.0                                   # MATMUL rows split over units
        self.gpu_flops = 0.0
        self.gpu_bytes = 0
        self.round_trips = 0

    def add(self, other: "Usage") -> None:
        link = self.link
        for k, v in other.link.items():
            if v:
                link[k] += v
        self.ndp_descriptors += other.ndp_descriptors
        self.ndp_words += other.ndp_words
        self.ndp_wall_cycles += other.ndp_wall_cycles
        self.gpu_flops += other.gpu_flops
        self.gpu_bytes += other.gpu_bytes
        if other.round_trips > self.round_trips:
            self.round_trips = other.round_trips


def sum_usage(usages) -> Usage:
    total = Usage()
    for u in usages:
        total.add(u)
    return total


def weight_link_kind(variant: str) -> str:
    return {"lo": "weights", "hi": "hi_weights", "fp16": "fp16_weights"}[variant]


def task_usage(sizes: ExpertSizes, system: SystemPreset | None, variant: str, tokens: int,
               gemm_unit: str, comp_unit: str | None, comp_rank: int, fetch_weights: bool,
               fetch_factor_ranks: int) -> Usage:
    """Usage of one expert task (see plan.ExpertTask for the fields)."""
    u = Usage()
    if gemm_unit == "gpu":
        if fetch_weights:
            u.link[weight_link_kind(variant)] += sizes.weight_bytes(variant)
            u.round_trips = 1
        u.gpu_bytes += sizes.weight_bytes(variant)
        u.gpu_flops += 2.0 * tokens * 3 * sizes.hidden * sizes.intermediate
    if comp_unit == "gpu" and comp_rank:
        u.link["factors"] += fetch_factor_ranks * sizes.gpu_rank_bytes
        u.round_trips = max(u.round_trips, 1)
        u.gpu_bytes += sizes.gpu_factor_bytes(comp_rank)
        u.gpu_flops += 2.0 * tokens * comp_rank * sum(sum(sizes.shape(m)) for m in MATRICES)
    ndp_gemm = gemm_unit == "ndp"
    ndp_rank = comp_rank if comp_unit == "ndp" else 0
    if ndp_gemm or ndp_rank:
        if system is None or system.ndp is None:
            raise ValueError("a task placed on the NDP needs a system with an NDP unit")
        cost, units, cfg = system.ndp.cost, system.ndp.units, sizes.ndp
        for step in sizes.ndp_steps(variant, tokens, ndp_gemm, ndp_rank):
            u.ndp_descriptors += 1
            u.ndp_words += step.words
            u.ndp_wall_cycles += cost.cycles(step.descriptor, cfg, units)
            u.link["act_to_ndp"] += step.link_down
            u.link["results_from_ndp"] += step.link_up
        u.round_trips = 4 if ndp_rank else 2
    return u


class ResourceSeconds(NamedTuple):
    """Seconds each resource of a system is busy with some work. They run concurrently: a layer
    lasts as long as the busiest, plus the latency of the link round trips its data flow needs.
    (A NamedTuple: the placer adds these up per option it weighs.)"""
    to_gpu: float          # link towards the GPU: fetched weights and factors, NDP results
    to_memory: float       # link towards the expert memory: activations for the NDP
    ndp_compute: float     # NDP cycles at the NDP clock
    ndp_memory: float      # words the NDP reads, at the expert memory's bandwidth
    gpu: float             # max(FLOPs / FLOP rate, bytes read / HBM bandwidth)
    latency: float         # round trips x link latency (not additive: the longest chain counts)

    @property
    def busiest(self) -> float:
        return max(self.to_gpu, self.to_memory, self.ndp_compute, self.ndp_memory, self.gpu)


ZERO_SECONDS = ResourceSeconds(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class LayerTime:
    link_s: float          # the link is full duplex: the busier direction
    ndp_s: float           # compute or memory, whichever is slower
    gpu_s: float
    latency_s: float

    @classmethod
    def of(cls, r: ResourceSeconds) -> "LayerTime":
        return cls(max(r.to_gpu, r.to_memory), max(r.ndp_compute, r.ndp_memory), r.gpu, r.latency)

    @property
    def total_s(self) -> float:
        return max(self.link_s, self.ndp_s, self.gpu_s) + self.latency_s

    def to_json(self) -> dict:
        return {"link_s": self.link_s, "ndp_s": self.ndp_s, "gpu_s": self.gpu_s,
                "latency_s": self.latency_s, "total_s": self.total_s}


class TimeModel:
    """The one time model: seconds of planned work on one system. The placer weighs its options
    with `seconds`, the modeled layer time is `layer_time`, the throughput model adds the
    resident parameters' `resident_seconds`."""

    def __init__(self, system: SystemPreset):
        self.system = system
        self._link_bps = system.link.gbps * 1e9
        self._flops = system.gpu.tflops * 1e12
        self._hbm_bps = system.gpu.hbm_gbps * 1e9
        ndp = system.ndp
        self._ndp_hz = ndp.clock_mhz * 1e6 if ndp else None
        self._ndp_word_bytes = ndp.ndp_config.word_bytes if ndp else 0
        self._memory_bps = system.memory.gbps * 1e9

    def seconds(self, u: Usage) -> ResourceSeconds:
        to_memory = u.link["act_to_ndp"]
        to_gpu = sum(u.link.values()) - to_memory
        ndp_compute = ndp_memory = 0.0
        if self._ndp_hz is not None:
            ndp_compute = u.ndp_wall_cycles / self._ndp_hz
            ndp_memory = u.ndp_words * self._ndp_word_bytes / self._memory_bps
        gpu = max(u.gpu_flops / self._flops, u.gpu_bytes / self._hbm_bps)
        return ResourceSeconds(to_gpu / self._link_bps, to_memory / self._link_bps, ndp_compute, ndp_memory,
                               gpu, u.round_trips * self.system.link.latency_us * 1e-6)

    def layer_time(self, u: Usage) -> LayerTime:
        return LayerTime.of(self.seconds(u))

    def link_bytes(self, seconds: float) -> float:
        """Bytes the link moves in `seconds` (one direction)."""
        return seconds * self.system.link.gbps * 1e9

    def resident_seconds(self, params_per_layer: float, tokens: int) -> float:
        """GPU time of a layer's resident fp16 parameters (attention, router, shared experts)."""
        return max(2.0 * params_per_layer / self._hbm_bps, 2.0 * tokens * params_per_layer / self._flops)


def layer_time(u: Usage, system: SystemPreset) -> LayerTime:
    return TimeModel(system).layer_time(u)
