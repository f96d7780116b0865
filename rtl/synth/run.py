"""One synthesis + place-and-route run of one NDP configuration on one FPGA target."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

from ndpmoe.model.contract import NdpConfig
from ndpmoe.model.paths import build_root
from ndpmoe.rtl.synth import flow
from ndpmoe.rtl.synth.design import (DesignFactory, check_primitives, default_primitives, ndp_unit, resolve_config,
                              write_wrapped_verilog)
from ndpmoe.rtl.synth.report import (SynthResult, log_tail, over_capacity, read_failing_endpoints, read_timing,
                              read_utilization, read_yosys_cells, resource_counts)
from ndpmoe.rtl.synth.targets import FpgaTarget, get_target


# Amaranth writes each cell's source line into a `src` attribute as an absolute path, so the same
# RTL in two checkouts gives Verilog that differs only there
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def verilog_identity(path: Path, root: Path = SOURCE_ROOT) -> bytes:
    """The Verilog in `path` with the location of the checkout that wrote it (`root`) taken out:
    what the reuse key and the netlist check compare."""
    return Path(path).read_bytes().replace(str(root).encode(), b"<source root>")


def default_build_dir(cfg: NdpConfig, target: FpgaTarget, freq_mhz: float, speed: int | None,
                      dsp_min_width: int | None = None, primitives: str | None = None) -> Path:
    grade = f"-s{speed}" if speed is not None else ""
    dsp = f"-dsp{dsp_min_width}" if dsp_min_width is not None else ""
    prim = f"-{primitives}" if primitives not in (None, default_primitives(target)) else ""
    return build_root("fpga") / f"{cfg.name}-{target.name}{grade}{dsp}{prim}-{freq_mhz:g}mhz"


def rtl_revision() -> str:
    """The last commit touching rtl/ (+ "-dirty" with uncommitted changes there): which RTL a
    result belongs to, since the unit changes under the flow."""
    try:
        rev = subprocess.run(["git", "log", "-1", "--format=%h", "--", "rtl", ":!rtl/synth"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "rtl", ":!rtl/synth"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("-dirty" if dirty else "")


def check_freq(freq_mhz) -> float:
    if isinstance(freq_mhz, bool) or not isinstance(freq_mhz, (int, float)) or not 0 < freq_mhz <= 1000:
        raise ValueError(f"target frequency must be a number of MHz in (0, 1000], not {freq_mhz!r}")
    return float(freq_mhz)


def run_synth(config: NdpConfig | str, target: FpgaTarget | str, *, freq_mhz: float = 150.0,
              speed: int | None = None, build: Path | None = None, seed: int = 1,
              factory: DesignFactory = ndp_unit, timeout_s: float | None = 3600,
              reuse: bool = False, dsp_min_width: int | None = None,
              primitives: str | None = None, netlist_from: Path | None = None,
              tmg_ripup: bool = False) -> SynthResult:
    """Amaranth -> wrapped Verilog -> Yosys -> nextpnr; the result says whether the design fits,
    its resources, Fmax and critical path. Tool failures come back in `result.error`.

    With `reuse`, a result.json left in the build folder by a run of the very same Verilog,
    target, speed, clock and seed is returned instead of running the tools again.
    `dsp_min_width` (ECP5): only multiplies whose narrower operand has at least that many bits
    go to DSPs (see flow.synthesize); None leaves the choice to synth_ecp5. `primitives`:
    "ecp5" (the default on ECP5 targets) instantiates block RAMs and multipliers with their
    registers on, "inferred" leaves them to Yosys (rtl/hard_blocks.py). `netlist_from`: the build
    folder of an earlier run of the same Verilog whose Yosys netlist to place again (another placer
    seed) instead of synthesizing it anew. `tmg_ripup`: nextpnr's router2 routes nets that miss
    the target again (see flow.nextpnr_args)."""
    cfg = resolve_config(config)
    target = get_target(target) if isinstance(target, str) else target
    freq_mhz = check_freq(freq_mhz)
    speed = target.check_speed(speed)
    primitives = check_primitives(target, primitives)
    if dsp_min_width is not None:
        flow.dsp_premap(target, dsp_min_width)   # bad values fail before any tool runs
    build = Path(build) if build is not None else default_build_dir(cfg, target, freq_mhz, speed, dsp_min_width,
                                                                    primitives)
    build.mkdir(parents=True, exist_ok=True)
    seconds = {}
    start = time.monotonic()
    write_wrapped_verilog(cfg, build / "top.v", factory, primitives)
    seconds["verilog"] = round(time.monotonic() - start, 2)
    key = hashlib.sha256(verilog_identity(build / "top.v")
                         + f"|{target.name}|{speed}|{freq_mhz}|{seed}|{dsp_min_width}|{tmg_ripup}".encode()).hexdigest()
    cached = build / "result.json"
    if reuse and cached.exists():
        raw = json.loads(cached.read_text())
        if raw.get("extra", {}).get("key") == key:
            return SynthResult.from_json(raw)
    cached.unlink(missing_ok=True)
    for stale in ("netlist.json", "stat.json", "report.json", "nextpnr.log", "yosys.log"):
        (build / stale).unlink(missing_ok=True)

    notes: list[str] = []
    revision = rtl_revision()

    def result(error: str | None, fits: bool) -> SynthResult:
        cells, util = read_yosys_cells(build), read_utilization(build)
        fmax, path = read_timing(build)
        failing = read_failing_endpoints(build, freq_mhz)
        r = SynthResult(config=cfg.name, target=target.name, speed=speed, freq_target_mhz=freq_mhz,
                        fits=fits, fmax_mhz=fmax, **resource_counts(target, util, cells),
                        utilization=util, yosys_cells=cells, critical_path=path,
                        seconds=seconds, error=error,
                        extra={"build": str(build), "key": key, "dsp_min_width": dsp_min_width,
                               "primitives": primitives, "failing": failing, "tmg_ripup": tmg_ripup,
                               "rtl": revision, "notes": notes})
        cached.write_text(json.dumps(r.to_json(), indent=1) + "\n")
        return r

    if netlist_from is not None:
        source = Path(netlist_from)
        if verilog_identity(source / "top.v") != verilog_identity(build / "top.v"):
            raise ValueError(f"{source} holds the netlist of other Verilog than this run's")
        for name in ("netlist.json", "stat.json"):
            shutil.copyfile(source / name, build / name)
        notes.append(f"netlist from {source}")
    try:
        if netlist_from is not None:
            step = flow.place_and_route(target, build, freq_mhz, speed, seed, timeout_s, tmg_ripup)
            seconds["nextpnr"] = round(step.seconds, 2)
            return _finish(build, step, result, target, dsp_min_width)
        step = flow.synthesize(target, build / "top.v", build, timeout_s, dsp_min_width)
        seconds["yosys"] = round(step.seconds, 2)
        if step.returncode and target.family == "ecp5" and "Assert `" in log_tail(step.log, 1):
            # Yosys 0.70's abc9 reintegration asserts on the default unit (rtlil.cc:3091, in
            # abc_ops_reintegrate): map that design with plain abc and say so in the result
            abc9_failure = log_tail(step.log, 1)
            step = flow.synthesize(target, build / "top.v", build, timeout_s, dsp_min_width, abc9=False)
            seconds["yosys_without_abc9"] = round(step.seconds, 2)
            notes.append(f"abc9 failed ({abc9_failure.strip()}); LUTs mapped with plain abc")
        if step.returncode:
            return result(f"yosys failed (exit {step.returncode}):\n{log_tail(step.log)}", False)
        step = flow.place_and_route(target, build, freq_mhz, speed, seed, timeout_s, tmg_ripup)
        seconds["nextpnr"] = round(step.seconds, 2)
    except subprocess.TimeoutExpired as exc:
        return result(f"{Path(exc.cmd[0]).name} ran past {timeout_s} s", False)
    return _finish(build, step, result, target, dsp_min_width)


def _finish(build: Path, step, result, target: FpgaTarget, dsp_min_width: int | None) -> SynthResult:
    """The result after place and route: does not fit, nextpnr failed, or fits."""
    over = over_capacity(read_utilization(build))
    if over:
        used = ", ".join(f"{k} {v['used']}/{v['available']} ({100 * v['used'] / v['available']:.0f} %)"
                         for k, v in over.items())
        hint = (" (Yosys puts every multiply in a DSP whatever the device holds: try --dsp-min-width 9)"
                if target.dsp_bel in over and dsp_min_width is None else "")
        return result(f"design does not fit {target.name}: {used}{hint}", False)
    if step.returncode or not (build / "report.json").exists():
        return result(f"nextpnr failed (exit {step.returncode}):\n{log_tail(step.log)}", False)
    return result(None, True)


def run_seeds(config: NdpConfig | str, target: FpgaTarget | str, seeds: list[int], *,
              build: Path | None = None, workers: int = 0, address: str | None = None,
              **options) -> list[SynthResult]:
    """The same netlist placed and routed at each of `seeds` (Yosys runs once, for the first): one
    result per seed, each in its own folder build/seed<N>. The first seed runs here; the others
    follow it one after the other, or with `workers` / `address` side by side as Ray tasks on a
    local runtime of that many workers or on the cluster at HOST:PORT (each task writes only its
    own folder, so a retried one starts that seed afresh)."""
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of non-negative integers, not {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct (each has its own folder), not {seeds!r}")
    from ndpmoe.model.ray_runtime import check_spread, ray_runtime, run_tasks
    check_spread(workers, address)              # before minutes of Yosys
    cfg = resolve_config(config)
    target = get_target(target) if isinstance(target, str) else target
    if build is None:
        build = default_build_dir(cfg, target, options.get("freq_mhz", 150.0), target.check_speed(options.get("speed")),
                                  options.get("dsp_min_width"), options.get("primitives"))
    build = Path(build).resolve()             # the same folder from a Ray worker's directory
    first = run_synth(cfg, target, seed=seeds[0], build=build / f"seed{seeds[0]}", **options)
    calls = [(cfg, target.name, seed, build / f"seed{seed}",
              Path(first.extra["build"]) if first.error is None else None, options) for seed in seeds[1:]]
    if not calls or (not workers and not address):
        return [first] + [place_seed(*call) for call in calls]
    with ray_runtime(workers or 1, address) as resources:
        return [first] + run_tasks(place_seed, calls, {**resources, "GPU": 0})


def place_seed(cfg: NdpConfig, target: str, seed: int, build: Path, netlist_from: Path | None,
               options: dict) -> SynthResult:
    """One seed of run_seeds: the netlist in `netlist_from` placed again, or (None: the first seed
    failed) the whole flow."""
    return run_synth(cfg, target, seed=seed, build=build, netlist_from=netlist_from, **options)
