"""cocotb test of the co-simulation (sim/cosim.py drives it): whole MoE layers with their NDP ops
on the simulated RTL and everything else in PyTorch.

The job (NDP_COSIM_JOB, a torch file written by sim/cosim.py) lists the layers and options; the
host runtime runs in a `cocotb.task.bridge` thread and every NDP descriptor resumes into the simulator
through sim/rtl_backend.py. Per layer: the golden-backend run, one RTL run per stall mode, and
optionally the fault scenarios. The report goes to NDP_COSIM_REPORT as JSON.
"""
from __future__ import annotations

import json
import os
import time
import traceback

import cocotb
from cocotb.task import bridge
import torch

from ndpmoe.host.ndp_cost import NdpCostModel
from ndpmoe.model.contract import get_config

from .cosim_faults import fault_scenarios
from .cosim_layer import (CosimCase, golden_output, measured_time, ndp_summary, output_report, plan_summary,
                          references, setup)
from .rtl_backend import RtlNdpBackend
from .tb import NdpTB

# Per-descriptor fields kept for the cost-model fit (the stall-free run).
RECORD_FIELDS = ("opcode", "tokens", "rows", "in_features", "bits", "words", "once_words", "passes",
                 "busy_cycles", "results")


def run_case(case: CosimCase, rtl: RtlNdpBackend, opts: dict) -> dict:
    """Everything about one layer (runs in the bridge thread)."""
    t0 = time.perf_counter()
    cost = NdpCostModel(**opts["cost"])
    s = setup(case, rtl.config, cost)
    y_gold, rec_gold = golden_output(s, opts["mem_bytes"])
    refs = references(s)
    entry = {"name": case.name, "model_layer": case.model_layer, "topn": case.topn, "placement": case.placement,
             "plan": plan_summary(s), "golden_backend": output_report(y_gold, y_gold, refs), "runs": {}}
    for label, stalls in opts["stall_modes"]:
        rtl.set_stalls(stalls)
        first, w0 = len(rtl.records), time.perf_counter()
        y, rec = s.execute(rtl)
        records = rtl.record_dicts()[first:]
        ndp = ndp_summary(records)
        entry["runs"][label] = {
            "stalls": stalls, "wall_s": time.perf_counter() - w0, "ndp": ndp,
            "output": output_report(y, y_gold, refs),
            "link_bytes": {k: int(v) for k, v in rec.link_bytes.items()},
            "measured_time_s": measured_time(s, ndp["ndp_cycles"]),
            "records": [[r[f] for f in RECORD_FIELDS] for r in records] if stalls is None else None,
        }
    if opts["faults"]:
        rtl.set_stalls(None)
        entry["faults"] = fault_scenarios(s, rtl, y_gold, rec_gold.ndp_descriptors)
    entry["wall_s"] = time.perf_counter() - t0
    return entry


def run_job(job: dict, rtl: RtlNdpBackend) -> dict:
    out = {"cases": [], "record_fields": list(RECORD_FIELDS)}
    try:
        for case in job["cases"]:
            out["cases"].append(run_case(CosimCase.from_dict(case), rtl, job["options"]))
    except Exception:                                   # reported to the caller, who re-raises it
        out["error"] = traceback.format_exc()
    return out


@cocotb.test()
async def cosim(dut):
    torch.set_num_threads(1)       # the simulator shares the machine's cores with everything else
    job = torch.load(os.environ["NDP_COSIM_JOB"], weights_only=False)
    opts = job["options"]
    cfg = get_config(opts["config"])
    tb = NdpTB(dut, cfg, seed=opts["seed"], mem_words=opts["mem_words"], result_words=opts["result_words"])
    await tb.start(python_ports=False)
    rtl = RtlNdpBackend(tb, mem_bytes=opts["mem_bytes"], seed=opts["seed"])
    t0 = time.perf_counter()
    report = await bridge(run_job)(job, rtl)
    report["sim_wall_s"] = time.perf_counter() - t0
    report["sim_cycles"] = int(cocotb.utils.get_sim_time("ns")) // 10
    with open(os.environ["NDP_COSIM_REPORT"], "w") as f:
        json.dump(report, f)
    assert "error" not in report, report["error"]
