"""cocotb side of the throughput benchmark (sim/bench_ndp.py drives it; options from NDP_*).

For each bit width: one random rows x in matrix in the harness memory, one LOAD_ACT, then
MATMULs at several token counts and memory stall rates. Every result is checked against the
golden model; the figures come from the unit's own counters. Writes JSON to NDP_REPORT.
"""
from __future__ import annotations

import json
import os
import time

import cocotb
import torch
from cocotb.triggers import RisingEdge

from ndpmoe.model.contract import SCALE_MAX, ZERO_MAX, ZERO_MIN, Descriptor, ErrorCode, act_row_len
from ndpmoe.model.ndp_golden import NdpGoldenUnit
from ndpmoe.model.packing import pack_matrix

from .runner import BenchOptions
from .tb import NdpTB
from .workload import Step


def _int_list(name: str, default: str) -> list[int]:
    return [int(v) for v in os.environ.get(name, default).split(",") if v]


@cocotb.test()
async def throughput(dut):
    opts = BenchOptions.from_env()
    cfg = opts.ndp_config()
    rows = int(os.environ.get("NDP_BENCH_ROWS", "1024"))
    n_in = int(os.environ.get("NDP_BENCH_IN", "4096"))
    group = int(os.environ.get("NDP_BENCH_GROUP", "128"))
    bits_list = [b for b in _int_list("NDP_BENCH_BITS", "2,3,4") if b in cfg.bits]
    tokens_list = _int_list("NDP_BENCH_TOKENS", "1")
    stalls = _int_list("NDP_BENCH_STALLS", "0,4")        # memory response/latency stall rates /16

    tb = NdpTB(dut, cfg, seed=opts.seed, mem_words=opts.mem_words, result_words=opts.result_words)
    await tb.start(python_ports=False)
    gen = torch.Generator().manual_seed(opts.seed)
    mem_bytes = opts.mem_words * cfg.word_bytes
    gold = NdpGoldenUnit(cfg, mem=bytearray(mem_bytes))
    t_max = max(tokens_list)
    act_len = act_row_len(n_in, cfg.word_bits)
    x = torch.randint(-127, 128, (t_max, act_len), generator=gen, dtype=torch.int8)
    gold.write(0, x.view(torch.uint8).reshape(-1))
    mat_addr = -(-x.numel() // 4096) * 4096
    rows_out = []

    async def run(d: Descriptor, stall: int, out_stall: int = 0):
        results = gold.execute(d)
        assert gold.error == ErrorCode.NONE, gold.error
        tb.set_stalls(0, stall, stall, out_stall)
        step = Step(d, ErrorCode.NONE, results, d.words(cfg))
        before = tb.counters()
        count0 = int(dut.result_count.value)
        sim0, wall0, cpu0 = cocotb.utils.get_sim_time("ns"), time.perf_counter(), time.process_time()
        tb.present(step)
        await tb.handshake()
        await RisingEdge(dut.done)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        sim_cycles = (cocotb.utils.get_sim_time("ns") - sim0) / 10
        after = tb.counters()
        got = tb.read_results(count0, int(dut.result_count.value)) if results else []
        delta = {k: after[k] - before[k] for k in after}
        return delta, got == results, (sim_cycles / wall, sim_cycles / cpu), len(results)

    for bits in bits_list:
        fmt = cfg.fmt(bits, group)
        codes = torch.randint(0, fmt.qmax + 1, (rows, n_in), generator=gen, dtype=torch.uint8)
        scale = torch.randint(0, SCALE_MAX + 1, (rows, n_in // group), generator=gen)
        zero = torch.randint(ZERO_MIN, ZERO_MAX + 1, (rows, n_in // group), generator=gen)
        image = pack_matrix(codes, scale, zero, fmt)
        if mat_addr + image.numel() > mem_bytes:
            raise ValueError(f"{rows} x {n_in} at {bits} bits needs {mat_addr + image.numel()} bytes; "
                             f"the harness has {mem_bytes} (raise NDP_MEM_WORDS)")
        gold.write(mat_addr, image)
        l0 = time.perf_counter()
        tb.load_memory(bytes(gold.mem[:mat_addr + image.numel()]))
        load_s = time.perf_counter() - l0
        await run(Descriptor.load_act(tokens=t_max, in_features=act_len), 0)
        for tokens in tokens_list:
            for stall in stalls:
                mm = Descriptor.matmul(fmt, tokens=tokens, rows=rows, in_features=n_in, addr=mat_addr)
                delta, ok, speed, n_results = await run(mm, stall)
                words, beats = mm.words(cfg), mm.beats(cfg)
                busy = delta["busy_cycles"]
                rows_out.append(dict(
                    bits=bits, group=group, rows=rows, in_features=n_in, tokens=tokens, stall=stall,
                    words=words, words_read=delta["words_read"], busy_cycles=busy,
                    mem_stall_cycles=delta["mem_stall_cycles"], out_stall_cycles=delta["out_stall_cycles"],
                    utilization=delta["words_read"] / busy, passes=cfg.passes(tokens),
                    beats=beats, overhead_cycles=busy - beats,
                    macs_per_cycle=rows * n_in * tokens / busy, results_ok=ok, results=n_results,
                    sim_cycles_per_s=speed[0], sim_cycles_per_cpu_s=speed[1], image_load_s=load_s))
                dut._log.info(str(rows_out[-1]))

    if os.environ.get("NDP_REPORT"):
        with open(os.environ["NDP_REPORT"], "w") as f:
            json.dump({"config": opts.config, "tokens_parallel": cfg.tokens_parallel, "cases": rows_out}, f, indent=1)
    assert all(r["results_ok"] for r in rows_out)
