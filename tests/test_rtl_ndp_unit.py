"""NdpUnit end to end in amaranth.sim: random descriptors (sim/workload.py) against the golden
model, with random stalls on the command, memory request, memory response and output handshakes,
refused descriptors, and a reset in the middle of a descriptor; then descriptors queued back to
back (each checked at its `done`), and a reset with a descriptor queued. Small workloads:
amaranth.sim is slow; the cocotb bench (tests/test_ndp_cocotb.py) runs the thousands."""
import random

import pytest
from amaranth.hdl import ClockDomain, Elaboratable, Module

from ndpmoe.model.contract import ACC_BITS, COUNTERS, ErrorCode, State, get_config
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


def port_models(dut, cfg, state, rng, *, ready_rate: float = 0.7, out_rate: float = 0.6):
    """A memory (requests queued with a random latency each, responses with random gaps) and an
    output consumer with random back-pressure; results go to state["results"]."""
    wb = cfg.word_bytes

    async def process(ctx):
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
            req_ready = int(rng.random() < ready_rate)
            queue = state["queue"]
            if queue and queue[0][2] > 0:
                queue[0][2] -= 1                          # this request's latency
            elif not resp_valid and queue and rng.random() < ready_rate:
                a = queue[0][0]
                ctx.set(dut.mem_resp.payload, int.from_bytes(state["image"][a:a + wb].ljust(wb, b"\0"), "little"))
                resp_valid = 1
            out_ready = int(rng.random() < out_rate)

    return process


async def hand_over(ctx, dut, step):
    ctx.set(dut.cmd.payload.as_value(), step.raw)
    ctx.set(dut.cmd.valid, 1)
    await ctx.tick().until(dut.cmd.ready)
    ctx.set(dut.cmd.valid, 0)


async def reset(ctx, top):
    ctx.set(top.domain.rst, 1)
    for _ in range(2):
        await ctx.tick()          # (repeat() would raise DomainReset)
    ctx.set(top.domain.rst, 0)
    await ctx.tick()


def run_unit(cfg, steps_wanted: int, seed: int, mix: Mix | None = None, batches=None):
    """Random workload of `mix`, or the given `batches`; every step checked against its golden outcome."""
    dut = NdpUnit(cfg, max_burst=16)
    top = WithReset(dut)
    rng = random.Random(seed)
    if batches is None:
        batches = list(WorkloadGenerator(cfg, 1 << 16, seed, mix).batches(steps_wanted))
    state = {"image": b"", "queue": [], "results": []}

    async def tb(ctx):
        checked = 0
        for batch in batches:
            state["image"] = bytes(batch.image)
            for step in batch.steps:
                await ctx.tick().repeat(rng.randint(1, 3))
                await hand_over(ctx, dut, step)
                before = ctx.get(dut.counters)
                first = len(state["results"])
                if step.reset_after is not None:
                    await ctx.tick().repeat(step.reset_after)
                    await reset(ctx, top)
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

    run(top, tb, processes=[port_models(dut, cfg, state, rng)])
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


def test_queued_descriptors_end_in_order_with_their_counts():
    """Every descriptor handed over as soon as the unit takes it (two queued, one checked, two in
    the slots): at each `done` the status is that descriptor's, the counters moved by exactly its
    words and results, and the output stream is the descriptors' results one after another."""
    cfg = get_config("default")
    dut = NdpUnit(cfg, max_burst=16)
    rng = random.Random(5)
    gen = WorkloadGenerator(cfg, 1 << 16, 5, Mix(max_rows=3, max_in=256, bad=0.25, reset=0.0))
    steps = next(gen.batches(16)).steps
    state = {"image": bytes(gen.gold.mem[:1 << 16]), "queue": [], "results": []}
    seen = []

    async def driver(ctx):
        for step in steps:
            await hand_over(ctx, dut, step)

    async def monitor(ctx):
        last = ctx.get(dut.counters)
        while len(seen) < len(steps):
            # sampled in the cycle `done` is high: the next descriptor may be busy from the next
            status, counters = await ctx.tick().sample(dut.status, dut.counters).until(dut.done)
            step = steps[len(seen)]
            expect_state = State.DONE if step.error == ErrorCode.NONE else State.ERROR
            assert (status.state.value, status.error.value) == (expect_state, step.error), step.describe()
            assert counters.words_read - last.words_read == step.words, step.describe()
            assert counters.results_written - last.results_written == len(step.results), step.describe()
            assert counters.busy_cycles > last.busy_cycles
            seen.append(step)
            last = counters

    run(dut, driver, monitor, processes=[port_models(dut, cfg, state, rng, ready_rate=0.9, out_rate=0.8)])
    assert state["results"] == [r for s in steps for r in s.results]
    assert sum(bool(s.results) for s in steps) > 6 and any(s.error for s in steps)


def test_a_reset_cuts_the_running_and_the_queued_descriptor():
    cfg = get_config("small")
    dut = NdpUnit(cfg, max_burst=16)
    top = WithReset(dut)
    rng = random.Random(6)
    gen = WorkloadGenerator(cfg, 1 << 16, 6, Mix(max_rows=3, max_in=256, bad=0, reset=0, nop=0, load=0))
    steps = next(gen.batches(4)).steps              # a LOAD_ACT, then MATMULs
    state = {"image": bytes(gen.gold.mem[:1 << 16]), "queue": [], "results": []}
    dones = []

    async def tb(ctx):
        await hand_over(ctx, dut, steps[0])
        await ctx.tick().until(dut.done)
        await hand_over(ctx, dut, steps[1])
        await hand_over(ctx, dut, steps[2])         # queued behind a running MATMUL
        await ctx.tick().repeat(4)
        await reset(ctx, top)
        status = ctx.get(dut.status)
        assert (status.state.value, status.error.value) == (State.IDLE, ErrorCode.NONE)
        assert all(getattr(ctx.get(dut.counters), n) == 0 for n in COUNTERS)
        for _ in range(300):                       # neither ends after the reset
            await ctx.tick()
            dones.append(ctx.get(dut.done))
        assert not any(dones) and state["results"] == []
        # the activations went with the reset: the same MATMUL is refused now, a LOAD_ACT runs
        await hand_over(ctx, dut, steps[1])
        await ctx.tick().until(dut.done)
        assert ctx.get(dut.status).error.value == ErrorCode.ACT_MISMATCH
        await hand_over(ctx, dut, steps[0])
        await ctx.tick().until(dut.done)
        assert ctx.get(dut.status).state.value == State.DONE
        assert ctx.get(dut.counters).words_read == steps[0].words

    run(top, tb, processes=[port_models(dut, cfg, state, rng)])
