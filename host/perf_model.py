"""Performance model: bytes, words, cycles and FLOPs of planned work -> modeled time per layer.

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

from .presets import SystemPreset
from .sizes import MATRICES, ExpertSizes

LINK_KINDS = ("weights", "hi_weights", "fp16_weights", "factors", "prefetch", "act_to_ndp", "results_from_ndp")
_TO_MEMORY = ("act_to_ndp",)


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
        u.link["factors"] += fetch_factor_ranks * sizes.fp16_bytes_per_rank
        u.round_trips = max(u.round_trips, 1)
        u.gpu_bytes += sizes.factor_bytes_fp16(comp_rank)
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


@dataclass(frozen=True)
class LayerTime:
    link_s: float
    ndp_s: float
    gpu_s: float
    latency_s: float

    @property
    def total_s(self) -> float:
        return max(self.link_s, self.ndp_s, self.gpu_s) + self.latency_s

    def to_json(self) -> dict:
        return {"link_s": self.link_s, "ndp_s": self.ndp_s, "gpu_s": self.gpu_s,
                "latency_s": self.latency_s, "total_s": self.total_s}


def link_seconds(u: Usage, system: SystemPreset) -> float:
    to_memory = sum(u.link[k] for k in _TO_MEMORY)
    to_gpu = sum(u.link.values()) - to_memory
    return max(to_gpu, to_memory) / (system.link.gbps * 1e9)


def ndp_seconds(u: Usage, system: SystemPreset) -> float:
    if system.ndp is None or not u.ndp_descriptors:
        return 0.0
    compute = u.ndp_wall_cycles / (system.ndp.clock_mhz * 1e6)
    memory = u.ndp_words * system.ndp.ndp_config.word_bytes / (system.memory.gbps * 1e9)
    return max(compute, memory)


def gpu_seconds(u: Usage, system: SystemPreset) -> float:
    return max(u.gpu_flops / (system.gpu.tflops * 1e12), u.gpu_bytes / (system.gpu.hbm_gbps * 1e9))


def layer_time(u: Usage, system: SystemPreset) -> LayerTime:
    return LayerTime(link_seconds(u, system), ndp_seconds(u, system), gpu_seconds(u, system),
                     u.round_trips * system.link.latency_us * 1e-6)


def resident_seconds(params_per_layer: float, tokens: int, system: SystemPreset) -> float:
    """GPU time of a layer's resident fp16 parameters (attention, router, shared experts)."""
    return max(2.0 * params_per_layer / (system.gpu.hbm_gbps * 1e9),
               2.0 * tokens * params_per_layer / (system.gpu.tflops * 1e12))
