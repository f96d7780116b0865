"""The benchmark behind `ndpmoe bench`, as a library: modeled decode throughput and bytes per token
of a named MoE model on a named system, for fp16 offloading with LRU, uniform low-bit,
HOBBIT-style mixed precision at the bytes of Top-1, Top-n restoration at each n, and the budgeted
adaptive policy at the bytes of each Top-n. Expert selection replays a routing trace (its source
is in the result); the planning cost of the runtime itself is measured per token per layer, and
the part that execution does not hide is in the tokens per second (host/throughput_model.py).

    setup = prepare_bench(BenchOptions(model="olmoe-1b-7b", system="gpu-ndp"))
    for row in bench_rows(setup): ...          # rows as they are computed
    result = run_bench(options)                # or all at once: BenchResult(setup, rows, ...)
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch

from ndpmoe.model.contract import QuantFormat

from .models import ModelSpec, get_model
from .policy import BudgetedPolicy, HobbitTopHi, RestorationPolicy, TopN
from .presets import SystemPreset, get_system
from .routing_trace import RoutingTrace, synthetic_trace, text_trace, trace_for
from .sensitivity import LayerSensitivity, assumed_sensitivity
from .sizes import ExpertSizes
from .throughput_model import model_decode

ROWS = ("fp16-lru", "uniform", "hobbit", "topn", "adaptive")
TRACES = ("auto", "text", "synthetic")         # or the path of a saved routing trace
CACHE_POLICIES = ("lru", "lfu")
PLANNING_GOAL_US = 50.0


@dataclass(frozen=True)
class BenchOptions:
    model: str = "mixtral-8x7b"                # a models.MODELS name or "default"
    system: str = "gpu-only"                   # a presets.SYSTEMS name
    gpu: str | None = None                     # swap in another GPU / link / NDP preset
    link: str | None = None
    ndp: str | None = None
    cache_gb: float = 8.0                      # GPU expert cache capacity, 1e9 bytes
    cache_policy: str = "lfu"                  # eviction of the low-bit rows
    factor_share: float = 0.0                  # share of the cache kept as a separate factor pool
    rows: tuple[str, ...] = ROWS
    topn: tuple[int, ...] | None = None        # n of Top-n and its equal-bytes rows; None: 1..k-1
    bits: int = 3
    group: int = 64
    hi_bits: int = 4                           # HOBBIT's higher-precision copies
    rank: int = 32                             # stored compensation rank
    tokens: int = 256                          # decode steps x batch replayed from the trace
    batch: int = 1
    placement: str = "auto"
    trace: str = "auto"                        # routing trace: one of TRACES or a saved file


@dataclass(frozen=True)
class BenchRow:
    """One configuration's modeled decode: bytes per token by link kind, tokens/s, planning cost.
    (Fields in the order of the JSON rows.)"""
    label: str
    policy: str
    eviction: str
    tokens: int
    layers: int
    link_bytes_per_token: dict[str, float]    # per LINK_KINDS kind, over the link
    total_link_bytes_per_token: float
    ndp_words_per_token: float
    gpu_weight_hit_rate: float                # expert tasks whose weights were on the GPU
    modeled_time_s: float                     # the system's modeled time, planning not included
    planning_time_s: float                    # measured host planning not hidden behind execution
    tokens_per_s: float                       # tokens / (modeled + planning time)
    ndp_read_bytes_per_token: float
    moved_bytes_per_token: float              # over the link + read by the NDP units
    gpu_hit_rate: float                       # the GPU cache's hit rate on the low-bit rows
    planning_us_per_token_per_layer: float    # exposed: what the launch waits for + what execution does not hide
    planning_total_us_per_token_per_layer: float

    @property
    def weight_bytes_per_token(self) -> float:
        """Link bytes of expert weights: low-bit and fp16 fetches and prefetches."""
        lb = self.link_bytes_per_token
        return lb.get("weights", 0) + lb.get("fp16_weights", 0) + lb.get("prefetch", 0)

    @property
    def ndp_io_bytes_per_token(self) -> float:
        """Link bytes of activations to and results from the NDP units."""
        lb = self.link_bytes_per_token
        return lb.get("act_to_ndp", 0) + lb.get("results_from_ndp", 0)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BenchSetup:
    """What the rows share: the model, the system, the expert sizes, the routing trace."""
    options: BenchOptions
    spec: ModelSpec
    system: SystemPreset
    sizes: ExpertSizes                         # low-bit experts, higher-precision copies, factors
    fp16_sizes: ExpertSizes
    topn: tuple[int, ...]
    trace: RoutingTrace
    sensitivity: LayerSensitivity

    @property
    def cache_bytes(self) -> int:
        return int(self.options.cache_gb * 1e9)


@dataclass(frozen=True)
class BenchResult:
    setup: BenchSetup
    rows: tuple[BenchRow, ...]
    cpu_reference_s: float                    # CPU seconds of sum(range(10**7)) here, for scale

    @property
    def worst_planning_us(self) -> float:
        return max((r.planning_us_per_token_per_layer for r in self.rows), default=0.0)

    @property
    def worst_planning_total_us(self) -> float:
        return max((r.planning_total_us_per_token_per_layer for r in self.rows), default=0.0)

    def to_json(self) -> dict:
        s = self.setup
        return {"model": s.spec.name, "system": s.system.name, "trace": s.trace.source,
                "cpu_reference_s": self.cpu_reference_s, "planning_goal_us": PLANNING_GOAL_US,
                "ndp_cost": s.system.ndp.cost.source if s.system.ndp else None,
                "sensitivity": s.sensitivity.source, "cache_gb": s.options.cache_gb,
                "rows": [r.to_json() for r in self.rows]}


def _topn_values(topn: tuple[int, ...] | None, k: int) -> tuple[int, ...]:
    if topn is None:
        return tuple(range(1, k))
    for n in topn:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < k:
            raise ValueError(f"--topn {n}: n must be in [1, k) = [1, {k}) for {k}-way routing")
    return tuple(topn)


def _routing_trace(opt: BenchOptions, spec: ModelSpec, log: Callable[[str], None]) -> RoutingTrace:
    if opt.trace == "auto":
        return trace_for(spec.experts, spec.top_k, spec.moe_layers, opt.tokens, default_model=spec.name == "default",
                         log=log)
    if opt.trace == "text":
        return text_trace(spec.experts, spec.top_k, spec.moe_layers, opt.tokens, log=log)
    if opt.trace == "synthetic":
        return synthetic_trace(spec.experts, spec.top_k, spec.moe_layers, opt.tokens)
    t = RoutingTrace.load(opt.trace)
    if t.num_experts != spec.experts or t.top_k != spec.top_k:
        raise ValueError(f"trace {opt.trace!r} routes top-{t.top_k} of {t.num_experts}, model {spec.name!r} "
                         f"needs top-{spec.top_k} of {spec.experts}")
    return t


def prepare_bench(opt: BenchOptions, log: Callable[[str], None] = print) -> BenchSetup:
    """Check the options, size the experts and load the routing trace (bad values fail here,
    before any row runs). `log` gets progress notes (recording a trace the first time)."""
    spec = get_model(opt.model)
    system = get_system(opt.system, gpu=opt.gpu, link=opt.link, ndp=opt.ndp)
    for r in opt.rows:
        if r not in ROWS:
            raise ValueError(f"unknown --policy row {r!r}; expected some of {ROWS}")
    if opt.cache_policy not in CACHE_POLICIES:
        raise ValueError(f"unknown --cache-policy {opt.cache_policy!r}; expected lru or lfu")
    topn = _topn_values(opt.topn, spec.top_k)
    ndp_cfg = system.ndp.ndp_config if system.ndp else None
    word_bits = ndp_cfg.word_bits if ndp_cfg else 128
    sizes = ExpertSizes(spec.hidden, spec.intermediate, QuantFormat(opt.bits, opt.group, word_bits),
                        QuantFormat(opt.hi_bits, opt.group, word_bits), opt.rank, ndp_cfg)
    fp16_sizes = ExpertSizes(spec.hidden, spec.intermediate, None, None, 0, ndp_cfg)
    cache_bytes = int(opt.cache_gb * 1e9)
    if not 0.0 <= opt.factor_share < 0.5:
        raise ValueError(f"--factor-share must be in [0, 0.5), not {opt.factor_share}")
    if cache_bytes < sizes.weight_bytes("lo"):
        raise ValueError(f"--cache-gb {opt.cache_gb} ({cache_bytes} bytes) is smaller than one "
                         f"{sizes.fmt} expert of {spec.name} ({sizes.weight_bytes('lo')} bytes)")
    trace = _routing_trace(opt, spec, log)
    return BenchSetup(opt, spec, system, sizes, fp16_sizes, topn, trace, assumed_sensitivity(spec.experts, opt.rank))


def _hobbit_threshold(trace: RoutingTrace, fraction: float) -> float:
    """Router weight above which the top slot gets its copy, so a `fraction` of tokens do."""
    if fraction >= 1.0:
        return 0.0
    top = torch.cat([w[:, 0] for w in trace.weights]).double()
    return float(torch.quantile(top, 1.0 - fraction)) if fraction > 0 else math.inf


def _row(setup: BenchSetup, label: str, policy: RestorationPolicy, variant: str, eviction: str,
         sizes: ExpertSizes) -> BenchRow:
    opt, system = setup.options, setup.system
    restores = isinstance(policy, BudgetedPolicy) or (isinstance(policy, TopN) and policy.n > 0)
    res = model_decode(label, setup.spec, system, sizes, policy, setup.trace, cache_bytes=setup.cache_bytes,
                       eviction=eviction, weight_variant=variant, batch=opt.batch, placement=opt.placement,
                       sensitivity=setup.sensitivity,
                       factor_cache_bytes=int(opt.factor_share * setup.cache_bytes) if restores else 0)
    s = res.summary
    ndp_read = s["ndp_words_per_token"] * (system.ndp.ndp_config.word_bytes if system.ndp else 0)
    return BenchRow(label, policy.name, eviction, **s, ndp_read_bytes_per_token=ndp_read,
                    moved_bytes_per_token=s["total_link_bytes_per_token"] + ndp_read,
                    gpu_hit_rate=res.cache_hit_rate,
                    planning_us_per_token_per_layer=res.planning_us_per_token_layer,
                    planning_total_us_per_token_per_layer=res.planning_total_us_per_token_layer)


def bench_rows(setup: BenchSetup) -> Iterator[BenchRow]:
    """The rows the options ask for, each as soon as it is computed. Rows that only calibrate
    others (uniform low-bit as the base, Top-n as the equal-bytes targets) run whether shown or not."""
    opt, sizes, ns, rows = setup.options, setup.sizes, setup.topn, setup.options.rows
    lo = (opt.cache_policy, sizes)
    top_bytes = {n: n * opt.rank * sizes.fp16_bytes_per_rank for n in ns}

    def at_equal_bytes(make_label, make_policy, x0: float, target: float, limit: float = math.inf) -> BenchRow:
        """make_policy(x) with x rescaled once so its extra bytes over uniform low-bit match
        `target` (bytes moved depend on the cache, so the nominal x only starts the search)."""
        x = max(0.0, min(x0, limit))
        extra = _row(setup, "", make_policy(x), "lo", *lo).moved_bytes_per_token - base.moved_bytes_per_token
        if extra > 0:
            # a target below zero (the smaller row moved fewer bytes than uniform, through the
            # cache) asks for nothing extra, not for a negative share
            x = min(limit, max(0.0, x * target / extra))
        return _row(setup, make_label(x), make_policy(x), "lo", *lo)

    if "fp16-lru" in rows:
        yield _row(setup, "fp16 + LRU", TopN(0), "fp16", "lru", setup.fp16_sizes)
    base = _row(setup, f"uniform int{opt.bits}", TopN(0), "lo", *lo)
    if "uniform" in rows:
        yield base
    top = {}
    for n in (ns if "topn" in rows or "adaptive" in rows else ns[:1]):
        row = _row(setup, f"ours top-{n} r{opt.rank}", TopN(n), "lo", *lo)
        top[n] = row.moved_bytes_per_token - base.moved_bytes_per_token
        if "topn" in rows:
            yield row
    if "adaptive" in rows:
        for n in ns:
            yield at_equal_bytes(lambda b, n=n: f"ours adaptive, {b / 1e3:.0f} kB/tok/layer (= top-{n} bytes)",
                                 BudgetedPolicy, top_bytes[n], top[n])
    if "hobbit" in rows and ns:
        # HOBBIT-style: the higher-precision copy of the top expert for a share of the tokens (those
        # with the largest top router weight), at the bytes Top-1 restoration adds.
        yield at_equal_bytes(lambda f: f"hobbit int{opt.hi_bits} top-1, {f:.1%} of tokens (= top-{ns[0]} bytes)",
                             lambda f: HobbitTopHi(1, _hobbit_threshold(setup.trace, f)),
                             # a copy no larger than the low-bit expert (int3 pads more than int4 on a
                             # thin expert at a wide port) costs nothing extra: every token gets one
                             top_bytes[ns[0]] / sizes.hi_extra_bytes if sizes.hi_extra_bytes > 0 else 1.0,
                             top[ns[0]], limit=1.0)


def cpu_reference_s() -> float:
    """CPU seconds of a fixed pure-Python loop, best of three: planning costs scale with it."""
    best = math.inf
    for _ in range(3):
        t0 = time.process_time()
        sum(range(10 ** 7))
        best = min(best, time.process_time() - t0)
    return best


def finish_bench(setup: BenchSetup, rows) -> BenchResult:
    return BenchResult(setup, tuple(rows), cpu_reference_s())


def run_bench(opt: BenchOptions, log: Callable[[str], None] = print) -> BenchResult:
    setup = prepare_bench(opt, log)
    return finish_bench(setup, bench_rows(setup))
