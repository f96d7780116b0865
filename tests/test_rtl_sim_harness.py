"""SimHarness (amaranth.sim, Amaranth RAMs): the in-design memory model and result sink run
descriptors under LFSR stalls, and the LFSR stall rate is what it says."""

from ndpmoe.model.contract import ACC_BITS, get_config, output_struct
from ndpmoe.rtl.sim_harness import Lfsr, SimHarness
from ndpmoe.sim.workload import Mix, WorkloadGenerator

from rtl_sim import run, to_signed


def test_lfsr_rate():
    dut = Lfsr(20, 0x1234)

    async def tb(ctx):
        for rate in (0, 4, 12):
            ctx.set(dut.rate, rate)
            stalls = 0
            for _ in range(2000):
                await ctx.tick()
                stalls += ctx.get(dut.stall)
            assert abs(stalls / 2000 - rate / 16) < 0.04

    run(dut, tb)


def test_internal_memory_and_sink_run_descriptors():
    cfg = get_config("small")
    h = SimHarness(cfg, mem_words=1 << 11, result_words=1 << 8, storage="amaranth", max_burst=8)
    gen = WorkloadGenerator(cfg, (1 << 11) * cfg.word_bytes, 5, Mix(max_rows=3, max_in=128, bad=0, reset=0, nop=0))
    batch = next(gen.batches(6))
    struct = output_struct(cfg.t_max)

    async def tb(ctx):
        wb = cfg.word_bytes
        for i in range(0, len(batch.image), wb):
            ctx.set(h.storage.memory.data[i // wb], int.from_bytes(batch.image[i:i + wb], "little"))
        for rates in ((0, 0, 0, 0), (5, 9, 7, 11)):
            for sig, rate in zip((h.req_stall, h.resp_stall, h.read_stall, h.out_stall), rates):
                ctx.set(sig, rate)
            gen_steps = batch.steps
            for step in gen_steps:
                first = ctx.get(h.result_count)
                ctx.set(h.cmd.payload.as_value(), step.raw)
                ctx.set(h.cmd.valid, 1)
                await ctx.tick().until(h.cmd.ready)
                ctx.set(h.cmd.valid, 0)
                await ctx.tick().until(h.done)
                last = ctx.get(h.result_count)
                got = []
                for i in range(first, last):
                    f = struct.unpack(ctx.get(h.results.memory.data[i % (1 << 8)]))
                    got.append((f["token"], f["row"], to_signed(f["value"], ACC_BITS)))
                assert got == step.results, step.describe()
                assert ctx.get(h.status).error.value == step.error

    run(h, tb)
