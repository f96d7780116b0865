"""One MoE layer of a co-simulation, host side: plan it once, execute the plan with its NDP ops
on a given backend (the RTL, the golden model), and measure the outputs against the references.

Nothing here touches the simulator: the NDP backend is an argument, so the same code runs inside
the cocotb test (sim/cocotb_cosim.py: RTL backend, in a bridge thread) and in plain tests (golden
backends only).

Legend: T tokens, D hidden, K top-k.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace

import torch

from ndpmoe.host.backends import TorchGpuBackend
from ndpmoe.host.cache import ExpertCache
from ndpmoe.host.execute import ExecutionRecord, LayerExecutor
from ndpmoe.host.ndp import GoldenNdpBackend, NdpDriver
from ndpmoe.host.ndp_cost import NdpCostModel
from ndpmoe.host.perf_model import layer_time
from ndpmoe.host.plan import LayerPlan, LayerPlanner, check_plan
from ndpmoe.host.policy import TopN
from ndpmoe.host.presets import NdpPreset, SystemPreset, get_system
from ndpmoe.host.sizes import MATRICES
from ndpmoe.host.store import ExpertStore, open_store
from ndpmoe.model.contract import NdpConfig
from ndpmoe.model.moe import MoEWeights, RouterConfig, moe_forward, route, shared_expert
from ndpmoe.model.moe_quant import moe_forward_quant

GPU_CACHE_BYTES = 1 << 30       # plenty: the plan's cache starts cold, nothing is evicted in one layer


@dataclass
class CosimCase:
    """One layer to co-simulate: its store, float weights, inputs and plan settings."""
    name: str
    model_layer: int                  # the layer in the model (the store holds it as layer 0)
    store: str                        # expert store folder (host/store.py)
    weights: MoEWeights
    router: RouterConfig
    x: torch.Tensor                   # [T, D] hidden states entering the block
    topn: int
    placement: str = "all-ndp"

    def to_dict(self) -> dict:
        w = {k: v for k, v in self.weights.__dict__.items() if v is not None}
        return dict(name=self.name, model_layer=self.model_layer, store=self.store, weights=w,
                    router=dict(self.router.__dict__), x=self.x, topn=self.topn, placement=self.placement)

    @classmethod
    def from_dict(cls, d: dict) -> "CosimCase":
        rc = dict(d["router"])
        if rc.get("score_bias") is not None:
            rc["score_bias"] = tuple(rc["score_bias"])
        return cls(d["name"], d["model_layer"], d["store"], MoEWeights(**d["weights"]), RouterConfig(**rc),
                   d["x"], d["topn"], d["placement"])


def cosim_system(cfg: NdpConfig, cost: NdpCostModel, base: str = "gpu-ndp") -> SystemPreset:
    """`base` with its NDP replaced by one unit of the simulated configuration at its clock, so
    the modeled NDP cycles and the simulated ones describe the same hardware."""
    system = get_system(base)
    return replace(system, name=f"{base}+rtl-{cfg.name}",
                   ndp=NdpPreset(f"rtl-{cfg.name}", config=cfg.name, units=1, clock_mhz=cfg.clock_mhz, cost=cost))


@dataclass
class LayerSetup:
    case: CosimCase
    store: ExpertStore
    plan: LayerPlan
    cache: ExpertCache
    system: SystemPreset
    cfg: NdpConfig

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        return shared_expert(x, self.case.weights)

    def executor(self, backend) -> LayerExecutor:
        """An executor on a fresh driver over `backend`, the layer's images placed from address 0."""
        ex = LayerExecutor(self.store, TorchGpuBackend("cpu"), self.cache, NdpDriver(backend))
        ex.place_layer(0)
        return ex

    def run(self, ex: LayerExecutor) -> tuple[torch.Tensor, ExecutionRecord]:
        return ex.run(self.plan, self.case.x, shared=self.shared)

    def execute(self, backend) -> tuple[torch.Tensor, ExecutionRecord]:
        return self.run(self.executor(backend))


def setup(case: CosimCase, cfg: NdpConfig, cost: NdpCostModel) -> LayerSetup:
    store = open_store(case.store)
    system = cosim_system(cfg, cost)
    cache = ExpertCache(GPU_CACHE_BYTES)
    planner = LayerPlanner(store.sizes(cfg), cache, TopN(case.topn), system=system, placement=case.placement,
                           sensitivity=store.sensitivity, prefetch=False)
    plan = planner.plan(0, *route(case.x, case.weights.router, case.router))
    check_plan(plan)
    return LayerSetup(case, store, plan, cache, system, cfg)


def memory_needs(case: CosimCase, cfg: NdpConfig) -> tuple[int, int, int]:
    """(bytes of NDP memory the layer's placed images and the activation scratch need, bytes of
    the largest single read: one matrix image or one activation load, most results of one
    descriptor)."""
    store = open_store(case.store, verify=False)
    sizes = store.sizes(cfg)
    reads = []
    for matrix in MATRICES:
        reads.append(sizes.matrix_bytes("lo", matrix))
        if sizes.hi_fmt is not None and sizes.hi_fmt.bits in cfg.bits:
            reads.append(sizes.matrix_bytes("hi", matrix))
        reads += list(sizes.ndp_factor_bytes(matrix))
    scratch = cfg.t_max * cfg.max_in_features
    total = store.manifest.experts * (sum(reads) + len(reads) * cfg.word_bytes) + scratch    # + word alignment of each image
    results = cfg.t_max * max(sizes.hidden, sizes.intermediate)
    return total, max(max(reads), scratch), results


def _errors(y: torch.Tensor, ref: torch.Tensor) -> dict:
    return {"rel_l2": float((y - ref).norm() / ref.norm()), "max_abs": float((y - ref).abs().max()),
            "ref_rms": float(ref.pow(2).mean().sqrt())}


def references(s: LayerSetup) -> dict[str, torch.Tensor]:
    """The float block (golden layer 1) and the quantized + compensated block under the plan's
    restoration (golden layer 2), both with the shared expert."""
    c = s.case
    routing = route(c.x, c.weights.router, c.router)
    quant = moe_forward_quant(c.x, s.store.quantized_moe(0, c.weights, c.router), s.plan.restoration.restore_tensor(),
                              s.plan.restoration.hi_tensor(), routing=routing)
    return {"float": moe_forward(c.x, c.weights, c.router), "quant": quant}


def measured_time(s: LayerSetup, ndp_cycles: float) -> dict:
    """The plan's modeled layer time with its NDP cycles replaced by measured ones."""
    u = copy.copy(s.plan.usage)
    u.link = dict(u.link)
    u.ndp_wall_cycles = float(ndp_cycles)
    return layer_time(u, s.system).to_json() | {"ndp_cycles": float(ndp_cycles)}


def plan_summary(s: LayerSetup) -> dict:
    p, u = s.plan, s.plan.usage
    restored = sum(1 for row in p.restoration.ranks for r in row if r)
    return {
        "tokens": p.tokens, "top_k": len(p.ids[0]), "tasks": len(p.tasks),
        "gemm_ndp": sum(t.gemm_unit == "ndp" for t in p.tasks), "gemm_gpu": sum(t.gemm_unit == "gpu" for t in p.tasks),
        "comp_ndp": sum(t.comp_unit == "ndp" for t in p.tasks), "comp_gpu": sum(t.comp_unit == "gpu" for t in p.tasks),
        "restored_slots": restored,
        "modeled": {"ndp_descriptors": u.ndp_descriptors, "ndp_words": u.ndp_words,
                    "ndp_cycles": u.ndp_wall_cycles, "link_bytes": {k: int(v) for k, v in u.link.items()},
                    "time_s": p.time.to_json() if p.time is not None else None},
        "system": s.system.name, "ndp_clock_mhz": s.system.ndp.clock_mhz,
        "cost_model": asdict(s.system.ndp.cost),
    }


def golden_output(s: LayerSetup, mem_bytes: int) -> tuple[torch.Tensor, ExecutionRecord]:
    return s.execute(GoldenNdpBackend(s.cfg, mem_bytes))


def ndp_summary(records: list[dict]) -> dict:
    """Totals of a run's descriptor records (sim/rtl_backend.DescriptorRecord as dicts)."""
    busy = sum(r["busy_cycles"] for r in records)
    words = sum(r["words"] for r in records)
    beats = sum(r["beats"] for r in records)
    diffs = [r["max_abs_diff"] for r in records]
    return {
        "descriptors": len(records),
        "matmuls": sum(r["opcode"] == "MATMUL" for r in records),
        "ndp_cycles": busy,
        "words_read": words,
        "results": sum(r["results"] for r in records),
        "mem_stall_cycles": sum(r["mem_stall_cycles"] for r in records),
        "out_stall_cycles": sum(r["out_stall_cycles"] for r in records),
        "port_utilization": words / busy if busy else 0.0,
        "beats_per_cycle": beats / busy if busy else 0.0,
        # None: some descriptor's results did not line up with the golden ones at all
        "max_abs_diff": None if any(d is None for d in diffs) else max(diffs, default=0),
        "ram_words_loaded": sum(r["loaded_words"] for r in records),
    }


def output_report(y: torch.Tensor, y_golden: torch.Tensor, refs: dict[str, torch.Tensor]) -> dict:
    return {"equal_to_golden_backend": bool(torch.equal(y, y_golden)),
            "max_abs_vs_golden_backend": float((y - y_golden).abs().max()),
            "vs_float": _errors(y, refs["float"]), "vs_quant": _errors(y, refs["quant"])}
