"""What a layer and a run cost, as JSON: bytes over each link, ops and cycles per unit, cache hits
and misses, modeled time, and (when the plan was executed) what the backends actually did."""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field

from .execute import ExecutionRecord
from .perf_model import LINK_KINDS
from .plan import LayerPlan


@dataclass(frozen=True)
class LayerStats:
    layer: int
    tokens: int
    link_bytes: dict[str, int]
    ops: dict[str, int]                  # expert tasks per unit: gemm_gpu, gemm_ndp, comp_gpu, comp_ndp
    ndp: dict[str, float]                # descriptors, words, wall_cycles (+ measured ones)
    gpu: dict[str, float]                # flops, bytes
    cache: dict[str, int]                # weight hits / misses in this layer
    restoration: dict[str, float]        # restored slots, hi slots, mean rank of restored slots
    time_s: dict[str, float] | None
    cycles_source: str

    def to_json(self) -> dict:
        return dict(self.__dict__)


def layer_stats(plan: LayerPlan, cycles_source: str, record: ExecutionRecord | None = None) -> LayerStats:
    ops = Counter()
    hits = misses = 0
    for task in plan.tasks:
        ops[f"gemm_{task.gemm_unit}"] += 1
        if task.comp_unit:
            ops[f"comp_{task.comp_unit}"] += 1
        if task.gemm_unit == "gpu" and not task.fetch_weights:
            hits += 1
        else:
            misses += 1
    ranks = [r for row, hrow in zip(plan.restoration.ranks, plan.restoration.hi) for r, h in zip(row, hrow) if r and not h]
    u = plan.usage
    ndp = {"descriptors": u.ndp_descriptors, "words": u.ndp_words, "wall_cycles": u.ndp_wall_cycles}
    link = {k: int(u.link.get(k, 0)) for k in LINK_KINDS}
    if record is not None:
        ndp["executed_descriptors"] = len(record.ndp_descriptors)
        ndp["executed_words"] = sum(d.words for d in record.ndp_descriptors)
        link = {**link, **{f"executed_{k}": int(v) for k, v in record.link_bytes.items()}}
    return LayerStats(
        layer=plan.layer, tokens=plan.tokens, link_bytes=link, ops=dict(ops), ndp=ndp,
        gpu={"flops": u.gpu_flops, "bytes": u.gpu_bytes},
        cache={"weight_hits": hits, "weight_misses": misses, "prefetches": len(plan.prefetches),
               "evictions": len(plan.evictions)},
        restoration={"restored_slots": len(ranks), "hi_slots": sum(map(sum, plan.restoration.hi)),
                     "mean_rank": sum(ranks) / len(ranks) if ranks else 0.0},
        time_s=plan.time.to_json() if plan.time is not None else None,
        cycles_source=cycles_source)


@dataclass
class RunStats:
    """A run: its settings and its layers. `summary()` gives per-token totals."""
    meta: dict
    layers: list[LayerStats] = field(default_factory=list)
    tokens: int = 0                       # tokens decoded (each visits every layer)
    extra_time_s: float = 0.0             # resident (non-expert) GPU time of the whole run
    planning_time_s: float = 0.0          # host planning not hidden behind execution (measured CPU time)

    def add(self, layer: LayerStats) -> None:
        self.layers.append(layer)

    def summary(self) -> dict:
        link = Counter()
        for lt in self.layers:
            link.update({k: v for k, v in lt.link_bytes.items() if not k.startswith("executed_")})
        time = sum(lt.time_s["total_s"] for lt in self.layers if lt.time_s) + self.extra_time_s
        n = max(self.tokens, 1)
        hits = sum(lt.cache["weight_hits"] for lt in self.layers)
        misses = sum(lt.cache["weight_misses"] for lt in self.layers)
        return {"tokens": self.tokens, "layers": len(self.layers),
                "link_bytes_per_token": {k: v / n for k, v in link.items()},
                "total_link_bytes_per_token": sum(link.values()) / n,
                "ndp_words_per_token": sum(lt.ndp["words"] for lt in self.layers) / n,
                "gpu_weight_hit_rate": hits / max(hits + misses, 1),
                "modeled_time_s": time,
                "planning_time_s": self.planning_time_s,
                "tokens_per_s": self.tokens / (time + self.planning_time_s) if time + self.planning_time_s > 0
                else float("inf")}

    def to_json(self) -> dict:
        return {"meta": self.meta, "summary": self.summary(), "layers": [lt.to_json() for lt in self.layers]}

    def write(self, path: str | os.PathLike) -> None:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f, indent=1)
        os.replace(tmp, path)
