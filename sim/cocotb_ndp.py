"""cocotb tests of the NDP unit (run through sim/runner.py; options from NDP_* variables).

random_descriptors: `count` random descriptors (sim/workload.py) checked against the golden
model; the first `python_count` with the Python memory model and output consumer, the rest with
the harness's LFSR-stalled memory and sink. Functional coverage is sampled throughout
(sim/ndp_coverage.py); then directed steps for the bins the random ones missed (MATMUL formats,
back-to-back pairs, handshake stalls, reset states: sim/coverage_closure.py), checked alike. Writes its tally,
with the coverage after the random steps and after the directed ones, as JSON to NDP_REPORT.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict

import cocotb

from .coverage_closure import ClosureSteps
from .ndp_coverage import NdpCoverage
from .runner import BenchOptions
from .tb import NdpTB
from .workload import Mix, WorkloadGenerator


@cocotb.test()
async def random_descriptors(dut):
    opts = BenchOptions.from_env()
    cfg = opts.ndp_config()
    tb = NdpTB(dut, cfg, seed=opts.seed, mem_words=opts.mem_words, result_words=opts.result_words)
    mix = Mix(max_rows=opts.max_rows, max_in=opts.max_in)
    gen = WorkloadGenerator(cfg, opts.mem_words * cfg.word_bytes, opts.seed, mix)
    tb.coverage = coverage = NdpCoverage(cfg)
    await tb.start(python_ports=opts.python_count > 0)

    t0, done, gen_s = time.perf_counter(), 0, 0.0
    batches = gen.batches(opts.count)
    while True:
        g0 = time.perf_counter()
        batch = next(batches, None)
        gen_s += time.perf_counter() - g0
        if batch is None:
            break
        tb.load_memory(batch.image)
        steps = batch.steps
        n_py = max(0, min(len(steps), opts.python_count - done))
        if n_py:
            dut.ext_mem.value = dut.ext_out.value = 1
            await tb.run_steps(steps[:n_py], python_ports=True)
        dut.ext_mem.value = dut.ext_out.value = 0
        await tb.run_steps(steps[n_py:], python_ports=False)
        done += len(steps)
        if tb.tally.mismatches and any("hang" in m for m in tb.tally.mismatches):
            break

    random_coverage = coverage.groups()
    if not any("hang" in m for m in tb.tally.mismatches):
        await close_coverage(tb, coverage, ClosureSteps(cfg, opts.mem_words * cfg.word_bytes, opts.seed + 7919))
    wall = time.perf_counter() - t0
    tally = asdict(tb.tally)
    tally.update(coverage_random=random_coverage, coverage=coverage.groups())
    tally.update(config=opts.config, seed=opts.seed, wall_s=wall, golden_s=gen_s,
                 mismatch_count=len(tb.tally.mismatches), mismatches=tb.tally.mismatches[:20],
                 sim_cycles=int(cocotb.utils.get_sim_time("ns")) // 10)
    if os.environ.get("NDP_REPORT"):
        with open(os.environ["NDP_REPORT"], "w") as f:
            json.dump(tally, f, indent=1)
    dut._log.info(f"{tb.tally.steps} descriptors, {tb.tally.results} results, "
                  f"{len(tb.tally.mismatches)} mismatches, {wall:.1f} s ({gen_s:.1f} s golden)")
    assert not tb.tally.mismatches, tb.tally.mismatches[:5]


async def close_coverage(tb: NdpTB, coverage: NdpCoverage, closure: ClosureSteps) -> None:
    """Directed steps for the bins the random ones missed, checked by the same bench."""
    steps0 = tb.tally.steps
    missed = coverage.missed("matmul.cross")
    if missed:
        batch = closure.matmul_batch(missed)
        tb.load_memory(batch.image)
        await tb.run_steps(batch.steps, python_ports=False)
    missed = coverage.missed("error.code")
    if missed:
        batch = closure.error_batch(missed)
        tb.load_memory(batch.image)
        await tb.run_steps(batch.steps, python_ports=False)
    missed = coverage.missed("pair.kinds")
    if missed:
        batch = closure.pairs_batch(missed)
        tb.load_memory(batch.image)
        await tb.run_steps(batch.steps, python_ports=False, queued=True)
    if coverage.missed("stall.handshake"):
        batch = closure.stall_batch()
        tb.load_memory(batch.image)
        for stalls in ((12, 12, 12, 12), (0, 0, 0, 0)):
            await tb.run_steps(batch.steps, python_ports=False, queued=True, stalls=stalls)
    missed = coverage.missed("reset.state")
    if missed:
        batch, cases = closure.reset_cases(missed)
        tb.load_memory(batch.image)
        for case in cases:
            await tb.reset_in_phase(case)
    tb.tally.closure_steps = tb.tally.steps - steps0
