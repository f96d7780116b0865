"""The accuracy-against-bandwidth study: perplexity of a whole model whose MoE blocks are
quantized, compensated and restored by a policy, against the bytes each token moves.

The study decides through the runtime's own policy objects (host/policy.py), token by token as
batch-1 decode does, and prices through the contract's sizes (host/sizes.py).

Bytes per token (the paper's metric, batch-1 decode with nothing cached): summed over MoE layers,
for each of the token's k experts its low-bit memory image (weights + metadata; the
higher-precision image where the policy chose that copy), plus the factors of the rank it
was restored with (fp16, or packed low-bit rows at the variant's factor precision). Attention,
embeddings and the always-on shared expert are the same in every configuration and are not counted.

One calibration pass gives each layer's block inputs; every configuration then reuses the
quantized experts of its (bits, quantizer, fit) and only re-runs the model with a new policy.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ndpmoe.model.block import FloatMoE, set_blocks
from ndpmoe.model.contract import QuantFormat
from ndpmoe.model.factor_quant import factor_bits, fit_quantized_matrices
from ndpmoe.model.moe import RouterConfig, route
from ndpmoe.model.moe_quant import MATRICES, QuantizedExpert, QuantizedMoE, check_block_fits, expert_grams
from ndpmoe.model.moe_quant_masked import MaskedQuantMoE
from ndpmoe.model.perplexity import collect_mlp_inputs, perplexity, perplexity_of
from ndpmoe.model.rank_alloc import allocate_by_kurtosis, allocate_ranks, kurtosis
from ndpmoe.model.threads import threads_for, torch_threads
from ndpmoe.model.paths import cache_dir

from .paired_stats import layer_error_of
from .policy import RestorationContext, RestorationPolicy, TopN, decode_restoration, restoration_context
from .sensitivity import measure_sensitivity
from .sizes import ExpertSizes
from .study_cache import StudyCache, model_fingerprint, tensor_hash
from .study_parts import compensator_part, quantized_part


ALLOC_RULES = ("gain", "kurtosis")


@dataclass(frozen=True)
class Variant:
    """How every expert of the model is stored: bits, quantizer, compensator fit and rank."""
    bits: int
    quantizer: str = "optimized"
    fit: str = "aware"
    rank: int = 0                       # stored rank (uniform), unless `alloc_budget` is set
    hi_bits: int | None = None          # higher-precision copies (HOBBIT-style), if any
    alloc_budget: float | None = None   # rank allocation: fp16 factor bytes per layer to spread
    group: int = 64
    # Memory word of the packed images. 64-bit words suit the default model's small experts: a
    # 3-bit block holds `word_bits` codes, so 128-bit words would pad a 64-wide w2 row to 128.
    word_bits: int = 64
    # How the compensators are stored: fp16, or packed low-bit rows (model/factor_quant.py),
    # fitted against their own quantization.
    factor: str = "fp16"
    # How alloc_budget is spread: "gain" (measured calibration reduction per byte, greedy) or
    # "kurtosis" (ranks proportional to each matrix's weight kurtosis, the paper's and MiLo's rule).
    alloc_rule: str = "gain"

    def __post_init__(self):
        factor_bits(self.factor)                    # refuses an unknown precision, naming the allowed ones
        if self.alloc_rule not in ALLOC_RULES:
            raise ValueError(f"alloc_rule must be one of {ALLOC_RULES}, not {self.alloc_rule!r}")
        if self.factor != "fp16" and (self.fit != "aware" or self.alloc_budget):
            raise ValueError(f"factor precision {self.factor!r} is fitted activation-aware with a uniform rank; "
                             f"fit {self.fit!r} with alloc_budget {self.alloc_budget!r} is not supported")

    @property
    def label(self) -> str:
        s = f"int{self.bits}-{self.quantizer}"
        if self.rank or self.alloc_budget:
            s += f"+{self.fit}" + (f"-alloc{self.alloc_budget / 1e3:.0f}kB" if self.alloc_budget else f"-r{self.rank}")
            s += "-kurtosis" if self.alloc_budget and self.alloc_rule == "kurtosis" else ""
            s += "" if self.factor == "fp16" else f"-{self.factor}f"
        return s + (f"+hi{self.hi_bits}" if self.hi_bits else "")

    @property
    def fmt(self) -> QuantFormat:
        return QuantFormat(self.bits, self.group, self.word_bits)


def block_sizes(qm: QuantizedMoE) -> ExpertSizes:
    """The contract's sizes of a quantized block's experts; stored rank: the largest any matrix holds."""
    w1 = qm.experts[0].q["w1"]
    hi_fmt = None if qm.hi_experts is None else qm.hi_experts[0].q["w1"].fmt
    stored = max(ex.stored_rank(m) for ex in qm.experts for m in MATRICES)
    return ExpertSizes(w1.in_features, w1.rows, qm.fmt, hi_fmt, stored)


def slot_bytes(qm: QuantizedMoE, sizes: ExpertSizes, e: int, rank: int, hi: bool, factor: str = "fp16") -> int:
    """Bytes one (token, expert) slot moves: the expert's image (the higher-precision one where
    chosen), plus the factors (stored at `factor` precision) it was restored with, each matrix up
    to its own stored rank."""
    if hi:
        return sizes.weight_bytes("hi")
    ex = qm.experts[e]
    return sizes.weight_bytes("lo") + sum(sizes.matrix_factor_bytes(m, min(rank, ex.stored_rank(m)), factor)
                                          for m in MATRICES)


class LayerRunner:
    """The block function of one layer under a policy; tallies bytes and slots as it runs."""

    def __init__(self, qm: QuantizedMoE, policy: RestorationPolicy, ctx: RestorationContext, cfg: RouterConfig,
                 factor: str = "fp16"):
        self.qm, self.policy, self.ctx, self.cfg, self.factor = qm, policy, ctx, cfg, factor
        self.sizes = block_sizes(qm)
        self.block = MaskedQuantMoE(qm)        # moe_forward_quant's result, all experts at once
        self.bytes = 0
        self.tokens = 0

    def decide(self, ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """restore [T, K] ranks and hi [T, K] flags, each token decided as batch-1 decode would."""
        res = decode_restoration(self.policy, ids, weights, self.ctx)
        return res.restore_tensor(), res.hi_tensor()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = route(x, self.qm.router, self.cfg)
        restore, hi = self.decide(ids, weights)
        price = {}
        for e, r, h in zip(ids.flatten().tolist(), restore.flatten().tolist(), hi.flatten().tolist()):
            key = (e, r, h)
            if key not in price:
                price[key] = slot_bytes(self.qm, self.sizes, e, r, h, self.factor)
            self.bytes += price[key]
        self.tokens += x.shape[0]
        return self.block(x, restore, hi, (ids, weights))

    def held_out(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output under the same decisions, without tallying bytes."""
        ids, weights = route(x, self.qm.router, self.cfg)
        restore, hi = self.decide(ids, weights)
        return self.block(x, restore, hi, (ids, weights))


PolicyChoice = RestorationPolicy | Callable[[int], RestorationPolicy]


class Study:
    """Holds the model, its calibration statistics and the quantized variants built so far."""

    scale = None        # host/study_workers.ScaleOut: computes each variant's parts ahead (device, Ray)

    def __init__(self, dm, eval_windows: torch.Tensor, calib_windows: torch.Tensor, calib_rows: int = 4096,
                 progress: bool = True, quant_layers: list[int] | None = None, block_rows: int = 1024,
                 cache_root: Path | None | str = "default", gain_rows: int = 1024):
        """quant_layers: the MoE layers the study quantizes and counts (default: all); the others
        stay float MoE blocks, so a reduced run keeps the whole model's perplexity meaningful.
        cache_root: where quantized experts and compensators are cached ("default": the project
        cache, None: not at all)."""
        self.dm = dm
        self.eval_windows = eval_windows
        self.progress = progress
        self.layers = sorted(dm.blocks) if quant_layers is None else sorted(quant_layers)
        missing = set(self.layers) - set(dm.blocks)
        if missing:
            raise ValueError(f"quant_layers {sorted(missing)} are not MoE layers of this model ({sorted(dm.blocks)})")
        self.float_blocks = {l: FloatMoE(w, rc) for l, (w, rc) in dm.blocks.items()}
        # Quantizers, fits and gain measurements are many small operations on small experts:
        # one thread (model/threads.py); the perplexity passes keep torch's own count.
        self.part_threads = threads_for(max((dm.blocks[l][0].w1[0].numel() for l in self.layers), default=0))
        t0 = time.time()
        set_blocks(dm.model, self.float_blocks)
        calib = collect_mlp_inputs(dm.model, calib_windows, max_rows=calib_rows, layers=self.layers,
                                   progress=progress)
        self.grams = {l: expert_grams(*dm.blocks[l], calib[l]) for l in self.layers}
        # A share of the calibration rows (already a random draw) is kept: the measured-gain
        # budgeted policy runs every expert's options on them (host/budget_study.py).
        self.calib_inputs = {l: calib[l][:gain_rows] for l in self.layers}
        # Held-out block inputs of the float model: each configuration's layer-output error is
        # measured on them (a low-noise companion of perplexity for small runs).
        # The same pass gives the float model's per-token NLLs: the fp16 row reuses them.
        self._float_nll: list[torch.Tensor] = []
        self.eval_inputs = collect_mlp_inputs(dm.model, eval_windows, max_rows=block_rows, layers=self.layers,
                                              progress=False, token_nll=self._float_nll)
        self.eval_refs = {l: self.float_blocks[l](x) for l, x in self.eval_inputs.items()}
        # per held-out row, the float block's squared output norm [layers, rows]: the denominator
        # of the layer error and of its paired intervals (host/paired_stats.paired_layer_error)
        self.eval_ref_sq = torch.stack([self.eval_refs[l].double().square().sum(1) for l in self.layers])
        self.calib_seconds = time.time() - t0
        if cache_root == "default":
            cache_root = cache_dir() / "study"
        h = hashlib.sha256()
        tensor_hash(h, calib_windows)
        self.cache = StudyCache(cache_root, model_fingerprint(dm.model, dm.blocks, f"{h.hexdigest()}|{calib_rows}"))
        self._variants: dict[Variant, dict[int, QuantizedMoE]] = {}
        self._sens: dict[Variant, dict] = {}
        self.rows: list[dict] = []
        # Each row's per-prediction NLLs (aligned with `rows`), kept in memory for the paired
        # intervals of the verdicts; study.json stores the intervals, not these.
        self.token_nlls: list[torch.Tensor] = []
        # Each row's squared output error per held-out row [layers, rows] (aligned with `rows`),
        # for the paired intervals of the layer-error verdicts.
        self.row_errors: list[torch.Tensor] = []

    # -- building variants ---------------------------------------------------------------------
    def variant(self, v: Variant) -> dict[int, QuantizedMoE]:
        if v not in self._variants:
            with torch_threads(self.part_threads):
                self._variants[v] = self._build(v)
        return self._variants[v]

    def _build(self, v: Variant) -> dict[int, QuantizedMoE]:
        if self.scale is not None:
            self.scale.prefetch(self, v)
        if v.alloc_budget:
            base = self.variant(Variant(v.bits, v.quantizer, v.fit, v.rank, None, None, v.group, v.word_bits, v.factor))
            out = {l: _with_allocated_ranks(qm, v.alloc_budget, v.alloc_rule) for l, qm in base.items()}
        elif v.rank:
            out = {l: self._compensated(l, v) for l in self.layers}
        else:
            out = {l: self._quantized(l, v) for l in self.layers}
        if v.hi_bits:
            hi = self.variant(Variant(v.hi_bits, v.quantizer, group=v.group, word_bits=v.word_bits))
            out = {l: QuantizedMoE(qm.fmt, qm.experts, qm.router, qm.cfg, qm.float_weights, hi[l].experts)
                   for l, qm in out.items()}
        return out

    def _quantized(self, layer: int, v: Variant) -> QuantizedMoE:
        """The layer's low-bit experts without compensators (shared by every fit and rank)."""
        plain = Variant(v.bits, v.quantizer, group=v.group, word_bits=v.word_bits)
        if plain in self._variants:
            return self._variants[plain][layer]
        w, rc = self.dm.blocks[layer]
        fmt = v.fmt
        check_block_fits(w, fmt, layer)
        key = self.cache.key(layer, f"q|{v.bits}|{v.quantizer}|{v.group}|{v.word_bits}")
        # The whole stack of experts at once: in float64 the same matrices, bit for bit, as
        # quantize_moe's one expert at a time (tests/test_study_workers.py), in a fraction of the time.
        qs = self.cache.quantized(key, fmt, lambda: quantized_part(w, self.grams[layer], fmt, v.quantizer))
        return QuantizedMoE(fmt, [QuantizedExpert(q) for q in qs], w.router, rc, w)

    def _compensated(self, layer: int, v: Variant) -> QuantizedMoE:
        base = self.variant(Variant(v.bits, v.quantizer, group=v.group, word_bits=v.word_bits))[layer]
        key = self.cache.key(layer, f"c|{v.bits}|{v.quantizer}|{v.group}|{v.word_bits}|{v.fit}|{v.rank}"
                             + ("" if v.factor == "fp16" else f"|{v.factor}"))
        if v.factor == "fp16":       # stacked, as compensate_moe computes them (bit for bit in float64)
            make = lambda: compensator_part(base.float_weights, [ex.q for ex in base.experts], self.grams[layer],
                                            v.fit, v.rank)
        else:
            make = lambda: self._quantized_factors(layer, base, v)
        comps = self.cache.compensators(key, make)
        experts = [QuantizedExpert(ex.q, comps[e], ex._deq) for e, ex in enumerate(base.experts)]
        return QuantizedMoE(base.fmt, experts, base.router, base.cfg, base.float_weights)

    def _quantized_factors(self, layer: int, base: QuantizedMoE, v: Variant) -> list[dict]:
        """Per expert {matrix: LowRank}: the dequantized factors of a compensator fitted against
        its own quantization at v.factor (what the GPU applies; the bytes are the packed rows')."""
        w = base.float_weights
        bits = factor_bits(v.factor)
        out = []
        for e, ex in enumerate(base.experts):
            # float64 whatever --precision says: float32 moves one of SmolLM2's nine matrices by 0.27%
            # (`ndpmoe quant-bench --precision-check`), over the 0.1% rule
            errs = {m: getattr(w, m)[e].float() - ex.weight(m) for m in MATRICES}
            fits = fit_quantized_matrices(errs, self.grams[layer][e], v.rank, bits, group=v.group,
                                          word_bits=v.word_bits)
            out.append({m: f.lowrank() for m, f in fits.items()})
        return out

    def sensitivity(self, v: Variant) -> dict:
        if v not in self._sens:
            blocks = self.variant(v)
            with torch_threads(self.part_threads):
                self._sens[v] = {l: measure_sensitivity(qm, self.grams[l]) for l, qm in blocks.items()}
        return self._sens[v]

    # -- evaluating ----------------------------------------------------------------------------
    def context(self, layer: int, v: Variant, with_sensitivity: bool) -> RestorationContext:
        """What a policy knows of one layer of a variant: the contract's prices (fp16 factors,
        nothing cached, batch-1 decode) and, if asked, the measured sensitivity."""
        sens = self.sensitivity(v)[layer] if with_sensitivity else None
        sizes = block_sizes(self.variant(v)[layer])
        return replace(restoration_context(sizes, sens), rank_bytes=sizes.factor_bytes_per_rank(v.factor))

    def run(self, name: str, v: Variant | None, policy: PolicyChoice | None = None, **meta) -> dict:
        """Perplexity and bytes/token of one configuration. v None: the float (fp16) model.
        policy: one RestorationPolicy for every layer, or a function of the layer returning one
        (called once per layer and run); None restores nothing."""
        t0 = time.time()
        nll: list[torch.Tensor] = []
        if v is None:
            # the float model's pass ran with the calibration's held-out inputs (the same numbers)
            set_blocks(self.dm.model, self.float_blocks)
            nll = list(self._float_nll)
            ppl = perplexity_of(nll)
            bpt = 0
            for l in self.layers:
                w, rc = self.dm.blocks[l]
                intermediate, hidden = w.w1.shape[1:]
                bpt += ExpertSizes(hidden, intermediate, None).weight_bytes("fp16") * rc.top_k
        else:
            policy = TopN(0) if policy is None else policy
            policy_of = policy if callable(policy) else (lambda l: policy)
            runners = {}
            for l, qm in self.variant(v).items():
                p = policy_of(l)
                runners[l] = LayerRunner(qm, p, self.context(l, v, p.needs_sensitivity), qm.cfg, v.factor)
            return self.run_runners(name, runners, variant=v.label, t0=t0, **meta)
        row = dict(name=name, variant=None, ppl=ppl, bytes_per_token=bpt,
                   layer_err=0.0, seconds=round(time.time() - t0, 1), **meta)
        self._add_row(row, nll, torch.zeros_like(self.eval_ref_sq))
        return row

    def run_runners(self, name: str, runners: dict, variant: str | None = None, t0: float | None = None,
                    **meta) -> dict:
        """Perplexity, bytes/token and held-out layer error with these block functions in the
        quantized layers (each tallies .bytes and .tokens, and has .held_out(x) for the layer error)."""
        t0 = time.time() if t0 is None else t0
        nll: list[torch.Tensor] = []
        set_blocks(self.dm.model, {**self.float_blocks, **runners})
        ppl = perplexity(self.dm.model, self.eval_windows, progress=self.progress, desc=name, token_nll=nll)
        bpt = sum(r.bytes / max(r.tokens, 1) for r in runners.values())
        err, row_sq = self.layer_error(runners)
        row = dict(name=name, variant=variant, ppl=ppl, bytes_per_token=bpt, layer_err=err,
                   seconds=round(time.time() - t0, 1), **meta)
        self._add_row(row, nll, row_sq)
        return row

    def _add_row(self, row: dict, nll: list[torch.Tensor], row_sq: torch.Tensor) -> None:
        self.rows.append(row)
        self.token_nlls.append(torch.cat([t.reshape(-1).double() for t in nll]))
        self.row_errors.append(row_sq)

    def layer_error(self, runners: dict[int, "LayerRunner"]) -> tuple[float, torch.Tensor]:
        """RMS over layers of ||block(x) - float block(x)|| / ||float block(x)|| on held-out inputs,
        and the squared error per held-out row [layers, rows] (float64)."""
        if sorted(runners) != self.layers:
            raise ValueError(f"a layer error needs a block for every studied layer {self.layers}, not {sorted(runners)}")
        row_sq = torch.stack([(runners[l].held_out(self.eval_inputs[l]) - self.eval_refs[l]).double().square().sum(1)
                              for l in self.layers])
        return float(layer_error_of(row_sq.sum(1), self.eval_ref_sq.sum(1))), row_sq


def _with_allocated_ranks(qm: QuantizedMoE, budget: float, rule: str = "gain") -> QuantizedMoE:
    """Truncate a block's stored compensators to ranks allocated under `budget` bytes of fp16
    factors for the whole layer: "gain" greedily by each component's calibration output-error
    reduction (the activation-aware fit's spectrum) per byte; "kurtosis" in proportion to each
    matrix's weight kurtosis (model/rank_alloc.allocate_by_kurtosis)."""

    sizes = block_sizes(qm)
    gains, cost, kurt = {}, {}, {}
    for e, ex in enumerate(qm.experts):
        for m in MATRICES:
            if m in ex.comp:
                gains[(e, m)] = ex.comp[m].spectrum
                cost[(e, m)] = sizes.matrix_factor_bytes_fp16(m, 1)
                kurt[(e, m)] = kurtosis(getattr(qm.float_weights, m)[e]) + 3.0
    if rule == "kurtosis":
        ranks = allocate_by_kurtosis(kurt, cost, budget, max(ex.comp[m].rank for ex in qm.experts for m in ex.comp))
    else:
        ranks = allocate_ranks(gains, cost, budget)
    experts = []
    for e, ex in enumerate(qm.experts):
        comp = {m: ex.comp[m].truncate(ranks[(e, m)]) for m in ex.comp if ranks[(e, m)] > 0}
        experts.append(QuantizedExpert(ex.q, comp, ex._deq))
    return QuantizedMoE(qm.fmt, experts, qm.router, qm.cfg, qm.float_weights, qm.hi_experts)
