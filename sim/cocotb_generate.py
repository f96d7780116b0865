"""cocotb test of whole-model generation with the NDP on the simulated RTL (sim/generate_rtl.py
drives it): the same model, store, runtime and decode loop as `ndpmoe generate`, with every NDP
descriptor of every MoE layer issued to the Verilator-simulated unit for the first tokens.

The job (NDP_GENERATE_JOB, a torch file) holds the options, the store and the prompt; the
decode loop runs in a `cocotb.task.bridge` thread, first with the golden NDP backend, then with
the RTL, where each descriptor resumes into the simulator through sim/rtl_backend.py, which also
checks it against the bit-exact golden unit. The report (tokens and logits of both runs, per-pass
runtime figures, descriptor totals) goes to NDP_GENERATE_REPORT as a torch file.
"""
from __future__ import annotations

import os
import time
import traceback

import cocotb
from cocotb.task import bridge
import torch

from ndpmoe.model.contract import get_config

from .cosim_layer import ndp_summary
from .rtl_backend import RtlNdpBackend
from .tb import NdpTB


class MeasuredRtl:
    """The RTL backend, marked as one whose cycles are measured (host/runtime.py reads it)."""
    measured_cycles = True

    def __init__(self, rtl: RtlNdpBackend):
        self.rtl = rtl
        self.config = rtl.config
        self.mem_bytes = rtl.mem_bytes

    def write(self, addr, data):
        self.rtl.write(addr, data)

    def run(self, descriptor):
        return self.rtl.run(descriptor)

    def counters(self):
        return self.rtl.counters()


def run_job(job: dict, rtl: RtlNdpBackend) -> dict:
    from ndpmoe.host.generate import job_options, make_runtime, run_decode, load_model
    from ndpmoe.host.generate_store import ModelStore, calibration_windows, store_key
    from ndpmoe.host.store import open_store

    out: dict = {}
    try:
        t0 = time.perf_counter()
        opts = job_options(job["options"])
        dm = load_model(opts.model)
        layer_index = {int(k): v for k, v in job["layer_index"].items()}
        settings = opts.store_settings()
        key = store_key(dm, sorted(layer_index), settings, calibration_windows(dm, settings))
        if key != job["store_key"]:
            raise RuntimeError(f"the model loaded here (store key {key}) is not the one the store was built from "
                               f"({job['store_key']}): were its cached files rebuilt meanwhile? Run again.")
        ms = ModelStore(open_store(job["store"]), layer_index, False, 0.0, key)
        out["load_s"] = time.perf_counter() - t0
        # The golden backend first, in this process: float32 kernels can sum in another order in
        # another process, and a policy's discrete choices (a budget's greedy order) can flip on
        # that; here both runs see the same floats, so any difference is the NDP's.
        golden = make_runtime(opts, dm, ms, job["mem_bytes"])
        golden.install(dm.model)
        with torch.inference_mode():
            g_tokens, _, g_logits, _ = run_decode(opts, dm, golden, job["prompt_ids"], max_new_tokens=job["tokens"],
                                                  keep_logits=True)
        t1 = time.perf_counter()
        rt = make_runtime(opts, dm, ms, job["mem_bytes"], ndp=MeasuredRtl(rtl))
        out["placement_s"] = time.perf_counter() - t1
        rt.install(dm.model)
        with torch.inference_mode():
            tokens, text, logits, interrupted = run_decode(opts, dm, rt, job["prompt_ids"],
                                                           max_new_tokens=job["tokens"], keep_logits=True)
        out.update(tokens=tokens, text=text, logits=logits, steps=[s.to_json() for s in rt.steps],
                   golden_tokens=g_tokens, golden_logits=g_logits, golden_steps=[s.to_json() for s in golden.steps],
                   ndp=ndp_summary(rtl.record_dicts()), unplanned=sum(s.unplanned_uploads for s in rt.steps))
    except Exception:                                   # reported to the caller, who re-raises it
        out["error"] = traceback.format_exc()
    return out


@cocotb.test()
async def generate(dut):
    torch.set_num_threads(1)       # the simulator shares the machine's cores with everything else
    job = torch.load(os.environ["NDP_GENERATE_JOB"], weights_only=False)
    cfg = get_config(job["config"])
    tb = NdpTB(dut, cfg, seed=job["seed"], mem_words=job["mem_words"], result_words=job["result_words"])
    await tb.start(python_ports=False)
    rtl = RtlNdpBackend(tb, mem_bytes=job["mem_bytes"], seed=job["seed"], stalls=job["stalls"])
    t0 = time.perf_counter()
    report = await bridge(run_job)(job, rtl)
    report["sim_wall_s"] = time.perf_counter() - t0
    report["sim_cycles"] = int(cocotb.utils.get_sim_time("ns")) // 10
    torch.save(report, os.environ["NDP_GENERATE_REPORT"])
    assert "error" not in report, report["error"]
