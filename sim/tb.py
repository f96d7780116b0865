"""The cocotb test bench of the NDP unit: model + drivers + monitors + checker, in one TB class.

The design under test is rtl.sim_harness.SimHarness (the unit, a memory model and a result sink
inside the design) so that whole descriptors run without Python touching a signal each cycle.
Two ways to run a step, both with random stalls on every handshake:

- "harness": the harness's memory and sink, stalled by LFSRs at rates the TB picks per step
  (request handshake, response handshake, read latency, output back-pressure); Python only sends
  the descriptor, waits for `done` and reads the results RAM through VPI.
- "python":  `ext_mem` / `ext_out` hand the unit's memory ports and output stream to this file's
  coroutine (`_python_port_models`): a queue of requests with a random latency each, responses
  with random gaps, random output back-pressure; slow (Python every cycle) but independent of
  the harness's own memory model.

The command handshake is stalled too: a random gap before each descriptor, and sometimes the next
descriptor is presented while the unit is still BUSY (valid held until it is taken).

The checker compares every step with its golden expectation (sim/workload.py): the results,
bit-exact and in order (so none lost or duplicated), the status (state and error code) and the
counters (words read, results written, and busy cycles at least the words read).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge, RisingEdge, Timer, with_timeout

from ndpmoe.model.contract import (ACC_BITS, COUNTER_BITS, COUNTERS, STATUS, ErrorCode, NdpConfig, State,
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

    def step_timeout_ns(self, step: Step) -> int:
        beats = step.words * self.cfg.passes(max(1, min(step.descriptor.tokens, self.cfg.t_max)))
        return PERIOD_NS * (2000 + 64 * (beats + len(step.results)))

    # -- one run ------------------------------------------------------------------------------------
    async def run_steps(self, steps: list[Step], *, python_ports: bool) -> None:
        presented = False
        for i, step in enumerate(steps):
            self.random_stalls()
            if not presented:
                gap = self.rng.choice((0, 0, 1, 2, 5))
                if gap:
                    await Timer(gap * PERIOD_NS, unit="ns")
                self.present(step)
            await self.handshake()
            count0 = len(self.py_results) if python_ports else int(self.dut.result_count.value)
            before = self.counters()
            nxt = steps[i + 1] if i + 1 < len(steps) else None
            presented = (nxt is not None and step.reset_after is None and nxt.reset_after is None
                         and self.rng.random() < 0.25)
            if presented:
                self.present(nxt)                   # held while the unit is BUSY
            if step.reset_after is not None:
                await self._reset_during(step)
                continue
            try:
                await with_timeout(RisingEdge(self.dut.done), self.step_timeout_ns(step), "ns")
            except cocotb.triggers.SimTimeoutError:
                self.fail(step, f"no `done` within {self.step_timeout_ns(step) // PERIOD_NS} cycles (hang)")
                return
            if python_ports:
                got = list(self.py_results[count0:])
            else:
                got = self.read_results(count0, int(self.dut.result_count.value))
            after = self.counters()
            self.check(step, got, before, after)
            if not presented:
                # nothing runs now: every count must have been complete when `done` rose
                await Timer(3 * PERIOD_NS, unit="ns")
                if self.counters() != after:
                    self.fail(step, f"counters still moving after done: {after} -> {self.counters()}")

    async def _reset_during(self, step: Step) -> None:
        await Timer(step.reset_after * PERIOD_NS, unit="ns")
        await self.reset()
        self.tally.resets += 1
        self.tally.steps += 1
        state, error = self.status()
        if (state, error) != (State.IDLE, ErrorCode.NONE):
            self.fail(step, f"after reset the status is {state.name}/{error.name}, not IDLE/NONE")
        if any(self.counters().values()) or int(self.dut.result_count.value):
            self.fail(step, f"after reset the counters are {self.counters()}")

    # -- checker --------------------------------------------------------------------------------------
    def fail(self, step: Step, message: str) -> None:
        text = f"step {self.tally.steps} [{step.describe()}]: {message}"
        self.tally.mismatches.append(text)
        if len(self.tally.mismatches) <= 10:
            self.log.error(text)

    def check(self, step: Step, got, before, after) -> None:
        self.tally.steps += 1
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
        delta = {k: after[k] - before[k] for k in after}
        self.tally.cycles += delta["busy_cycles"]
        if delta["words_read"] != step.words:
            self.fail(step, f"read {delta['words_read']} words, expected {step.words} (0 for a refused descriptor)")
        if delta["results_written"] != len(step.results):
            self.fail(step, f"counted {delta['results_written']} results, expected {len(step.results)}")
        if delta["busy_cycles"] < step.words or delta["busy_cycles"] == 0:
            self.fail(step, f"busy for {delta['busy_cycles']} cycles while reading {step.words} words")
        for name in ("mem_stall_cycles", "out_stall_cycles"):
            if delta[name] > delta["busy_cycles"]:
                self.fail(step, f"{name} {delta[name]} exceeds busy cycles {delta['busy_cycles']}")

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
