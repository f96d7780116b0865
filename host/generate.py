"""Text generation with every MoE layer through the runtime (`ndpmoe generate`).

    result = generate(GenerateOptions(prompt="...", max_new_tokens=32, bits=3, policy="top-2"))
    print(result.text); print(format_report(result))       # host/generate_report.py

The prompt runs in one forward pass (prefill), then one token per pass, greedy. Each MoE block
routes, plans and executes through host/runtime.py over a whole-model expert store on disk
(host/generate_store.py: the study's quantization, built once and cached), an expert cache of
the given capacity, the restoration policy, the placement and the NDP backend:

- ndp "none": GPU-only (the gpu-only system: all experts fetched over the link to the GPU backend);
- ndp "golden": GPU-NDP with the bit-exact functional NDP model (cycles from the cost model
  RTL_COSIM, fitted on co-simulated cycles);
- ndp "rtl": sim/generate_rtl.py runs the first tokens with the NDP on the Verilator-simulated
  unit and checks them against this module's golden run.

The system the planner prices plans with is gpu-only (ndp "none") or gpu-ndp with one unit of the
chosen NDP configuration at its clock (as the co-simulation does), so modeled and run NDP work
describe the same unit.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

NDP_MODES = ("none", "golden", "rtl")
DEVICES = ("cpu", "cuda", "auto")
MB = 1_000_000            # --cache-mb is in decimal megabytes, like the study's MB per token


@dataclass(frozen=True)
class ModelSpec:
    """Which model: "default" (the MoEfied SmolLM2) or a local checkpoint folder / .gguf file.
    layers: the MoE layers run through the runtime (None: all); on the default model the others
    stay dense (a reduced build, as the tests use), on a checkpoint they stay float MoE blocks.
    moefy_calib_tokens: the default model's MoEfication calibration size (None: its default)."""
    name: str = "default"
    layers: tuple[int, ...] | None = None
    moefy_calib_tokens: int | None = None

    def describe(self) -> str:
        which = "all MoE layers" if self.layers is None else f"MoE layers {list(self.layers)}"
        return f"{self.name} ({which})"


@dataclass(frozen=True)
class GenerateOptions:
    prompt: str
    max_new_tokens: int = 32
    model: ModelSpec = ModelSpec()
    bits: int = 3
    rank: int = 16
    hi_bits: int = 8
    policy: str = "none"
    placement: str = "auto"
    ndp: str = "golden"
    ndp_config: str = "default"
    cache_mb: float = 4.0
    eviction: str = "lru"
    device: str = "cpu"
    rtl_tokens: int = 4
    calib_tokens: int = 4096                 # the store's calibration (as `ndpmoe eval`'s default)
    stop_at_eos: bool = True
    verify_plans: bool = False
    factors: str = "fp16"                    # compensators: fp16 (+ int8 on the NDP) or packed int8/int4/int3
    prefetch: str = "auto"                   # next-layer prefetch: on, off, auto (on for CUDA: host/prefetch.py)

    def check(self) -> None:
        """Every argument checked before anything loads (the model, the store, the simulator)."""
        from ndpmoe.model.contract import get_config

        from .cache import EVICTIONS
        from .placement import PLACEMENTS
        from .policy import get_policy

        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("the prompt is empty: give some text to continue")
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, not {n!r}")
        if isinstance(self.cache_mb, bool) or not isinstance(self.cache_mb, (int, float)) or not self.cache_mb > 0:
            raise ValueError(f"cache_mb must be a positive number of megabytes, not {self.cache_mb!r}")
        if self.ndp not in NDP_MODES:
            raise ValueError(f"ndp must be one of {NDP_MODES}, not {self.ndp!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, not {self.placement!r}")
        if self.ndp == "none" and self.placement not in ("auto", "all-gpu"):
            raise ValueError(f"placement {self.placement!r} puts work on the NDP, but ndp is 'none'; "
                             f"use --ndp golden or rtl, or placement auto / all-gpu")
        if self.eviction not in EVICTIONS:
            raise ValueError(f"eviction must be one of {sorted(EVICTIONS)}, not {self.eviction!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, not {self.device!r}")
        from .prefetch import PREFETCH_MODES
        if self.prefetch not in PREFETCH_MODES:
            raise ValueError(f"prefetch must be one of {PREFETCH_MODES}, not {self.prefetch!r}")
        r = self.rtl_tokens
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"rtl_tokens must be a positive integer, not {r!r}")
        cfg = get_config(self.ndp_config)
        if self.ndp != "none" and self.bits not in cfg.bits:
            raise ValueError(f"NDP configuration {cfg.name!r} decodes {cfg.bits}-bit weights, not --bits {self.bits}; "
                             f"pick one of those or another --ndp-config")
        from ndpmoe.model.factor_quant import factor_bits
        fbits = factor_bits(self.factors)        # refuses an unknown precision, naming the allowed ones
        if fbits is not None and self.ndp != "none" and fbits not in cfg.bits:
            raise ValueError(f"NDP configuration {cfg.name!r} decodes {cfg.bits}-bit matrices, not --factors "
                             f"{self.factors}; pick one of those or another --ndp-config")
        self.store_settings()                    # bits, rank and hi_bits make a valid format
        get_policy(self.policy, 1 << 30)         # the spec's syntax; its n is checked against top-k later

    def store_settings(self):
        """The store's format: packed for the NDP port when there is a unit; without one, the
        study's own word (64 bits: a 128-bit word pads the default model's 64-input w2 rows to
        twice their bytes), so GPU-only bytes per token are the study's."""
        from ndpmoe.model.contract import get_config

        from .generate_store import StoreSettings
        from .study import Variant

        word_bits = Variant(self.bits).word_bits if self.ndp == "none" else get_config(self.ndp_config).word_bits
        from ndpmoe.model.factor_quant import factor_bits

        fbits = factor_bits(self.factors)
        return StoreSettings(bits=self.bits, rank=self.rank, hi_bits=self.hi_bits, word_bits=word_bits,
                             calib_tokens=self.calib_tokens, calib_rows=self.calib_tokens,
                             seq_len=min(512, self.calib_tokens), factor_bits=() if fbits is None else (fbits,))

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available (use --device cpu or auto)")
        return self.device


@dataclass
class GenerateResult:
    options: GenerateOptions
    model: str
    prompt_tokens: int
    tokens: list[int]                          # generated token ids
    text: str                                  # their decoded text
    steps: list                                # runtime.StepStats per forward pass (0: prefill)
    logits: list                               # [V] tensors per pass (kept when asked)
    cache: dict                                # capacity, hit rates, counters
    store: dict                                # folder, built or reused, seconds
    setup_s: dict                              # model load, store, NDP image placement
    system: str
    ndp_clock_mhz: float | None
    device: str
    interrupted: str | None = None             # where a Ctrl-C stopped the run
    extra: dict = field(default_factory=dict)

    @property
    def decode_steps(self) -> list:
        return self.steps[1:]

    @property
    def tokens_per_s(self) -> float | None:
        """Decode rate: tokens after the first over their passes' wall time (None before one)."""
        d = self.decode_steps
        total = sum(s.wall_s for s in d)
        return len(d) / total if d and total > 0 else None

    def link_equal(self) -> bool:
        return all(s.link_planned == s.link_executed for s in self.steps)

    def to_json(self) -> dict:
        return {"options": asdict(self.options), "model": self.model, "prompt_tokens": self.prompt_tokens,
                "tokens": self.tokens, "text": self.text, "steps": [s.to_json() for s in self.steps],
                "tokens_per_s": self.tokens_per_s, "link_executed_equals_planned": self.link_equal(),
                "cache": self.cache, "store": self.store, "setup_s": self.setup_s, "system": self.system,
                "ndp_clock_mhz": self.ndp_clock_mhz, "device": self.device, "interrupted": self.interrupted,
                **{k: v for k, v in self.extra.items() if k != "decisions"}}


def job_options(d: dict) -> GenerateOptions:
    """GenerateOptions back from `asdict` (the RTL run passes them to the simulator process)."""
    d = dict(d)
    m = dict(d.pop("model"))
    if m.get("layers") is not None:
        m["layers"] = tuple(m["layers"])
    return GenerateOptions(model=ModelSpec(**m), **d)


# ---------------------------------------------------------------------------------------------
# Pieces (also used by the RTL run inside the simulator and by the tests)
# ---------------------------------------------------------------------------------------------
def load_model(spec: ModelSpec, progress: bool = False):
    """A DefaultMoE-like object: .model, .tokenizer, .blocks {layer: (MoEWeights, RouterConfig)}, .text."""
    if spec.name == "default":
        from ndpmoe.model.default_moe import DEFAULT_CONFIG, load_default_moe

        cfg = DEFAULT_CONFIG if spec.moefy_calib_tokens is None else replace(DEFAULT_CONFIG, calib_tokens=spec.moefy_calib_tokens)
        return load_default_moe(cfg, layers=None if spec.layers is None else list(spec.layers), progress=progress)
    from pathlib import Path

    if not (Path(spec.name).is_dir() or (spec.name.endswith(".gguf") and Path(spec.name).is_file())):
        raise ValueError(f"model must be 'default', a checkpoint folder or a .gguf file, not {spec.name!r}")
    from .cmd_eval import load_study_model

    return load_study_model(spec.name, None, None, progress)


def runtime_layers(dm, spec: ModelSpec) -> list[int]:
    layers = sorted(dm.blocks) if spec.layers is None else sorted(spec.layers)
    missing = [l for l in layers if l not in dm.blocks]
    if missing:
        raise ValueError(f"layers {missing} are not MoE layers of {spec.name} (it has {sorted(dm.blocks)})")
    return layers


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    return list(tokenizer.encode(prompt))


def make_system(ndp: str, ndp_config: str):
    """gpu-only without an NDP; gpu-ndp with one unit of `ndp_config` at its clock otherwise."""
    from ndpmoe.model.contract import get_config

    from .ndp_cost import RTL_COSIM
    from .presets import NdpPreset, get_system

    if ndp == "none":
        return get_system("gpu-only")
    cfg = get_config(ndp_config)
    base = get_system("gpu-ndp")
    return replace(base, name=f"gpu-ndp+{cfg.name}x1",
                   ndp=NdpPreset(f"{cfg.name}x1", config=cfg.name, units=1, clock_mhz=cfg.clock_mhz, cost=RTL_COSIM))


def check_fit(opts: GenerateOptions, dm, layers: list[int]) -> int:
    """Before the store is built: the cache holds at least one expert, and the NDP configuration
    can run the model's experts and hold every layer's images. Returns the NDP memory needed."""
    from ndpmoe.model.contract import get_config

    from .runtime import ndp_memory_bytes

    w, _ = dm.blocks[layers[0]]
    s = opts.store_settings()
    plain = s.sizes(w.hidden, w.intermediate)
    cache_bytes = int(opts.cache_mb * MB)
    if cache_bytes < plain.weight_bytes("lo"):
        raise ValueError(f"--cache-mb {opts.cache_mb:g} ({cache_bytes} bytes) is smaller than one expert of this "
                         f"model ({plain.weight_bytes('lo')} bytes: w1, w3, w2 at {s.bits} bits, "
                         f"{w.intermediate} x {w.hidden}); give at least {plain.weight_bytes('lo') / MB:.3f}")
    if opts.ndp == "none":
        return 0
    cfg = get_config(opts.ndp_config)
    try:
        sizes = s.sizes(w.hidden, w.intermediate, cfg, opts.factors)
        sizes.ndp_steps("lo", 1, True, sizes.stored_rank)
    except ValueError as exc:
        raise ValueError(f"NDP configuration {cfg.name!r} does not fit this model's experts "
                         f"({w.intermediate} x {w.hidden}, rank {s.rank}): {exc}") from None
    need = ndp_memory_bytes(sizes, w.num_experts, len(layers))
    if need > cfg.mem_bytes:
        raise ValueError(f"NDP configuration {cfg.name!r} addresses {cfg.mem_bytes} bytes, but the {len(layers)} "
                         f"MoE layers' images need {need} bytes; use a configuration with more memory or fewer layers")
    return need


def ndp_backend(opts: GenerateOptions, mem_bytes: int):
    from ndpmoe.model.contract import get_config

    from .ndp import GoldenNdpBackend
    from .ndp_cost import RTL_COSIM

    cfg = get_config(opts.ndp_config)
    return GoldenNdpBackend(cfg, round_memory(mem_bytes, cfg), cost=RTL_COSIM)


def round_memory(mem_bytes: int, cfg) -> int:
    """Whole MiB (a multiple of every port width), capped at what the configuration addresses."""
    return min(cfg.mem_bytes, -(-mem_bytes // (1 << 20)) * (1 << 20))


class TextStream:
    """Turns token ids into text pieces as they come (a piece may wait for the next token when
    the tokenizer has not finished a character)."""

    def __init__(self, tokenizer, emit: Callable[[str], None] | None):
        self.tokenizer, self.emit = tokenizer, emit
        self.ids: list[int] = []
        self.text = ""

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        if self.emit is not None and text.startswith(self.text):
            self.emit(text[len(self.text):])
        self.text = text


def prefetch_summary(rt) -> dict | None:
    """The next-layer prefetch's totals over the run (None when it was off)."""
    pf = rt.prefetcher
    if pf is None:
        return None
    return {"budget_bytes": pf.budget_bytes, **pf.stats.to_json()}


def cache_report(cache) -> dict:
    st = cache.stats
    kinds = sorted(set(st.hits) | set(st.misses))
    return {"capacity_bytes": cache.capacity_bytes, "used_bytes": cache.used_bytes, "entries": len(cache),
            "eviction": cache.eviction.name, "hit_rate": {k: st.hit_rate(k) for k in kinds}, **st.to_json()}


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def prepare(opts: GenerateOptions, dm=None, *, log=print, progress: bool = False):
    """Check the options, load the model (unless given), check the prompt and the fits, open or
    build the store. Returns (dm, layers, prompt ids, ModelStore, NDP memory bytes, seconds)."""
    from .generate_store import model_store
    from .policy import get_policy
    from .decode import check_lengths, context_length

    opts.check()
    setup = {}
    t0 = time.perf_counter()
    if dm is None:
        dm = load_model(opts.model, progress=progress)
    setup["model_load_s"] = time.perf_counter() - t0
    layers = runtime_layers(dm, opts.model)
    prompt_ids = encode_prompt(dm.tokenizer, opts.prompt)
    check_lengths(len(prompt_ids), opts.max_new_tokens, context_length(dm.model))
    policy = get_policy(opts.policy, dm.blocks[layers[0]][1].top_k)
    mem = check_fit(opts, dm, layers)
    ms = model_store(dm, opts.store_settings(), layers=layers, name=opts.model.describe(), progress=progress, log=log,
                     gain_tables=getattr(policy, "needs_gain_tables", False))
    setup["store_s"] = ms.seconds
    return dm, layers, prompt_ids, ms, mem, setup


def make_runtime(opts: GenerateOptions, dm, ms, mem: int, ndp=None, *, record: bool = False):
    """The runtime over `ms` for `opts` (ndp: an NdpBackend to use instead of the golden one)."""
    from .policy import get_policy
    from .prefetch import prefetch_enabled
    from .runtime import ModelRuntime

    layers = sorted(ms.layer_index)
    policy = get_policy(opts.policy, dm.blocks[layers[0]][1].top_k)
    if getattr(policy, "needs_gain_tables", False):              # host/gain_policy.py
        from .gain_tables import load_gain_tables

        policy = policy.bind(load_gain_tables(ms.store), opts.factors, ms.store.hi_fmt and ms.store.hi_fmt.bits)
    if opts.ndp != "none" and ndp is None:
        ndp = ndp_backend(opts, mem)
    return ModelRuntime(ms, dm.blocks, policy=policy, placement=opts.placement, cache_bytes=int(opts.cache_mb * MB),
                        eviction=opts.eviction, ndp=None if opts.ndp == "none" else ndp,
                        system=make_system(opts.ndp, opts.ndp_config), device=opts.resolved_device(),
                        prefetch=opts.placement == "auto",      # a forced placement never uses prefetched copies
                        record=record, verify=opts.verify_plans, factor_precision=opts.factors,
                        prefetch_next=prefetch_enabled(opts.prefetch, opts.resolved_device()))


def run_decode(opts: GenerateOptions, dm, rt, prompt_ids: list[int], *, max_new_tokens: int | None = None,
               on_text: Callable[[str], None] | None = None, keep_logits: bool = False):
    """Decode through an installed runtime. Returns (tokens, text, logits, interrupted)."""
    from .decode import greedy_steps

    device = opts.resolved_device()
    n = opts.max_new_tokens if max_new_tokens is None else max_new_tokens
    stream = TextStream(dm.tokenizer, on_text)
    eos = getattr(dm.tokenizer, "eos_token_id", None) if opts.stop_at_eos else None
    tokens, logits, interrupted = [], [], None
    try:
        for step in greedy_steps(dm.model, prompt_ids, n, before_step=lambda i, t: rt.begin_step(t),
                                 device=device, eos_id=eos):
            rt.end_step(step.seconds)
            tokens.append(step.token)
            if keep_logits:
                logits.append(step.logits)
            stream.add(step.token)
    except KeyboardInterrupt:
        del rt.steps[len(tokens):]            # a pass whose token was not delivered is not counted
        where = rt.position
        layer = f", in MoE layer {where[1]}" if where is not None else ""
        interrupted = (f"interrupted after {len(tokens)} of {n} new tokens "
                       f"(while computing token {len(tokens) + 1}{layer})")
    return tokens, stream.text, logits, interrupted


def reference_generate(dm, prompt: str, max_new_tokens: int, *, layers: list[int] | None = None,
                       stop_at_eos: bool = True) -> dict:
    """The same greedy decode with the float MoE blocks (the study's "fp16 experts" row: every
    expert unquantized, computed in float32), not through the runtime: the continuation the
    low-bit runs are read against."""
    import torch

    from ndpmoe.model.block import FloatMoE, set_blocks

    from .decode import greedy_steps

    layers = sorted(dm.blocks) if layers is None else layers
    set_blocks(dm.model, {l: FloatMoE(*dm.blocks[l]) for l in layers})
    ids = encode_prompt(dm.tokenizer, prompt)
    eos = getattr(dm.tokenizer, "eos_token_id", None) if stop_at_eos else None
    with torch.inference_mode():
        steps = list(greedy_steps(dm.model, ids, max_new_tokens, eos_id=eos))
    tokens = [s.token for s in steps]
    decode = [s.seconds for s in steps[1:]]
    return {"tokens": tokens, "text": dm.tokenizer.decode(tokens, skip_special_tokens=True),
            "prefill_s": steps[0].seconds, "tokens_per_s": len(decode) / sum(decode) if decode else None}


def generate(opts: GenerateOptions, dm=None, *, on_text: Callable[[str], None] | None = None, log=print,
             keep_logits: bool = False, record: bool = False, progress: bool = False) -> GenerateResult:
    """Generate with the NDP (if any) on the golden backend. A Ctrl-C during decoding returns
    the tokens so far with `interrupted` saying where it stopped; one during the store build
    leaves no store behind and propagates."""
    if opts.ndp == "rtl":
        raise ValueError("ndp 'rtl' runs inside the simulator: call ndpmoe.sim.generate_rtl.generate_rtl")
    import torch

    dm, layers, prompt_ids, ms, mem, setup = prepare(opts, dm, log=log, progress=progress)
    device = opts.resolved_device()
    if device != "cpu":
        dm.model.to(device)
    t0 = time.perf_counter()
    rt = make_runtime(opts, dm, ms, mem, record=record)
    setup["runtime_s"] = time.perf_counter() - t0
    setup["ndp_placement_s"] = rt.setup_s
    rt.install(dm.model)
    with torch.inference_mode():
        tokens, text, logits, interrupted = run_decode(opts, dm, rt, prompt_ids, on_text=on_text,
                                                       keep_logits=keep_logits)
    result = GenerateResult(opts, opts.model.describe(), len(prompt_ids), tokens, text, rt.steps, logits,
                            cache_report(rt.cache), {"folder": str(ms.store.folder), "built": ms.built,
                                                     "bytes": ms.store.manifest.tensors_bytes},
                            setup, rt.system.name, rt.system.ndp.clock_mhz if rt.system.ndp else None, device,
                            interrupted)
    result.extra.update(prompt_ids=prompt_ids, layer_index=dict(ms.layer_index), ndp_memory_bytes=mem,
                        store_key=ms.key, prefetch=prefetch_summary(rt))
    if record:
        result.extra["decisions"] = rt.decisions          # tensors: left out of to_json
    return result
