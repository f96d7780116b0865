"""Co-simulation of whole MoE layers: the host runtime with its NDP ops on the Verilator-simulated
RTL, everything else in PyTorch (the `ndpmoe cosim` command and the demo call `run_cosim`).

    run_cosim(model="default", layer=3, tokens=16, topn=2, bits=3, placement="all-ndp") -> dict

Outside the simulator (this process): load the model, take the hidden states entering the layer
on held-out text, build (or reuse) the layer's expert store. Inside it (sim/cocotb_cosim.py): plan
the layer, run the plan on the golden NDP backend and on the RTL (stalls off, then random stalls
on the memory and output handshakes), compare, and optionally inject faults.

The simulation reuses the RTL tests' Verilator build (same harness parameters); every run gets its
own folder under build/cosim/runs for logs, reports and waveforms.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict

import torch

from ndpmoe.host.ndp_cost import RTL_COSIM, NdpCostModel
from ndpmoe.host.placement import PLACEMENTS
from ndpmoe.model.contract import get_config
from ndpmoe.rtl.export import HARNESS_TOP

from ndpmoe.model.paths import build_root

from .cosim_layer import CosimCase, memory_needs
from .cosim_prepare import QuantSettings, layer_inputs, load, stores
from .runner import REWRITE_ASSERTIONS, BenchOptions, build_logged, verilator_runner

STALL_MODES = (("no_stalls", None), ("stalls", "random"))
KEEP_RUNS = 20               # run folders kept under build/cosim/runs
WAVES_MAX_TOKENS = 2         # a waveform takes ~13 kB per simulated cycle; a 16-token default layer is ~1.5e6 cycles
MEM_BYTES = 1 << 24          # least NDP memory the host sees (the harness RAM is a window onto it)


def simulate(cases: list[CosimCase], *, config: str = "default", seed: int = 1, faults: bool = False,
             stall_modes=STALL_MODES, cost: NdpCostModel = RTL_COSIM, waves: bool = False,
             opts: BenchOptions | None = None) -> dict:
    """Run `cases` in one simulator process; returns the report of sim/cocotb_cosim.py plus
    `build_s`, `run_dir`. `opts` picks the harness build (default: the RTL tests' parameters)."""
    cfg = get_config(config)
    needs = [memory_needs(c, cfg) for c in cases]
    mem_bytes = min(cfg.mem_bytes, max(MEM_BYTES, _roundup(max(n[0] for n in needs), 1 << 20)))
    if opts is None:
        # The RTL tests' harness unless one read (a matrix image) or one descriptor's results
        # are larger than its RAMs.
        words = -(-max(n[1] for n in needs) // cfg.word_bytes)
        results = max(n[2] for n in needs)
        opts = BenchOptions(config=config, seed=seed, waves=waves,
                            mem_words=max(BenchOptions().mem_words, 1 << (words - 1).bit_length()),
                            result_words=max(BenchOptions().result_words, 1 << (results - 1).bit_length()))
    run_dir = build_root("cosim", "runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_dir.mkdir(parents=True, exist_ok=True)
    _prune_runs(keep=KEEP_RUNS)
    t0 = time.perf_counter()
    bdir = build_logged(opts, run_dir / "build.log")       # Verilator's output to the log, not the terminal
    build_s = time.perf_counter() - t0
    job_path, report_path = run_dir / "job.pt", run_dir / "report.json"
    options = {"config": opts.config, "seed": seed, "mem_words": opts.mem_words, "result_words": opts.result_words,
               "mem_bytes": mem_bytes, "faults": faults, "stall_modes": [list(m) for m in stall_modes],
               "cost": asdict(cost)}
    torch.save({"cases": [c.to_dict() for c in cases], "options": options}, job_path)
    env = opts.env() | {"NDP_COSIM_JOB": str(job_path), "NDP_COSIM_REPORT": str(report_path),
                        "COCOTB_REWRITE_ASSERTION_FILES": REWRITE_ASSERTIONS}
    t1 = time.perf_counter()
    exit_code = 0
    try:
        verilator_runner().test(test_module="ndpmoe.sim.cocotb_cosim", hdl_toplevel=HARNESS_TOP,
                                hdl_toplevel_lang="verilog", build_dir=bdir, test_dir=run_dir, extra_env=env,
                                waves=opts.waves, log_file=run_dir / "sim.log",
                                results_xml=str(run_dir / "results.xml"))
    except SystemExit as exc:        # the runner exits on a failed test under pytest; the report says why
        exit_code = exc.code
    if not report_path.exists():
        raise RuntimeError(f"the co-simulation wrote no report (simulator exit {exit_code}); see {run_dir / 'sim.log'}")
    report = json.loads(report_path.read_text())
    if "error" in report:
        raise RuntimeError(f"the co-simulation failed inside the simulator (log: {run_dir / 'sim.log'}):\n"
                           f"{report['error']}")
    report.update(build_s=build_s, sim_process_s=time.perf_counter() - t1, run_dir=str(run_dir),
                  build_dir=str(bdir), waves=str(run_dir / "dump.vcd") if opts.waves else None)
    return report


def _roundup(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _prune_runs(keep: int) -> None:
    """Drop all but the newest `keep` run folders (waveforms are large)."""
    for old in sorted(p for p in build_root("cosim", "runs").iterdir() if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def run_cosim(model: str = "default", layer: int = 3, tokens: int = 16, topn: int = 2, bits: int = 3,
              placement: str = "all-ndp", *, group: int = 64, rank: int = 16, quantizer: str = "optimized",
              seed: int = 1, faults: bool = False, waves: bool = False, config: str = "default") -> dict:
    """Co-simulate one MoE layer of `model` on `tokens` real text tokens. Returns a JSON-able dict:
    settings, the plan, per stall mode the NDP figures (cycles, utilization, stalls, largest
    |RTL - golden|), the layer output against the golden backend and the references, bytes per
    link, modeled and measured layer times, timings (and the fault scenarios with faults=True)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, not {placement!r}")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be a positive integer, not {tokens!r}")
    if waves and tokens > WAVES_MAX_TOKENS:
        raise ValueError(f"--waves writes ~13 kB per simulated cycle (16 tokens of the default model: ~1.5e6 cycles, "
                         f"~20 GB); use --tokens {WAVES_MAX_TOKENS} or fewer with it, not {tokens}")
    cfg = get_config(config)
    q = QuantSettings(bits, group, rank, quantizer, cfg.word_bits)
    q.check(cfg)                                # bad settings fail before the model loads
    t0 = time.perf_counter()
    m = load(model, [layer])
    w, rc = m.blocks[layer]
    if not 1 <= topn < rc.top_k:
        raise ValueError(f"topn must be in [1, top_k) = [1, {rc.top_k}) for layer {layer}, not {topn}")
    folder = stores(m, [layer], q)[layer]
    x = layer_inputs(m, [layer], tokens, seed)[layer]
    prepare_s = time.perf_counter() - t0
    case = CosimCase(f"L{layer}-T{tokens}", layer, str(folder), w, rc, x, topn, placement)
    report = simulate([case], config=config, seed=seed, faults=faults, waves=waves)
    result = report["cases"][0]
    result["settings"] = {"model": model, "model_source": m.source, "tokens_source": m.tokens_note,
                          "layer": layer, "tokens": tokens, "topn": topn, "placement": placement,
                          "quant": asdict(q), "config": config, "seed": seed, "store": str(folder),
                          "experts": w.num_experts, "top_k": rc.top_k, "hidden": w.hidden,
                          "intermediate": w.intermediate}
    result["timing_s"] = {"prepare": prepare_s, "build": report["build_s"], "simulator_process": report["sim_process_s"],
                          "inside_simulator": report["sim_wall_s"], "sim_cycles": report["sim_cycles"]}
    result["run_dir"], result["waves"] = report["run_dir"], report["waves"]
    return result
