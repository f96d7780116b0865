"""The study at scale: each variant's per-layer parts (low-bit experts, compensators) computed
ahead of the study on stacks of experts, on a chosen device, in float32 if asked, and spread over
Ray workers (`ndpmoe eval --workers N`, `--ray-address HOST:PORT`).

Every part goes through the study cache under the key the study itself reads (atomic writes,
keyed by content), so the study then finds it there; a killed worker's task is retried and a
torn file is never read. float64 (the default) computes what the one-expert-at-a-time path
computes, bit for bit, under the same keys; float32 parts live under keys of their own.
With workers every task runs one torch thread, so 1 and 2 workers give identical tables.

The hook: Study.variant calls `study.scale.prefetch(study, v)` when `study.scale` is set.
Not spread yet: calibration statistics (one forward pass in the study's constructor) and
sensitivities (in memory, per variant).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PRECISIONS = ("float64", "float32")


def add_arguments(p) -> None:
    g = p.add_argument_group("scale (real checkpoints)")
    g.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"),
                   help="where quantizers, fits and the perplexity passes run (cuda: a model larger than the "
                        "GPU keeps some layers in host memory)")
    g.add_argument("--precision", default="float64", choices=PRECISIONS,
                   help="arithmetic of quantizers and fits: float64 (the reference, the study's cached results) or "
                        "float32 (held-out output error within 0.1%%, `ndpmoe quant-bench --precision-check`)")
    g.add_argument("--workers", type=int, default=0,
                   help="quantize and fit layers as Ray tasks on N local workers (0: in this process)")
    g.add_argument("--ray-address", default=None, help="join an existing Ray cluster at HOST:PORT instead")


@dataclass(frozen=True)
class ScaleOptions:
    device: str = "cpu"
    precision: str = "float64"
    workers: int = 0
    ray_address: str | None = None

    @classmethod
    def from_args(cls, args) -> "ScaleOptions":
        """Checked before any work: the device exists, the Ray address answers."""
        from ndpmoe.model.ray_runtime import check_spread

        from .devices import choose_device

        opts = cls(getattr(args, "device", "cpu"), getattr(args, "precision", "float64"),
                   getattr(args, "workers", 0), getattr(args, "ray_address", None))
        if opts.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, not {opts.precision!r}")
        check_spread(opts.workers, opts.ray_address)
        choose_device(opts.device)
        return opts

    @property
    def active(self) -> bool:
        return self.device != "cpu" or self.precision != "float64" or bool(self.workers) or bool(self.ray_address)


def part_keys(v) -> list[tuple[str, str]]:
    """(kind, part string) of every cache part variant v needs, in the study's own key format."""
    q = lambda bits: ("q", f"q|{bits}|{v.quantizer}|{v.group}|{v.word_bits}")
    out = [q(v.bits)]
    if v.rank:
        out.append(("c", f"c|{v.bits}|{v.quantizer}|{v.group}|{v.word_bits}|{v.fit}|{v.rank}"))
    if v.hi_bits:
        out.append(q(v.hi_bits))
    return out


def cache_for_precision(cache, precision: str):
    """float32 parts under keys of their own (the cache's context, plus the precision)."""
    if precision == "float64":
        return cache
    from .study_cache import StudyCache

    other = StudyCache(cache.root, "")
    other._context = f"{cache._context}|{precision}"
    return other


class ScaleOut:
    """Attached to a Study (study.scale): fills the cache with each variant's parts first."""

    def __init__(self, opts: ScaleOptions, resources: dict | None = None, log=print):
        from .devices import choose_device

        self.opts = opts
        self.device = choose_device(opts.device)
        self.resources = resources                    # None: in this process
        self.log = log
        self.tasks = 0

    def attach(self, study) -> None:
        if study.cache.root is None:
            raise ValueError("--workers, --device and --precision float32 compute through the study cache, "
                             "which is off (cache_root=None)")
        study.cache = cache_for_precision(study.cache, self.opts.precision)
        study.scale = self

    def prefetch(self, study, v) -> None:
        jobs = []                                     # (kind, layer, part string) not in the cache yet
        for kind, part in part_keys(v):
            for layer in study.layers:
                key = study.cache.key(layer, part)
                if not study.cache.path(key).exists():
                    jobs.append((kind, layer, part))
        if not jobs:
            return
        t0 = time.time()
        q_jobs = [j for j in jobs if j[0] == "q"]
        c_jobs = [j for j in jobs if j[0] == "c"]
        for batch in (q_jobs, c_jobs):               # compensators load the low-bit experts first
            calls = []
            for kind, layer, part in batch:
                bits = int(part.split("|")[1])
                fit = part.split("|")[5] if kind == "c" else None
                qkey = study.cache.key(layer, f"q|{bits}|{v.quantizer}|{v.group}|{v.word_bits}")
                calls.append((kind, str(study.cache.root), qkey, study.cache.key(layer, part), layer, bits,
                              v.quantizer, v.group, v.word_bits, fit, v.rank))
            self._run(study, calls)
        self.tasks += len(jobs)
        self.log(f"  {v.label}: {len(jobs)} layer parts computed ({self.opts.precision}, {self.device}, "
                 f"{'Ray tasks' if self.resources is not None else 'in this process'}) in {time.time() - t0:.0f} s")

    def _run(self, study, calls: list[tuple]) -> None:
        if not calls:
            return
        if self.resources is None:
            for c in calls:
                w, _ = study.dm.blocks[c[4]]
                make_part(*c, w, study.grams[c[4]], self.opts.precision, str(self.device), None)
            return
        import ray

        from ndpmoe.model.ray_runtime import run_tasks

        refs = {}                                      # one object-store copy of each layer's inputs
        for c in calls:
            if c[4] not in refs:
                w, _ = study.dm.blocks[c[4]]
                refs[c[4]] = (ray.put(w), ray.put(study.grams[c[4]]))
        device = "cuda" if self.resources.get("GPU", 0) >= 1 else str(self.device)
        run_tasks(make_part, [c + refs[c[4]] + (self.opts.precision, device, 1) for c in calls], self.resources)


def make_part(kind, root, qkey, key, layer, bits, quantizer, group, word_bits, fit, rank, w, grams,
              precision, device, threads):
    """One layer's part, computed and stored under `key` (a task: everything it needs is passed)."""
    import torch

    from ndpmoe.model.contract import QuantFormat

    from .study_cache import StudyCache
    from .study_parts import compensator_part, quantized_part

    if threads:
        torch.set_num_threads(threads)
    cache = StudyCache(Path(root), "")
    fmt = QuantFormat(bits, group, word_bits)
    qs = cache.quantized(qkey, fmt, lambda: quantized_part(w, grams, fmt, quantizer, precision, device))
    if kind == "c":
        cache.compensators(key, lambda: compensator_part(w, qs, grams, fit, rank, precision, device))
    return key


@contextmanager
def scale_out(study, opts: ScaleOptions | None, log=print):
    """The study's scale-out for the duration of its plan: a Ray runtime if asked, parts computed
    ahead on the device, and the model's perplexity passes on the device."""
    if opts is None or not opts.active:
        yield None
        return
    from ndpmoe.model.ray_runtime import ray_runtime

    from .devices import choose_device, placed

    with placed(study.dm.model, choose_device(opts.device), log):
        if opts.workers or opts.ray_address:
            with ray_runtime(opts.workers or 1, opts.ray_address) as resources:
                log(f"Ray: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs"
                    + (f" at {opts.ray_address}" if opts.ray_address else " (local runtime)"))
                scale = ScaleOut(opts, resources, log)
                scale.attach(study)
                yield scale
        else:
            scale = ScaleOut(opts, None, log)
            scale.attach(study)
            yield scale
