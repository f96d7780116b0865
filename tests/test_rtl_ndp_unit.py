"""NdpUnit end to end in amaranth.sim: random descriptors (sim/workload.py) against the golden
model, with random stalls on the command, memory request, memory response and output handshakes,
refused descriptors, and a reset in the middle of a descriptor. Small workloads: amaranth.sim is
slow; the cocotb bench (tests/test_ndp_cocotb.py) runs the thousands."""
import random

import pytest
from amaranth.hdl import ClockDomain, Elaboratable, Module

from ndpmoe.model.contract import ACC_BITS, COUNTERS, ErrorCode, State, get_config, output_struct
from ndpmoe.rtl.ndp_unit import NdpUnit
from ndpmoe.sim.workload import Mix, WorkloadGenerator

from rtl_sim import run, to_signed


class WithReset(Elaboratable):
    """The unit in a sync domain whose reset the bench drives."""

    def __init__(self, dut):
        self.dut, self.domain = dut, ClockDomain("sync")

    def elaborate(self, platform):
        m = Module()
        m.domains.sync = self.domain
        m.submodules.dut = self.dut
        return m


def run_unit(cfg, steps_wanted: int, seed: int, mix: Mix | None = None, batches=None):
    """Random workload of `mix`, or the given `batches`; every step checked against its golden outcome."""
    dut = NdpUnit(cfg, max_burst=16)
    top = WithReset(dut)
    rng = random.Random(seed)
    if batches is None:
        batches = list(WorkloadGenerator(cfg, 1 << 16, seed, mix).batches(steps_wanted))
    state = {"image": b"", "queue": [], "results": []}
    wb = cfg.word_bytes
    out_struct = output_struct(cfg.t_max)

    async def memory_and_output(ctx):
        req_ready = resp_valid = out_ready = 0
        while True:
            ctx.set(dut.mem_req.ready, req_ready)
            ctx.set(dut.mem_resp.valid, resp_valid)
            ctx.set(dut.out.ready, out_ready)
            _, rst, req_v, req, resp_r, out_v, out = await ctx.tick().sample(
                dut.mem_req.valid, dut.mem_req.payload, dut.mem_resp.ready, dut.out.valid, dut.out.payload)
            if rst:
                state["queue"].clear()
                req_ready = resp_valid = out_ready = 0
                continue
            if req_ready and req_v:
                state["queue"].append([req.addr, req.words, rng.randint(0, 6)])
            if resp_valid and resp_r:
                head = state["queue"][0]
                head[0] += wb
                head[1] -= 1
                if head[1] == 0:
                    state["queue"].pop(0)
                resp_valid = 0
            if out_ready and out_v:
                state["results"].append((out.token, out.row, to_signed(out.value, ACC_BITS)))
            req_ready = int(rng.random() < 0.7)
            queue = state["queue"]
            if queue and queue[0][2] > 0:
                queue[0][2] -= 1                          # this request's latency
            elif not resp_valid and queue and rng.random() < 0.7:
                a = queue[0][0]
                ctx.set(dut.mem_resp.payload, int.from_bytes(state["image"][a:a + wb].ljust(wb, b"\0"), "little"))
                resp_valid = 1
            out_ready = int(rng.random() < 0.6)

    async def tb(ctx):
        checked = 0
        for batch in batches:
            state["image"] = bytes(batch.image)
            for step in batch.steps:
                await ctx.tick().repeat(rng.randint(1, 3))
                ctx.set(dut.cmd.payload.as_value(), step.raw)
                ctx.set(dut.cmd.valid, 1)
                await ctx.tick().until(dut.cmd.ready)
                ctx.set(dut.cmd.valid, 0)
                before = ctx.get(dut.counters)
                first = len(state["results"])
                if step.reset_after is not None:
                    await ctx.tick().repeat(step.reset_after)
                    ctx.set(top.domain.rst, 1)
                    for _ in range(2):
                        await ctx.tick()          # (repeat() would raise DomainReset)
                    ctx.set(top.domain.rst, 0)
                    await ctx.tick()
                    status = ctx.get(dut.status)
                    assert (status.state.value, status.error.value) == (State.IDLE, ErrorCode.NONE)
                    assert all(getattr(ctx.get(dut.counters), n) == 0 for n in COUNTERS)
                    continue
                await ctx.tick().until(dut.done)
                status = ctx.get(dut.status)
                after = ctx.get(dut.counters)
                expect_state = State.DONE if step.error == ErrorCode.NONE else State.ERROR
                assert (status.state.value, status.error.value) == (expect_state, step.error), step.describe()
                assert state["results"][first:] == step.results, step.describe()
                assert after.words_read - before.words_read == step.words, step.describe()
                assert after.results_written - before.results_written == len(step.results)
                checked += 1
        assert checked >= steps_wanted // 2

    run(top, tb, processes=[memory_and_output])
    return batches


@pytest.mark.parametrize("name,tp", [("small", 1), ("default", 2)])
def test_random_descriptors(name, tp):
    cfg = get_config(name)
    assert cfg.tokens_parallel == tp
    batches = run_unit(cfg, steps_wanted=16, seed=11, mix=Mix(max_rows=3, max_in=256, bad=0.25, reset=0.2))
    steps = [s for b in batches for s in b.steps]
    assert any(s.reset_after is not None for s in steps)                        # a reset mid-run
    assert sum(s.error == ErrorCode.NONE for s in steps) > 4                    # descriptors that run
    assert len({s.error for s in steps}) > 2                                     # and some refused
