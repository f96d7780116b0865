"""Calibrate the runtime's NDP cost model (host/ndp_cost.py) from co-simulated cycle counts.

Whole layers of a real model run on the RTL with the memory and output always ready (the
stall-free run of the co-simulation); every descriptor gives (words, passes, busy cycles,
once-streamed words). `fit_ndp_cost` is fitted on the descriptors of the first layer only and
the error is reported per (layer, tokens) case, layer totals and the worst single descriptor, so
the other layers are held out.

    calibrate(model="default", layers=(3, 12, 24), tokens=(1, 4, 16, 32)) -> dict
"""
from __future__ import annotations

import time

from ndpmoe.host.ndp_cost import CALIB_LAYERS, CALIB_TOKENS, RTL_TARGET, CycleSample, NdpCostModel, fit_ndp_cost, relative_error, sample_cycles
from ndpmoe.model.contract import get_config

from .cosim import simulate
from .cosim_layer import CosimCase
from .cosim_prepare import QuantSettings, layer_inputs, load, stores



def samples_of(case: dict, fields: list[str]) -> list[CycleSample]:
    """The descriptors of a case's stall-free run as cost-model samples."""
    idx = {f: i for i, f in enumerate(fields)}
    return [CycleSample(r[idx["words"]], r[idx["passes"]], r[idx["busy_cycles"]], r[idx["once_words"]],
                        r[idx["opcode"]] == "LOAD_ACT")
            for r in case["runs"]["no_stalls"]["records"]]


def case_errors(model: NdpCostModel, samples: list[CycleSample]) -> dict:
    measured = sum(s.cycles for s in samples)
    modeled = sum(sample_cycles(model, s) for s in samples)
    return {"descriptors": len(samples), "measured_cycles": measured, "modeled_cycles": modeled,
            "layer_error": (modeled - measured) / measured, "worst_descriptor_error": relative_error(model, samples)}


def _worst_layer_error(model: NdpCostModel, per_case: dict[str, list[CycleSample]]) -> float:
    return max(abs(case_errors(model, v)["layer_error"]) for v in per_case.values())


def baselines(fit_names: list[str], per_case: dict[str, list[CycleSample]]) -> dict[str, float]:
    """Worst layer error of the cost model's earlier form (every word once per pass, one overhead
    for every descriptor): with the RTL design targets, and refitted on the same descriptors."""
    plain = {k: [CycleSample(s.words, s.passes, s.cycles) for s in v] for k, v in per_case.items()}
    refit = fit_ndp_cost([s for n in fit_names for s in plain[n]])
    return {"design target, words x passes": _worst_layer_error(RTL_TARGET, plain),
            "refit, words x passes": _worst_layer_error(refit, plain)}


def calibrate(model: str = "default", layers=CALIB_LAYERS, tokens=CALIB_TOKENS, topn: int = 2, bits: int = 3,
              placement: str = "all-ndp", *, group: int = 64, rank: int = 16, quantizer: str = "optimized",
              seed: int = 1, config: str = "default") -> dict:
    """Co-simulate every (layer, tokens) case, fit on the first layer, report the errors."""
    cfg = get_config(config)
    q = QuantSettings(bits, group, rank, quantizer, cfg.word_bits)
    t0 = time.perf_counter()
    layers = list(layers)
    m = load(model, layers)
    folders = stores(m, layers, q)
    cases = []
    for t in tokens:
        xs = layer_inputs(m, layers, t, seed)
        for l in layers:
            w, rc = m.blocks[l]
            cases.append(CosimCase(f"L{l}-T{t}", l, str(folders[l]), w, rc, xs[l], min(topn, rc.top_k - 1), placement))
    prepare_s = time.perf_counter() - t0
    report = simulate(cases, config=config, seed=seed, stall_modes=(("no_stalls", None),))
    fields = report["record_fields"]
    per_case = {c["name"]: samples_of(c, fields) for c in report["cases"]}
    fit_names = [c.name for c in cases if c.model_layer == layers[0]]
    fit = fit_ndp_cost([s for n in fit_names for s in per_case[n]],
                       source=f"co-simulated RTL '{config}', {model} layer {layers[0]}, tokens {list(tokens)}")
    rows = []
    for c in cases:
        e = case_errors(fit, per_case[c.name])
        rows.append({"case": c.name, "layer": c.model_layer, "tokens": c.x.shape[0], "held_out": c.name not in fit_names,
                     **e})
    return {"baselines": baselines(fit_names, per_case),
            "fit": {"cycles_per_word": fit.cycles_per_word, "overhead_cycles": fit.overhead_cycles,
                    "load_overhead_cycles": fit.load_overhead_cycles, "source": fit.source},
            "rows": rows, "worst_layer_error": max(abs(r["layer_error"]) for r in rows),
            "worst_descriptor_error": max(r["worst_descriptor_error"] for r in rows),
            "timing_s": {"prepare": prepare_s, "build": report["build_s"], "simulator_process": report["sim_process_s"]},
            "samples": {k: [list(s) for s in v] for k, v in per_case.items()}, "run_dir": report["run_dir"]}
