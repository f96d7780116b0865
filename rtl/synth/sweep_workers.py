"""The FPGA sweep's points, each synthesized and placed on its own: in this process one after
another, or as Ray tasks (`ndpmoe fpga-sweep --workers N`, `--ray-address HOST:PORT`). Every
point writes only its own build folder (its result.json is reused on a rerun), so a retried task
redoes or reuses its point and nothing is shared between tasks."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PointJob:
    """Everything one point needs (plain values: a Ray task receives a copy)."""
    target: str
    freq_mhz: float
    speed: int | None
    out: Path
    seed: int
    fresh: bool
    dsp_min_width: int | None
    dsp_fallback: int
    words_per_cycle: float


def run_point(cfg, job: PointJob):
    """(cfg, result, seconds) of one point, with the DSP fallback the sweep applies."""
    from ndpmoe.rtl.synth.cmd_synth import attach_throughput
    from ndpmoe.rtl.synth.report import over_capacity
    from ndpmoe.rtl.synth.run import run_synth
    from ndpmoe.rtl.synth.targets import get_target

    start = time.monotonic()
    target = get_target(job.target)
    r = run_synth(cfg, target, freq_mhz=job.freq_mhz, speed=job.speed, build=job.out / cfg.name,
                  seed=job.seed, reuse=not job.fresh, dsp_min_width=job.dsp_min_width)
    if (not r.fits and job.dsp_fallback and job.dsp_min_width is None and target.dsp_bel
            and target.dsp_bel in over_capacity(r.utilization)):
        # Yosys maps every multiply to a DSP whatever the device holds: keep the point in
        # the table with the low-bit products in LUTs (the DSP map column says so)
        r = run_synth(cfg, target, freq_mhz=job.freq_mhz, speed=job.speed,
                      build=job.out / f"{cfg.name}-dsp{job.dsp_fallback}", seed=job.seed,
                      reuse=not job.fresh, dsp_min_width=job.dsp_fallback)
    attach_throughput(r, cfg, job.words_per_cycle)
    return cfg, r, time.monotonic() - start


def run_points(points, job: PointJob, workers: int = 0, address: str | None = None, log=print) -> list:
    """[(cfg, result)] in the order of `points`."""
    def report(i, cfg, r, seconds):
        status = f"Fmax {r.fmax_mhz} MHz" if r.fits else (r.error or "failed").splitlines()[0]
        log(f"[{i}/{len(points)}] {cfg.name}: LUT {r.luts} FF {r.ffs} DSP {r.dsps} BRAM {r.brams}, "
            f"{status} ({seconds:.0f} s)")

    if not workers and not address:
        out = []
        for i, cfg in enumerate(points, 1):
            cfg, r, dt = run_point(cfg, job)
            report(i, cfg, r, dt)
            out.append((cfg, r))
        return out
    from ndpmoe.model.ray_runtime import ray_runtime, run_tasks

    with ray_runtime(workers or 1, address) as resources:
        log(f"Ray: {len(points)} points as tasks on {resources.get('CPU', 0):g} CPUs"
            + (f" at {address}" if address else " (local runtime)"))
        done = run_tasks(run_point, [(cfg, job) for cfg in points], {**resources, "GPU": 0})
    for i, (cfg, r, dt) in enumerate(done, 1):
        report(i, cfg, r, dt)
    return [(cfg, r) for cfg, r, _ in done]
