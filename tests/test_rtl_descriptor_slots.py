"""DescriptorSlots: reads and starts in order (refused descriptors and NOPs pass without either),
ends in order with each one's outcome, never two ends in a row, and a load that finishes while
the MATMUL before it still drains ends right after that MATMUL."""
import random

from ndpmoe.model.contract import ErrorCode, State, get_config
from ndpmoe.rtl.descriptor_slots import DescriptorSlots, RunKind
from ndpmoe.rtl.geometry import Geometry

from rtl_sim import run

# (kind, error, addr): a MATMUL, a LOAD_ACT that finishes while it drains, a refused one, two
# MATMULs, a NOP
DESCRIPTORS = [(RunKind.MATMUL, ErrorCode.NONE, 0x100), (RunKind.LOAD, ErrorCode.NONE, 0x200),
               (RunKind.NONE, ErrorCode.BAD_BITS, 0), (RunKind.MATMUL, ErrorCode.NONE, 0x300),
               (RunKind.MATMUL, ErrorCode.NONE, 0x400), (RunKind.NONE, ErrorCode.NONE, 0)]


def test_in_order_reads_starts_and_ends():
    dut = DescriptorSlots(Geometry(get_config("default")))
    rng = random.Random(2)
    reads, starts, ends, load_ends = [], [], [], []
    cycle = [0]

    async def filler(ctx):
        for i, (kind, error, addr) in enumerate(DESCRIPTORS):
            ctx.set(dut.fill.payload, {"kind": kind, "error": error, "addr": addr, "words": 10 + i})
            ctx.set(dut.fill.valid, 1)
            await ctx.tick().until(dut.fill.ready)
            ctx.set(dut.fill.valid, 0)
            if rng.random() < 0.5:
                await ctx.tick().repeat(rng.randint(1, 3))

    async def unit(ctx):
        """The reader takes commands at random; the sequencer / loader run one at a time; a
        MATMUL's results drain for a while after it has run, a load ends when it has run."""
        running, draining = None, []             # (kind, cycles left)
        while len(ends) < len(DESCRIPTORS):
            ctx.set(dut.read.ready, rng.random() < 0.5)
            staged_load, staged_matmul = bool(ctx.get(dut.exec_load)), bool(ctx.get(dut.exec_matmul))
            staged = staged_load or staged_matmul
            assert not (staged_load and staged_matmul)
            start = staged and running is None and rng.random() < 0.7
            ctx.set(dut.exec_start, start)
            load_done = running is not None and running[0] == RunKind.LOAD and running[1] == 0
            mm_done = bool(draining) and draining[0] == 0
            ctx.set(dut.load_finished, load_done)
            ctx.set(dut.matmul_finished, mm_done)
            _, _, rv, rr, rp, entry, complete, state, error = await ctx.tick().sample(
                dut.read.valid, dut.read.ready, dut.read.payload, dut.exec_entry, dut.complete,
                dut.outcome_state, dut.outcome_error)
            cycle[0] += 1
            if load_done:
                load_ends.append(cycle[0])
            if rv and rr:
                reads.append((rp.addr, rp.words, rp.slot))
            if complete:
                ends.append((cycle[0], State(state.value), ErrorCode(error.value)))
            draining = [c - 1 for c in draining]
            if mm_done:
                draining.pop(0)
            if running is not None:
                if running[1] == 0:
                    if running[0] == RunKind.MATMUL:
                        draining.append(rng.randint(8, 20))
                    running = None
                else:
                    running = (running[0], running[1] - 1)
            if start:
                starts.append(entry.addr)
                assert entry.kind == (RunKind.LOAD if staged_load else RunKind.MATMUL)
                running = (entry.kind, rng.randint(1, 4))

    run(dut, filler, unit)
    running = [(a, 10 + i) for i, (k, _, a) in enumerate(DESCRIPTORS) if k != RunKind.NONE]
    assert [(a, w) for a, w, _ in reads] == running
    assert [s for _, _, s in reads] == [0, 1, 1, 0]       # slots in turn: 0, 1, (the refused one 0), 1, 0
    assert starts == [a for a, _ in running]
    outcomes = [(State.DONE if e == ErrorCode.NONE else State.ERROR, e) for _, e, _ in DESCRIPTORS]
    assert [(s, e) for _, s, e in ends] == outcomes
    assert all(b[0] - a[0] >= 2 for a, b in zip(ends, ends[1:]))
    assert load_ends[0] < ends[0][0]                    # the load finished while the MATMUL drained
