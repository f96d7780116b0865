"""`ndpmoe generate --ndp rtl`: the whole model with its NDP work on the Verilator-simulated unit.

    result = generate_rtl(GenerateOptions(prompt=..., ndp="rtl", rtl_tokens=4))

First the whole continuation runs here with the golden NDP backend (host/generate.py), streamed.
Then the simulator (sim/cocotb_generate.py) runs the same model, store, runtime and decode loop
for the first `rtl_tokens` tokens twice: with the golden backend, then with every MoE layer's NDP
descriptors on the RTL, each one checked against the bit-exact golden unit. The two runs share a
process, so they see the same float32 arithmetic around the NDP: the tokens must be identical.
(Against this process's golden run they may not be: another process can sum in another order, and
a discrete choice such as the budgeted policy's greedy order can flip on a difference of 1e-5.)
The result is this process's golden run, with `extra["rtl"]`: the RTL's tokens and whether they
equal the golden ones, the largest |RTL - golden| over every descriptor, and the measured NDP
cycles per forward pass beside the cost model's for the same descriptors.

The Verilator build and the simulator's output go to log files in the run's folder under
build/generate/runs, not to the terminal.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, replace

import torch

from ndpmoe.host.generate import GenerateOptions, GenerateResult, generate, round_memory
from ndpmoe.model.contract import get_config
from ndpmoe.model.paths import build_root
from ndpmoe.rtl.export import HARNESS_TOP

from .runner import REWRITE_ASSERTIONS, BenchOptions, build_logged, verilator_runner

KEEP_RUNS = 10
STALLS = {"none": None, "random": "random"}


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def harness_options(sizes, cfg, seed: int) -> BenchOptions:
    """The RTL tests' harness, its RAM window and result RAM grown when one matrix image, one
    activation load or one descriptor's results would not fit them."""
    reads = [cfg.t_max * cfg.max_in_features]
    for m in ("w1", "w3", "w2"):
        reads.append(sizes.matrix_bytes("lo", m))
        if sizes.hi_fmt is not None and sizes.hi_fmt.bits in cfg.bits:
            reads.append(sizes.matrix_bytes("hi", m))
        reads += list(sizes.ndp_factor_bytes(m))
    words = -(-max(reads) // cfg.word_bytes)
    results = cfg.t_max * max(sizes.hidden, sizes.intermediate)
    base = BenchOptions()
    return BenchOptions(config=cfg.name, seed=seed, mem_words=max(base.mem_words, _pow2_at_least(words)),
                        result_words=max(base.result_words, _pow2_at_least(results)))


def generate_rtl(opts: GenerateOptions, dm=None, *, on_text=None, log=print, stalls: str = "none",
                 seed: int = 1, progress: bool = False) -> GenerateResult:
    if opts.ndp != "rtl":
        raise ValueError(f"generate_rtl runs ndp 'rtl', not {opts.ndp!r}")
    if stalls not in STALLS:
        raise ValueError(f"stalls must be one of {sorted(STALLS)}, not {stalls!r}")
    opts.check()
    result = generate(replace(opts, ndp="golden"), dm, on_text=on_text, log=log, keep_logits=True, progress=progress)
    result.options = opts
    if result.interrupted:
        result.extra["rtl"] = {"skipped": "the golden run was interrupted"}
        return result
    k = min(opts.rtl_tokens, len(result.tokens))
    log(f"\nRTL in the loop: the first {k} token(s) again with every NDP descriptor on the Verilator-simulated unit ...")
    try:
        report = simulate(opts, result, k, stalls=stalls, seed=seed)
    except KeyboardInterrupt:
        result.interrupted = f"interrupted during the RTL run (the golden run of {len(result.tokens)} tokens finished)"
        result.extra["rtl"] = {"skipped": "interrupted"}
        return result
    result.extra["rtl"] = compare(result, report, k)
    return result


def simulate(opts: GenerateOptions, golden: GenerateResult, k: int, *, stalls: str, seed: int) -> dict:
    from ndpmoe.host.store import open_store

    cfg = get_config(opts.ndp_config)
    store = open_store(golden.store["folder"], verify=False)
    sizes = store.sizes(cfg)
    hopts = harness_options(sizes, cfg, seed)
    run_dir = build_root("generate", "runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_dir.mkdir(parents=True, exist_ok=True)
    _prune_runs(KEEP_RUNS)
    t0 = time.perf_counter()
    bdir = build_logged(hopts, run_dir / "build.log")
    build_s = time.perf_counter() - t0
    mem = golden.extra.get("ndp_memory_bytes") or cfg.mem_bytes
    job = {"options": asdict(opts), "store": golden.store["folder"], "store_key": golden.extra["store_key"],
           "layer_index": golden.extra["layer_index"],
           "prompt_ids": golden.extra["prompt_ids"], "tokens": k, "mem_bytes": round_memory(mem, cfg),
           "config": cfg.name, "seed": seed, "stalls": STALLS[stalls], "mem_words": hopts.mem_words,
           "result_words": hopts.result_words}
    job_path, report_path = run_dir / "job.pt", run_dir / "report.pt"
    torch.save(job, job_path)
    env = hopts.env() | {"NDP_GENERATE_JOB": str(job_path), "NDP_GENERATE_REPORT": str(report_path),
                         "COCOTB_REWRITE_ASSERTION_FILES": REWRITE_ASSERTIONS}
    t1 = time.perf_counter()
    exit_code = 0
    try:
        verilator_runner().test(test_module="ndpmoe.sim.cocotb_generate", hdl_toplevel=HARNESS_TOP,
                                hdl_toplevel_lang="verilog", build_dir=bdir, test_dir=run_dir, extra_env=env,
                                log_file=run_dir / "sim.log", results_xml=str(run_dir / "results.xml"))
    except SystemExit as exc:        # the runner exits on a failed test under pytest; the report says why
        exit_code = exc.code
    if not report_path.exists():
        raise RuntimeError(f"the RTL run wrote no report (simulator exit {exit_code}); see {run_dir / 'sim.log'}")
    report = torch.load(report_path, weights_only=False)
    if "error" in report:
        raise RuntimeError(f"the RTL run failed inside the simulator (log: {run_dir / 'sim.log'}):\n{report['error']}")
    report.update(build_s=build_s, sim_process_s=time.perf_counter() - t1, run_dir=str(run_dir), stalls=stalls)
    return report


def _max_diff(a: list, b: list) -> float:
    return max((float((x - y).abs().max()) for x, y in zip(a, b)), default=0.0)


def compare(golden: GenerateResult, report: dict, k: int) -> dict:
    """The RTL run against the golden backend's run of the same k passes in the simulator's
    process (the check), and against this process's golden run (for information: another
    process's float32 summation order can flip a discrete policy choice)."""
    steps, g_steps = report["steps"], report["golden_steps"]
    return {
        "tokens": report["tokens"], "text": report["text"], "passes": len(steps),
        "tokens_equal_golden": report["tokens"] == report["golden_tokens"],
        "max_abs_logit_diff": _max_diff(report["logits"], report["golden_logits"]),
        "same_descriptors_as_golden": [s["ndp_descriptors"] for s in steps] == [s["ndp_descriptors"] for s in g_steps],
        "tokens_equal_this_process": report["tokens"] == golden.tokens[:k],
        "max_abs_logit_diff_this_process": _max_diff(report["logits"], golden.logits),
        "descriptors": report["ndp"]["descriptors"],
        "max_abs_diff": report["ndp"]["max_abs_diff"],
        "ndp_cycles_measured": [s["ndp_cycles"] for s in steps],
        "ndp_cycles_cost_model": [s["ndp_cycles"] for s in g_steps],
        "descriptors_per_pass": [s["ndp_descriptors"] for s in steps],
        "link_equal": all(s["link_planned"] == s["link_executed"] for s in steps),
        "unplanned_uploads": report["unplanned"],
        "mem_stall_cycles": report["ndp"]["mem_stall_cycles"], "out_stall_cycles": report["ndp"]["out_stall_cycles"],
        "port_utilization": report["ndp"]["port_utilization"], "stalls": report["stalls"],
        "sim_cycles": report["sim_cycles"], "sim_wall_s": report["sim_wall_s"], "build_s": report["build_s"],
        "sim_process_s": report["sim_process_s"], "run_dir": report["run_dir"],
    }


def rtl_ok(rtl: dict) -> bool:
    """The check passed: every descriptor bit-exact, the same descriptors and tokens as the golden run."""
    return ("skipped" not in rtl and rtl["max_abs_diff"] == 0 and rtl["tokens_equal_golden"]
            and rtl["same_descriptors_as_golden"] and rtl["link_equal"] and rtl["unplanned_uploads"] == 0)


def format_rtl(rtl: dict, clock_mhz: float) -> str:
    if "skipped" in rtl:
        return f"RTL in the loop: skipped ({rtl['skipped']})"
    ok = rtl_ok(rtl)
    lines = [f"RTL in the loop ({rtl['passes']} forward passes, stalls {rtl['stalls']}): "
             f"{rtl['descriptors']} NDP descriptors on the simulated unit, largest |RTL - golden| "
             f"{rtl['max_abs_diff']}; tokens identical to the golden backend's: "
             f"{'yes' if rtl['tokens_equal_golden'] else 'NO'} ({'ok' if ok else 'FAILED'})",
             f"  largest |logit difference| vs the golden backend's run: {rtl['max_abs_logit_diff']:.3g}; "
             f"against this process's golden run: tokens {'equal' if rtl['tokens_equal_this_process'] else 'differ'}, "
             f"logits within {rtl['max_abs_logit_diff_this_process']:.3g} (float32 summation order across processes)",
             f"  {'pass':<8}{'descriptors':>12}{'NDP cycles measured':>22}{'cost model':>12}{'us at ' + format(clock_mhz, 'g') + ' MHz':>16}"]
    for i, (d, m, c) in enumerate(zip(rtl["descriptors_per_pass"], rtl["ndp_cycles_measured"], rtl["ndp_cycles_cost_model"])):
        lines.append(f"  {'prefill' if i == 0 else f'token {i + 1}':<8}{d:>12}{m:>22.0f}{c:>12.0f}{m / clock_mhz:>16.1f}")
    lines.append(f"  simulated {rtl['sim_cycles']} cycles in {rtl['sim_wall_s']:.1f} s; Verilator build "
                 f"{rtl['build_s']:.1f} s; logs in {rtl['run_dir']}")
    return "\n".join(lines)


def _prune_runs(keep: int) -> None:
    for old in sorted(p for p in build_root("generate", "runs").iterdir() if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
