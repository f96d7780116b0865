"""The host runtime's NdpBackend over the Verilator-simulated RTL (cocotb), for co-simulation.

The host runtime runs in a thread started with `cocotb.task.bridge`; each `run(descriptor)`
resumes into the simulator (`cocotb.task.resume`), issues the descriptor on the harness's command
port, waits for `done` and reads the results RAM and the counters back. Python never touches a
signal per cycle: whole descriptors run inside the design (rtl/sim_harness.py), with the
harness's LFSR stalls on the memory and output handshakes when `stalls` asks for them.

Memory: the host addresses a large memory (`mem_bytes`, by default 16 MiB, enough for every
expert of a layer); the harness RAM is smaller and its addresses wrap. The backend keeps the large
memory itself and, before each descriptor, writes through VPI the words the descriptor will read
that the RAM does not hold yet (it remembers which address each RAM word holds). The unit reads
the same addresses either way; only what has to be loaded, and when, differs from a RAM as large
as the address space. Writes take no simulated time, so cycle counts are unaffected.

Every descriptor also runs on the bit-exact golden unit over the same memory: its records carry
the largest |RTL - golden| of the results (0 when bit-exact; None when the results do not even
line up), the unit's counter deltas and the beats the contract implies.

Faults (`inject`), `cycles` into the n-th descriptor: "hang" makes the memory stop answering
(requests are taken, no word ever returns), which the timeout turns into NdpTimeout naming the
descriptor; "reset" resets the unit, reported as NdpReset. `reset()` brings the unit back (the
RAM keeps its contents, as a memory would).
"""
from __future__ import annotations

import random
import threading
from dataclasses import asdict, dataclass

import numpy as np
from cocotb.task import resume
from cocotb.triggers import ClockCycles, FallingEdge, First, RisingEdge, Timer

from ndpmoe.host.ndp import NdpError, NdpResult
from ndpmoe.model.contract import COUNTERS, GROUP_SIZES, Descriptor, ErrorCode, Opcode, State
from ndpmoe.model.ndp_golden import NdpGoldenUnit

from .tb import PERIOD_NS, STALL_RATES, NdpTB

_DEPOSIT = 0          # cocotb.handle._GPISetAction.DEPOSIT


class NdpTimeout(NdpError):
    """A descriptor did not finish in time (the memory stopped answering, or the unit hung)."""


class NdpReset(NdpError):
    """The unit was reset while a descriptor ran."""


@dataclass(frozen=True)
class Fault:
    kind: str                 # "hang" | "reset"
    at: int                   # index of the descriptor (in this backend's order) it hits
    cycles: int = 50          # cycles after the descriptor is taken

    def __post_init__(self):
        if self.kind not in ("hang", "reset"):
            raise ValueError(f"fault kind must be 'hang' or 'reset', not {self.kind!r}")
        if self.at < 0 or self.cycles < 1:
            raise ValueError(f"fault needs at >= 0 and cycles >= 1, not at={self.at}, cycles={self.cycles}")


@dataclass
class DescriptorRecord:
    """One descriptor as the RTL ran it."""
    index: int
    opcode: str
    tokens: int
    rows: int
    in_features: int
    bits: int
    group_size: int
    words: int                 # words_read counter delta
    once_words: int            # of which streamed once (metadata, 3-bit hi planes; all of a LOAD_ACT)
    passes: int                # passes over the other words (MATMUL: ceil(T / tokens_parallel))
    beats: int                 # datapath beats the contract implies (Descriptor.beats)
    busy_cycles: int
    mem_stall_cycles: int
    out_stall_cycles: int
    results: int
    max_abs_diff: int | None   # largest |RTL - golden| over the results; None: results do not line up
    stalls: tuple[int, int, int, int]
    loaded_words: int          # words written into the harness RAM before it (not simulated time)


class RtlNdpBackend:
    """NdpBackend (host/ndp.py) over the simulated RTL. Build it inside a cocotb test after
    `await tb.start(python_ports=False)`; call `run` from a `cocotb.task.bridge` thread (or
    `run_async` from a coroutine).

    stalls: None (memory and output always ready), "random" (rates n/16 drawn per descriptor
    from tb.STALL_RATES with `seed`), or fixed (req, resp, read, out) rates.
    """

    def __init__(self, tb: NdpTB, *, mem_bytes: int = 1 << 24, stalls=None, seed: int = 0,
                 timeout_factor: float = 16.0):
        cfg = tb.cfg
        if mem_bytes % cfg.word_bytes or mem_bytes > cfg.mem_bytes:
            raise ValueError(f"mem_bytes must be a multiple of {cfg.word_bytes} up to {cfg.mem_bytes}, not {mem_bytes}")
        self.tb, self.config = tb, cfg
        self.mem_bytes = mem_bytes
        self.golden = NdpGoldenUnit(cfg, mem=bytearray(mem_bytes))
        self.records: list[DescriptorRecord] = []
        self.faults: list[Fault] = []
        self.timeout_factor = timeout_factor
        self.set_stalls(stalls)
        self._rng = random.Random(seed)
        self._owner = np.full(tb.mem_words, -1, dtype=np.int64)   # virtual word each RAM word holds
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._issued = 0                                           # descriptors issued, faults count these
        self._mem = tb.dut.storage.ram.mem
        self._mem_handles: dict = {}
        self._res_handles: dict = {}

    # -- settings ----------------------------------------------------------------------------------
    def set_stalls(self, stalls) -> None:
        if stalls is not None and stalls != "random":
            if len(stalls) != 4 or any(not 0 <= int(r) <= 15 for r in stalls):
                raise ValueError(f"stalls must be None, 'random' or four rates in 0..15, not {stalls!r}")
            stalls = tuple(int(r) for r in stalls)
        self.stalls = stalls

    def inject(self, fault: Fault) -> None:
        self.faults.append(fault)

    @property
    def issued(self) -> int:
        """Descriptors issued so far (a Fault's `at` counts in these)."""
        return self._issued

    # -- NdpBackend ---------------------------------------------------------------------------------
    def write(self, addr: int, data: bytes) -> None:
        if not data:
            return
        wb = self.config.word_bytes
        first, last = addr // wb, (addr + len(data) - 1) // wb
        old = np.frombuffer(self.golden.mem, dtype=np.uint8, count=(last - first + 1) * wb, offset=first * wb).copy() \
            if (last + 1) * wb <= self.mem_bytes else None
        self.golden.write(addr, data)
        if old is None:
            return
        new = np.frombuffer(self.golden.mem, dtype=np.uint8, count=old.size, offset=first * wb)
        # Only words whose bytes changed leave the RAM stale (placing the same image again is free).
        changed = np.nonzero((old != new).reshape(-1, wb).any(axis=1))[0] + first
        phys = changed % len(self._owner)
        hit = self._owner[phys] == changed
        self._owner[phys[hit]] = -1

    def run(self, descriptor: int) -> NdpResult:
        if threading.current_thread() is threading.main_thread():
            raise RuntimeError("RtlNdpBackend.run blocks: call it from a cocotb.task.bridge thread, or await run_async")
        return resume(self.run_async)(descriptor)

    def counters(self) -> dict[str, int]:
        """Counter deltas summed over the descriptors this backend ran (they survive resets)."""
        return dict(self._counters)

    def reset(self) -> None:
        if threading.current_thread() is threading.main_thread():
            raise RuntimeError("RtlNdpBackend.reset blocks: call it from a cocotb.task.bridge thread, or await reset_async")
        resume(self.reset_async)()

    # -- simulator side -----------------------------------------------------------------------------
    async def reset_async(self) -> None:
        dut = self.tb.dut
        dut.ext_mem.value = 0
        dut.mem_req__ready.value = 0
        await self.tb.reset()
        self.golden.act = None                    # the unit's activation buffer is gone with the reset

    def _load_words(self, addr: int, nbytes: int) -> int:
        """Write into the harness RAM the words of [addr, addr + nbytes) it does not hold."""
        wb, depth = self.config.word_bytes, len(self._owner)
        first, last = addr // wb, (addr + nbytes - 1) // wb
        if last - first + 1 > depth:
            raise ValueError(f"a descriptor reading {nbytes} bytes at {addr:#x} needs more than the harness "
                             f"RAM's {depth * wb} bytes; build the harness with more mem_words")
        virt = np.arange(first, last + 1)
        phys = virt % depth
        stale = np.nonzero(self._owner[phys] != virt)[0]
        image, width = self.golden.mem, self.config.word_bits
        for i in stale.tolist():
            v = first + i
            word = int.from_bytes(image[v * wb:(v + 1) * wb], "little")
            self._ram_word(int(phys[i])).set_signal_val_binstr(_DEPOSIT, f"{word:0{width}b}")
        self._owner[phys[stale]] = virt[stale]
        return len(stale)

    # cocotb's `.value` costs ~40 us per RAM word (LogicArray objects, scheduled writes); the GPI
    # handle's binary-string calls ~3 us. The RAMs are written only here, between descriptors.
    def _ram_word(self, i: int):
        h = self._mem_handles.get(i)
        if h is None:
            h = self._mem_handles[i] = self._mem[i]._handle
        return h

    def _read_results(self, first: int, last: int) -> list[tuple[int, int, int]]:
        ram, words, out = self.tb.dut.results.ram.mem, self.tb.result_words, []
        if last - first > words:
            raise ValueError(f"{last - first} results overflow the harness's result RAM of {words}; "
                             f"build the harness with more result_words")
        for i in range(first, last):
            h = self._res_handles.get(i % words)
            if h is None:
                h = self._res_handles[i % words] = ram[i % words]._handle
            out.append(self.tb.decode(int(h.get_signal_val_binstr(), 2)))
        return out

    def _timeout_cycles(self, beats: int, results: int) -> int:
        return int(2000 + self.timeout_factor * (beats + results))

    def _apply_stalls(self) -> tuple[int, int, int, int]:
        if self.stalls is None:
            rates = (0, 0, 0, 0)
        elif self.stalls == "random":
            rates = tuple(self._rng.choice(STALL_RATES) for _ in range(4))
        else:
            rates = self.stalls
        self.tb.set_stalls(*rates)
        return rates

    async def run_async(self, descriptor: int) -> NdpResult:
        tb, dut, cfg = self.tb, self.tb.dut, self.config
        d = Descriptor.decode(descriptor)
        index = self._issued
        self._issued += 1
        expect = self.golden.execute(d)
        expect_state = State.ERROR if self.golden.error != ErrorCode.NONE else State.DONE
        loaded = 0
        words, once, passes, beats = 0, 0, 1, 0
        if expect_state == State.DONE:
            words, once, passes, beats = d.words(cfg), d.once_words(cfg), d.passes(cfg), d.beats(cfg)
            nbytes = d.read_bytes(cfg)
            if nbytes:
                if d.addr + nbytes > self.mem_bytes:
                    raise ValueError(f"{d.describe()} reads past the backend's {self.mem_bytes}-byte memory")
                loaded = self._load_words(d.addr, nbytes)
        fault = next((f for f in self.faults if f.at == index), None)
        rates = self._apply_stalls()
        before = tb.counters()
        count0 = int(dut.result_count.value)
        limit = self._timeout_cycles(beats, len(expect))
        dut.cmd__payload.value = descriptor
        dut.cmd__valid.value = 1
        taken = await First(FallingEdge(dut.cmd__ready), Timer(limit * PERIOD_NS, unit="ns"))
        dut.cmd__valid.value = 0
        if isinstance(taken, Timer):
            raise NdpTimeout(f"descriptor #{index} ({d.describe()}) was not taken within {limit} cycles")
        done = RisingEdge(dut.done)
        ended = None
        if fault is not None:
            ended = await First(done, ClockCycles(dut.clk, fault.cycles))
            if isinstance(ended, ClockCycles):
                ended = None
                progress = {k: v - before[k] for k, v in tb.counters().items()}
                if fault.kind == "reset":
                    await self.reset_async()
                    raise NdpReset(f"unit reset {fault.cycles} cycles into descriptor #{index} ({d.describe()}) "
                                   f"after {progress['words_read']} of {words} words")
                dut.ext_mem.value = 1             # the unit's memory port now goes nowhere:
                dut.mem_req__ready.value = 1      # requests are taken, no word ever comes back
                dut.mem_resp__valid.value = 0
        if ended is None:
            ended = await First(done, Timer(limit * PERIOD_NS, unit="ns"))
        if isinstance(ended, Timer):
            progress = {k: v - before[k] for k, v in tb.counters().items()}
            raise NdpTimeout(f"descriptor #{index} ({d.describe()}) hung: no `done` within {limit} cycles; "
                             f"{progress['words_read']} of {words} words read, "
                             f"{progress['results_written']} of {len(expect)} results; reset the unit")
        after = tb.counters()
        delta = {k: after[k] - before[k] for k in after}
        for k, v in delta.items():
            self._counters[k] += v
        state, error = tb.status()
        got = self._read_results(count0, int(dut.result_count.value)) if delta["results_written"] else []
        self.records.append(DescriptorRecord(
            index, d.opcode.name if isinstance(d.opcode, Opcode) else "BAD",
            d.tokens, d.rows, d.in_features, d.bits, GROUP_SIZES.get(d.group, 0),
            delta["words_read"], once, passes, beats, delta["busy_cycles"], delta["mem_stall_cycles"],
            delta["out_stall_cycles"], len(got), _max_abs_diff(got, expect), rates, loaded))
        if (state, error) != (expect_state, self.golden.error):
            raise NdpError(f"descriptor #{index} ({d.describe()}): RTL status {state.name}/{error.name}, "
                           f"golden {expect_state.name}/{ErrorCode(self.golden.error).name}")
        if state == State.ERROR:
            raise NdpError(f"NDP refused descriptor {d.describe()}: {error.name}")
        return NdpResult(got, float(delta["busy_cycles"]))

    def record_dicts(self) -> list[dict]:
        return [asdict(r) for r in self.records]


def _max_abs_diff(got: list[tuple[int, int, int]], expect: list[tuple[int, int, int]]) -> int | None:
    if len(got) != len(expect) or any(g[:2] != e[:2] for g, e in zip(got, expect)):
        return None
    return max((abs(g[2] - e[2]) for g, e in zip(got, expect)), default=0)
