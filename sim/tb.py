"""The cocotb test bench of the NDP unit: model + drivers + monitors + checker, in one TB class.

The design under test is rtl.sim_harness.SimHarness (the unit, a memory model and a result sink
inside the design) so that whole descriptors run without Python touching a signal each cycle.
Two ways to run a step, both with random stalls on every handshake:

- "harness": the harness's memory and sink, stalled by LFSRs at rates the TB picks per step
  (request handshake, response handshake, read latency, output back-pressure); Python only sends
  the descriptors, waits for `done` and reads the results RAM through VPI.
- "python":  `ext_mem` / `ext_out` hand the unit's memory ports and output stream to this file's
  coroutine (`_python_port_models`): a queue of requests with a random latency each, responses
  with random gaps, random output back-pressure; slow (Python every cycle) but independent of
  the harness's own memory model.

The command handshake is stalled too: a random gap before each descriptor. Descriptors are
queued: a driver hands them over while earlier ones still run (up to a random number ahead,
often back to back), or waits for the unit to drain first. A monitor takes each `done` in order
and checks the oldest descriptor in flight. A step with a reset runs alone (the unit drained
first), sometimes with the next descriptor queued behind it: the reset must cut both, and that
next one is handed over again after it.

The checker compares every step with its golden expectation (sim/workload.py): the results,
bit-exact and in order (so none lost or duplicated: the output stream is cut into the steps'
results by their expected counts, and nothing may be left over), the status (state and error
code) at its `done`, and the counters between its `done` and the one before (words read, results
written, each stall count at most the busy cycles; and, over a run of descriptors, busy cycles at
least the words read). When nothing follows, the counters must not move after `done`.
"""
from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, Event, FallingEdge, RisingEdge, Timer, with_timeout

from ndpmoe.model.contract import (ACC_BITS, COUNTER_BITS, COUNTERS, STATUS, ErrorCode, NdpConfig, Opcode, State,
                                   output_struct)

from .workload import Step

PERIOD_NS = 10
STALL_RATES = (0, 0, 1, 3, 6, 10, 14)       # n/16 per cycle, chosen per step


@dataclass
class Tally:
    steps: int = 0
    results: int = 0
    errors_checked: int = 0
    resets: int = 0
    closure_steps: int = 0          # directed steps for coverage bins the random ones missed
    cycles: int = 0
    mismatches: list[str] = field(default_factory=list)


def signed_value(raw: int) -> int:
    return raw - (1 << ACC_BITS) if raw >> (ACC_BITS - 1) else raw


class NdpTB:
    def __init__(self, dut, cfg: NdpConfig, *, seed: int, mem_words: int, result_words: int):
        self.dut, self.cfg = dut, cfg
        self.rng = random.Random(seed)
        self.mem_words, self.result_words = mem_words, result_words
        self.result_struct = output_struct(cfg.t_max)
        self.tally = Tally()
        self.coverage = None            # an NdpCoverage to sample (sim/ndp_coverage.py), if any
        self._cmd_waits: dict[int, int] = {}
        self._port_waits = (0, 0)
        self.log = dut._log
        # Python-mode port models (see _python_port_models).
        self.py_stall = (0.0, 0.0, 0.0, 0.0)
        self.py_results: list[tuple[int, int, int]] = []
        self._py_image = b""
        self._py_queue: list[list[int]] = []

    # -- clock, reset, plain signals -------------------------------------------------------------
    async def start(self, *, python_ports: bool) -> None:
        d = self.dut
        d.cmd__valid.value = 0
        d.cmd__payload.value = 0
        d.ext_mem.value = int(python_ports)
        d.ext_out.value = int(python_ports)
        d.mem_req__ready.value = 0
        d.mem_resp__valid.value = 0
        d.mem_resp__payload.value = 0
        d.out__ready.value = 0
        d.result_clear.value = 0
        self.set_stalls(0, 0, 0, 0)
        cocotb.start_soon(Clock(d.clk, PERIOD_NS, unit="ns").start())
        await self.reset()
        if python_ports:
            cocotb.start_soon(self._python_port_models())

    async def reset(self, cycles: int = 3) -> None:
        self.dut.rst.value = 1
        self.dut.cmd__valid.value = 0
        await ClockCycles(self.dut.clk, cycles)
        self.dut.rst.value = 0
        await RisingEdge(self.dut.clk)

    def set_stalls(self, req: int, resp: int, read: int, out: int) -> None:
        d = self.dut
        d.req_stall.value, d.resp_stall.value, d.read_stall.value, d.out_stall.value = req, resp, read, out

    def random_stalls(self) -> None:
        rates = [self.rng.choice(STALL_RATES) for _ in range(4)]
        self.set_stalls(*rates)
        self.py_stall = tuple(r / 16 for r in rates)

    def status(self) -> tuple[State, ErrorCode]:
        f = STATUS.unpack(int(self.dut.status.value))
        return State(f["state"]), ErrorCode(f["error"])

    def counters(self) -> dict[str, int]:
        raw = int(self.dut.counters.value)
        mask = (1 << COUNTER_BITS) - 1
        return {name: (raw >> (i * COUNTER_BITS)) & mask for i, name in enumerate(COUNTERS)}

    # -- memory and results through VPI ------------------------------------------------------------
    def load_memory(self, image: bytes, *, python_ports: bool = False) -> None:
        wb = self.cfg.word_bytes
        if len(image) > self.mem_words * wb:
            raise ValueError(f"image of {len(image)} bytes exceeds the harness memory of {self.mem_words * wb}")
        self._py_image = bytes(image)
        if python_ports:
            return                                  # the Python memory model reads the image itself
        mem = self.dut.storage.ram.mem
        for i in range(0, len(image), wb):
            mem[i // wb].value = int.from_bytes(image[i:i + wb], "little")

    def decode(self, raw: int) -> tuple[int, int, int]:
        f = self.result_struct.unpack(raw)
        return f["token"], f["row"], signed_value(f["value"])

    def read_results(self, first: int, last: int) -> list[tuple[int, int, int]]:
        if last - first > self.result_words:
            raise ValueError(f"{last - first} results overflow the harness's {self.result_words}")
        ram = self.dut.results.ram.mem
        return [self.decode(int(ram[i % self.result_words].value)) for i in range(first, last)]

    # -- command driver --------------------------------------------------------------------------
    def present(self, step: Step) -> None:
        self.dut.cmd__payload.value = step.raw
        self.dut.cmd__valid.value = 1

    async def handshake(self) -> None:
        """Wait for the presented descriptor to be taken (ready falls right after the transfer)."""
        await FallingEdge(self.dut.cmd__ready)
        self.dut.cmd__valid.value = 0

    async def hand_over(self, step: Step) -> None:
        """Present `step`, wait for its transfer; note how long the command port held it."""
        waits0 = int(self.dut.cmd_waits.value)
        self.present(step)
        await self.handshake()
        self._cmd_waits[id(step)] = int(self.dut.cmd_waits.value) - waits0
        if self.coverage is not None:
            self.coverage.handed_over(self._inflight[-1] if self._inflight else None, step)

    def step_timeout_ns(self, step: Step) -> int:
        beats = step.words * self.cfg.passes(max(1, min(step.descriptor.tokens, self.cfg.t_max)))
        return PERIOD_NS * (2000 + 64 * (beats + len(step.results)))

    # -- one run ------------------------------------------------------------------------------------
    async def run_steps(self, steps: list[Step], *, python_ports: bool, queued: bool = False,
                        stalls: tuple[int, int, int, int] | None = None) -> None:
        """Hand `steps` to the unit, queued or one at a time (`queued`: each as soon as the unit
        takes it), and check each at its `done`. Stall rates random per step, or `stalls`."""
        self._python_ports = python_ports
        self._inflight: deque[Step] = deque()
        self._drained = Event()
        self._drained.set()
        self._checked = Event()
        self._result_cursor = len(self.py_results) if python_ports else int(self.dut.result_count.value)
        self._last_counters = self.counters()
        self._run_busy = self._run_words = 0
        self._checked_last: Step | None = None         # checked since the unit was last seen idle
        monitor = cocotb.start_soon(self._monitor())
        i = 0
        try:
            while i < len(steps):
                step = steps[i]
                if step.reset_after is not None:
                    if not await self._drain():
                        return
                    # a step queued behind it is cut too, and handed over again next
                    await self._reset_during(step, steps[i + 1] if i + 1 < len(steps) else None)
                    i += 1
                    continue
                ahead = 4 if queued else self.rng.choice((0, 1, 1, 2, 3, 4))   # in flight before this one
                if ahead == 0:
                    if not await self._drain():
                        return
                while len(self._inflight) > ahead:
                    if not await self._wait_done():
                        return
                gap = 0 if queued else self.rng.choice((0, 0, 0, 1, 2, 5))
                if gap:
                    await Timer(gap * PERIOD_NS, unit="ns")
                if stalls is None:
                    self.random_stalls()
                else:
                    self.set_stalls(*stalls)
                await self.hand_over(step)
                self._inflight.append(step)
                self._drained.clear()
                i += 1
            await self._drain()
        finally:
            monitor.cancel()

    async def _wait_done(self) -> bool:
        """Wait until the oldest descriptor in flight has been checked; False on a hang."""
        oldest = self._inflight[0]
        timeout = sum(self.step_timeout_ns(s) for s in self._inflight)
        while self._inflight and self._inflight[0] is oldest:
            self._checked.clear()
            try:
                await with_timeout(self._checked.wait(), timeout, "ns")
            except cocotb.triggers.SimTimeoutError:
                self.fail(oldest, f"no `done` within {timeout // PERIOD_NS} cycles (hang)")
                return False
        return True

    async def _drain(self) -> bool:
        """Wait until nothing is in flight; then the counters must stand still. False on a hang."""
        if self._inflight:
            timeout = sum(self.step_timeout_ns(s) for s in self._inflight)
            try:
                await with_timeout(self._drained.wait(), timeout, "ns")
            except cocotb.triggers.SimTimeoutError:
                self.fail(self._inflight[0], f"no `done` within {timeout // PERIOD_NS} cycles (hang)")
                return False
        if self._checked_last is not None:
            # nothing runs now: every count must have been complete when the last `done` rose
            await Timer(3 * PERIOD_NS, unit="ns")
            if self.counters() != self._last_counters:
                self.fail(self._checked_last, f"counters still moving after done: {self._last_counters} -> "
                                              f"{self.counters()}")
            if self._run_busy < self._run_words:
                self.fail(self._checked_last, f"busy for {self._run_busy} cycles while reading {self._run_words} "
                                              f"words since the unit was last idle")
            self._run_busy = self._run_words = 0
            made = len(self.py_results) if self._python_ports else int(self.dut.result_count.value)
            if made != self._result_cursor:
                self.fail(self._checked_last, f"{made - self._result_cursor} results beyond the expected ones")
                self._result_cursor = made
            self._checked_last = None
        return True

    async def _monitor(self) -> None:
        while True:
            await RisingEdge(self.dut.done)
            if not self._inflight:
                self.fail(Step({}, ErrorCode.NONE, [], 0), "`done` with no descriptor in flight")
                continue
            step = self._inflight.popleft()
            self.check(step)
            self._checked_last = step
            self._checked.set()
            if not self._inflight:
                self._drained.set()

    async def _reset_during(self, step: Step, nxt: Step | None) -> None:
        """Run `step` alone and reset the unit `step.reset_after` cycles after its handshake;
        sometimes with `nxt` queued behind it first (the reset cuts both)."""
        queue_next = (nxt is not None and nxt.reset_after is None and self.rng.random() < 0.5)
        self.random_stalls()
        await self.hand_over(step)
        waited = 0
        if queue_next:
            self.present(nxt)
            taken = cocotb.start_soon(self.handshake())
            await Timer(min(2, step.reset_after) * PERIOD_NS, unit="ns")
            waited = min(2, step.reset_after)
            if not taken.done():
                taken.cancel()
                self.dut.cmd__valid.value = 0
                queue_next = False
        if step.reset_after > waited:
            await Timer((step.reset_after - waited) * PERIOD_NS, unit="ns")
        await self._reset_and_check(step, queue_next)

    async def _reset_and_check(self, step: Step | None, queued: bool) -> None:
        """Reset now, with `step` (None: nothing) in the unit: sample the state the reset found,
        then the unit must be IDLE with every count and result gone."""
        if self.coverage is not None:
            self.coverage.reset(*self._unit_state(step), queued)
        await self.reset()
        self.tally.resets += 1
        self.tally.steps += 1
        step = step if step is not None else Step({}, ErrorCode.NONE, [], 0)
        state, error = self.status()
        if (state, error) != (State.IDLE, ErrorCode.NONE):
            self.fail(step, f"after reset the status is {state.name}/{error.name}, not IDLE/NONE")
        if any(self.counters().values()) or int(self.dut.result_count.value):
            self.fail(step, f"after reset the counters are {self.counters()}")
        self._last_counters = self.counters()
        self._result_cursor = len(self.py_results) if self._python_ports else 0
        self._port_waits = (int(self.dut.req_waits.value), int(self.dut.resp_waits.value))

    def _unit_state(self, step: Step | None) -> tuple[str, str | None]:
        """What `step` (the oldest in the unit) has done so far, from the live word count."""
        if step is None:
            return "idle", None
        words = self.counters()["words_read"] - self._last_counters["words_read"]
        phase = "before_first_word" if words == 0 else "reading" if words < step.words else "draining"
        return Opcode(step.descriptor.opcode).name, phase

    async def reset_in_phase(self, case) -> None:
        """A directed reset (sim/coverage_closure.py): run `case.setup`, hand over `case.first`
        (and `case.queued` behind it), reset once the unit is in `case.phase`."""
        await self.run_steps([case.setup], python_ports=False)
        if case.first is None:
            await self._reset_and_check(None, False)
            return
        self.random_stalls()
        await self.hand_over(case.first)
        if case.queued is not None:
            await self.hand_over(case.queued)
        limit = self.step_timeout_ns(case.first) // PERIOD_NS
        for _ in range(limit):
            if self._unit_state(case.first)[1] == case.phase or (
                    case.phase == "before_first_word"):
                break
            await RisingEdge(self.dut.clk)
            if self.dut.done.value:
                self.fail(case.first, f"ended before the unit was seen {case.phase}")
                break
        await self._reset_and_check(case.first, case.queued is not None)

    # -- checker --------------------------------------------------------------------------------------
    def fail(self, step: Step, message: str) -> None:
        text = f"step {self.tally.steps} [{step.describe() if step.descriptor else '-'}]: {message}"
        self.tally.mismatches.append(text)
        if len(self.tally.mismatches) <= 10:
            self.log.error(text)

    def _take_results(self, n: int) -> list[tuple[int, int, int]]:
        first = self._result_cursor
        if self._python_ports:
            got = list(self.py_results[first:first + n])
        else:
            last = min(first + n, int(self.dut.result_count.value))
            got = self.read_results(first, last)
        self._result_cursor = first + len(got)
        return got

    def check(self, step: Step) -> None:
        self.tally.steps += 1
        got = self._take_results(len(step.results))
        self.tally.results += len(got)
        state, error = self.status()
        expect_state = State.DONE if step.error == ErrorCode.NONE else State.ERROR
        if (state, error) != (expect_state, step.error):
            self.fail(step, f"status {state.name}/{error.name}, expected {expect_state.name}/{step.error.name}")
        if step.error != ErrorCode.NONE:
            self.tally.errors_checked += 1
        if got != step.results:
            bad = next((k for k, (a, b) in enumerate(zip(got, step.results)) if a != b), min(len(got), len(step.results)))
            self.fail(step, f"{len(got)} results, expected {len(step.results)}; first difference at {bad}: "
                            f"got {got[bad:bad + 2]}, expected {step.results[bad:bad + 2]}")
        after = self.counters()
        delta = {k: after[k] - self._last_counters[k] for k in after}
        self._last_counters = after
        self.tally.cycles += delta["busy_cycles"]
        self._run_busy += delta["busy_cycles"]
        self._run_words += delta["words_read"]
        if delta["words_read"] != step.words:
            self.fail(step, f"read {delta['words_read']} words, expected {step.words} (0 for a refused descriptor)")
        if delta["results_written"] != len(step.results):
            self.fail(step, f"counted {delta['results_written']} results, expected {len(step.results)}")
        if delta["busy_cycles"] == 0:
            self.fail(step, "no busy cycle")
        for name in ("mem_stall_cycles", "out_stall_cycles"):
            if delta[name] > delta["busy_cycles"]:
                self.fail(step, f"{name} {delta[name]} exceeds busy cycles {delta['busy_cycles']}")
        if self.coverage is not None:
            req, resp = int(self.dut.req_waits.value), int(self.dut.resp_waits.value)
            waits = {"command": self._cmd_waits.pop(id(step), 0), "mem_request": req - self._port_waits[0],
                     "mem_response_late": delta["mem_stall_cycles"], "mem_response_held": resp - self._port_waits[1],
                     "result": delta["out_stall_cycles"]}
            self._port_waits = (req, resp)
            self.coverage.checked(step, waits)

    # -- Python memory model and output consumer (ext_mem / ext_out) ---------------------------------
    async def _python_port_models(self) -> None:
        d, rng, wb = self.dut, self.rng, self.cfg.word_bytes
        cycle, req_ready, resp_valid, out_ready = 0, 0, 0, 0
        while True:
            await RisingEdge(d.clk)
            cycle += 1
            if d.rst.value:
                self._py_queue.clear()
                req_ready = resp_valid = out_ready = 0
                d.mem_req__ready.value = d.mem_resp__valid.value = d.out__ready.value = 0
                continue
            p_req, p_resp, p_lat, p_out = self.py_stall
            # What happened at this edge (values sampled before it).
            if req_ready and d.mem_req__valid.value:
                raw = int(d.mem_req__payload.value)
                addr, words = raw & ((1 << self.cfg.addr_bits) - 1), raw >> self.cfg.addr_bits
                latency = rng.randint(0, 8) if rng.random() < p_lat * 2 else 0
                self._py_queue.append([addr, words, cycle + latency])
            if resp_valid and d.mem_resp__ready.value:
                head = self._py_queue[0]
                head[0] += wb
                head[1] -= 1
                if head[1] == 0:
                    self._py_queue.pop(0)
                resp_valid = 0
            if out_ready and d.out__valid.value:
                self.py_results.append(self.decode(int(d.out__payload.value)))
            # What to drive until the next edge. A response, once valid, holds until taken.
            req_ready = int(rng.random() >= p_req)
            d.mem_req__ready.value = req_ready
            if not resp_valid and self._py_queue and self._py_queue[0][2] <= cycle and rng.random() >= p_resp:
                addr = self._py_queue[0][0] % (self.mem_words * wb)
                d.mem_resp__payload.value = int.from_bytes(self._py_image[addr:addr + wb].ljust(wb, b"\0"), "little")
                resp_valid = 1
            d.mem_resp__valid.value = resp_valid
            out_ready = int(rng.random() >= p_out)
            d.out__ready.value = out_ready
