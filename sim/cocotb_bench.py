"""cocotb side of the throughput benchmark (sim/bench_ndp.py drives it; options from NDP_*).

For each bit width: one random rows x in matrix in the harness memory, one LOAD_ACT, then, for
several token counts and memory stall rates, the MATMUL alone (handed over when the unit is
idle), NDP_BENCH_B2B copies of it queued back to back (and what each copy after the first adds
beyond its beats), and a LOAD_ACT followed by as many copies (what the load costs beyond the
MATMULs). Every result is checked against the golden
model; the figures come from the unit's own counters. Writes JSON to NDP_REPORT.
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
    b2b_count = int(os.environ.get("NDP_BENCH_B2B", "8"))

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

    async def run(descriptors: list[Descriptor], stall: int, out_stall: int = 0):
        """Hand `descriptors` over back to back (each as soon as the unit takes it); returns the
        counter deltas from before the first to the last one's `done`, whether every result
        matched, the simulation speed and the number of results."""
        expect = []
        for d in descriptors:
            expect += gold.execute(d)
            assert gold.error == ErrorCode.NONE, gold.error
        tb.set_stalls(0, stall, stall, out_stall)
        before = tb.counters()
        count0 = int(dut.result_count.value)
        sim0, wall0, cpu0 = cocotb.utils.get_sim_time("ns"), time.perf_counter(), time.process_time()
        dones = [0]

        async def count_dones():
            while dones[0] < len(descriptors):
                await RisingEdge(dut.done)
                dones[0] += 1

        counting = cocotb.start_soon(count_dones())
        for d in descriptors:
            tb.present(Step(d, ErrorCode.NONE, [], 0))
            await tb.handshake()
        await counting
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        sim_cycles = (cocotb.utils.get_sim_time("ns") - sim0) / 10
        after = tb.counters()
        got = tb.read_results(count0, int(dut.result_count.value)) if expect else []
        delta = {k: after[k] - before[k] for k in after}
        return delta, got == expect, (sim_cycles / wall, sim_cycles / cpu), len(expect)

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
        load = Descriptor.load_act(tokens=t_max, in_features=act_len)
        await run([load], 0)
        load_words = load.words(cfg)
        for tokens in tokens_list:
            for stall in stalls:
                mm = Descriptor.matmul(fmt, tokens=tokens, rows=rows, in_features=n_in, addr=mat_addr)
                words, beats = mm.words(cfg), mm.beats(cfg)
                delta, ok, speed, n_results = await run([mm], stall)
                b2b, ok_b2b, _, _ = await run([mm] * b2b_count, stall)
                with_load, ok_load, _, _ = await run([load] + [mm] * b2b_count, stall)
                busy, busy_b2b = delta["busy_cycles"], b2b["busy_cycles"]
                rows_out.append(dict(
                    bits=bits, group=group, rows=rows, in_features=n_in, tokens=tokens, stall=stall,
                    words=words, words_read=delta["words_read"], busy_cycles=busy,
                    mem_stall_cycles=delta["mem_stall_cycles"], out_stall_cycles=delta["out_stall_cycles"],
                    utilization=delta["words_read"] / busy, passes=cfg.passes(tokens),
                    beats=beats, overhead_cycles=busy - beats,
                    b2b_count=b2b_count, b2b_busy_cycles=busy_b2b, b2b_words_read=b2b["words_read"],
                    b2b_utilization=b2b["words_read"] / busy_b2b,
                    # what one more descriptor in the stream costs beyond its beats
                    b2b_overhead_cycles=(busy_b2b - busy) / (b2b_count - 1) - beats,
                    load_words=load_words, load_cycles=with_load["busy_cycles"] - busy_b2b,
                    macs_per_cycle=rows * n_in * tokens / busy, results_ok=ok and ok_b2b and ok_load,
                    results=n_results, sim_cycles_per_s=speed[0], sim_cycles_per_cpu_s=speed[1],
                    image_load_s=load_s))
                dut._log.info(str(rows_out[-1]))

    if os.environ.get("NDP_REPORT"):
        with open(os.environ["NDP_REPORT"], "w") as f:
            json.dump({"config": opts.config, "tokens_parallel": cfg.tokens_parallel, "cases": rows_out}, f, indent=1)
    assert all(r["results_ok"] for r in rows_out)


def replay_descriptors(cfg, records: list[dict], gen: torch.Generator, gold: NdpGoldenUnit) -> list[Descriptor]:
    """A co-simulated layer's descriptor sequence (its shapes: sim/cocotb_cosim.py's records) over
    fresh random data in `gold`'s memory; the group size of each MATMUL is the one whose image
    has the recorded number of words."""
    top, out = 0, []
    wb = cfg.word_bytes

    def place(data: torch.Tensor) -> int:
        nonlocal top
        addr = -(-top // wb) * wb
        if addr + data.numel() > len(gold.mem):
            raise ValueError(f"the layer needs more than the harness's {len(gold.mem)} bytes (raise NDP_MEM_WORDS)")
        gold.write(addr, data)
        top = addr + data.numel()
        return addr

    for r in records:
        if r["opcode"] == "LOAD_ACT":
            x = torch.randint(-128, 128, (r["tokens"], r["in_features"]), generator=gen, dtype=torch.int8)
            out.append(Descriptor.load_act(tokens=r["tokens"], in_features=r["in_features"],
                                           addr=place(x.view(torch.uint8).reshape(-1))))
            continue
        rows, n_in, bits = r["rows"], r["in_features"], r["bits"]
        group = next(g for g in (32, 64, 128)
                     if n_in % g == 0 and cfg.fmt(bits, g).matrix_bytes(rows, n_in) // wb == r["words"])
        fmt = cfg.fmt(bits, group)
        codes = torch.randint(0, fmt.qmax + 1, (rows, n_in), generator=gen, dtype=torch.uint8)
        scale = torch.randint(0, SCALE_MAX + 1, (rows, n_in // group), generator=gen)
        zero = torch.randint(ZERO_MIN, ZERO_MAX + 1, (rows, n_in // group), generator=gen)
        addr = place(pack_matrix(codes, scale, zero, fmt))
        out.append(Descriptor.matmul(fmt, tokens=r["tokens"], rows=rows, in_features=n_in, addr=addr))
    return out


@cocotb.test()
async def layer_replay(dut):
    """The descriptors of a co-simulated layer (NDP_REPLAY: its report.json), memory always
    ready: one at a time (each handed over after the one before is done, as the co-simulation's
    backend does) and queued back to back. Results checked against the golden model."""
    opts = BenchOptions.from_env()
    cfg = opts.ndp_config()
    report = json.loads(open(os.environ["NDP_REPLAY"]).read())
    fields = report["record_fields"]
    case = report["cases"][int(os.environ.get("NDP_REPLAY_CASE", "0"))]
    records = [dict(zip(fields, r)) for r in case["runs"]["no_stalls"]["records"]]
    tb = NdpTB(dut, cfg, seed=opts.seed, mem_words=opts.mem_words, result_words=opts.result_words)
    await tb.start(python_ports=False)
    gold = NdpGoldenUnit(cfg, mem=bytearray(opts.mem_words * cfg.word_bytes))
    descriptors = replay_descriptors(cfg, records, torch.Generator().manual_seed(opts.seed), gold)
    tb.load_memory(bytes(gold.mem))
    tb.set_stalls(0, 0, 0, 0)
    out = {"config": opts.config, "tokens_parallel": cfg.tokens_parallel, "case": case["name"],
           "descriptors": len(descriptors), "cosim_busy_cycles": sum(r["busy_cycles"] for r in records)}
    for mode in ("one_at_a_time", "queued"):
        expect = []
        for d in descriptors:
            expect += gold.execute(d)
        before, count0 = tb.counters(), int(dut.result_count.value)

        async def count_dones():
            for _ in descriptors:
                await RisingEdge(dut.done)

        counting = cocotb.start_soon(count_dones())
        for d in descriptors:
            tb.present(Step(d, ErrorCode.NONE, [], 0))
            await tb.handshake()
            if mode == "one_at_a_time":
                await RisingEdge(dut.done)
        await counting
        after = tb.counters()
        got = tb.read_results(count0, int(dut.result_count.value))
        delta = {k: after[k] - before[k] for k in after}
        out[mode] = dict(delta, results_ok=got == expect,
                         words_per_cycle=delta["words_read"] / delta["busy_cycles"])
        dut._log.info(f"{mode}: {out[mode]}")
    if os.environ.get("NDP_REPORT"):
        with open(os.environ["NDP_REPORT"], "w") as f:
            json.dump(out, f, indent=1)
    assert out["one_at_a_time"]["results_ok"] and out["queued"]["results_ok"]
