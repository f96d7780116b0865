"""cocotb tests of rtl/hard_blocks.py's twin top (built and run by tests/test_hard_blocks.py).

The top (`HardBlockTwin`) holds the plain and the ECP5 form of each RAM and product case on the
same inputs; these tests drive random inputs every cycle and check both forms' outputs against a
Python reference with the documented latency. Inputs are driven and outputs sampled at the
falling clock edge, so a value sampled at falling edge t reflects the rising edges up to t - 1.

Options from the environment: HB_CASES (JSON: the cases and latencies), HB_SEED, HB_RAM_CYCLES,
HB_PRODUCT_CYCLES; each test writes its tally as JSON to HB_REPORT.

ram_twin: per RAM case, random writes and reads every cycle in three phases (write-heavy, mixed,
read-heavy), never reading the address written in the same cycle (undefined, RegisteredRam's
docstring). A read presented in cycle s sees every write presented before cycle s and is
compared in cycle s + RAM_READ_LATENCY, when its word was written.
ram_reset: per RAM case, words written, then a reset (write enable low throughout), then every
written word read back: a reset must not change the RAM's contents in either form.
product_twin: per product case, every pair of extreme operands (min, max, 0, +-1, ...) then
random operands, compared as signed values PRODUCT_LATENCY cycles later.
"""
from __future__ import annotations

import json
import os
import random
from collections import deque

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge

PERIOD_NS = 10
MAX_MESSAGES = 20
MAX_ERRORS = 1000


def _options():
    cases = json.loads(os.environ["HB_CASES"])
    return (cases, int(os.environ.get("HB_SEED", "1")), int(os.environ.get("HB_RAM_CYCLES", "3000")),
            int(os.environ.get("HB_PRODUCT_CYCLES", "3000")))


def _to_signed(raw: int, bits: int) -> int:
    return raw - (1 << bits) if raw >> (bits - 1) & 1 else raw


class Tally:
    def __init__(self):
        self.mismatch_count = 0
        self.mismatches: list[str] = []
        self.errors: list[dict] = []              # the same, as fields (the first MAX_ERRORS)
        self.cases: list[dict] = []

    def mismatch(self, text: str, **fields) -> None:
        self.mismatch_count += 1
        if len(self.mismatches) < MAX_MESSAGES:
            self.mismatches.append(text)
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(fields)

    def finish(self, dut, name: str) -> None:
        report = {"test": name, "mismatch_count": self.mismatch_count, "mismatches": self.mismatches,
                  "errors": self.errors, "cases": self.cases}
        if os.environ.get("HB_REPORT"):
            with open(os.environ["HB_REPORT"], "w") as f:
                json.dump(report, f, indent=1)
        dut._log.info(f"{name}: {len(self.cases)} cases, {sum(c['checked'] for c in self.cases)} checks, "
                      f"{self.mismatch_count} mismatches")
        assert self.mismatch_count == 0, self.mismatches[:5]


async def _start(dut, inputs) -> None:
    """Inputs low, clock running, three cycles of reset; returns at a falling edge."""
    for handle in inputs:
        handle.value = 0
    dut.rst.value = 1
    cocotb.start_soon(Clock(dut.clk, PERIOD_NS, unit="ns").start())
    for _ in range(3):
        await FallingEdge(dut.clk)
    dut.rst.value = 0


# -- RAM ---------------------------------------------------------------------------------------

class RamCase:
    """One RAM case: its ports, the reference contents and the reads in flight."""

    def __init__(self, dut, k: int, width: int, depth: int, latency: int, rng: random.Random):
        self.k, self.width, self.depth, self.latency, self.rng = k, width, depth, latency, rng
        self.w_addr, self.w_data = getattr(dut, f"ram{k}_w_addr"), getattr(dut, f"ram{k}_w_data")
        self.w_en, self.r_addr = getattr(dut, f"ram{k}_w_en"), getattr(dut, f"ram{k}_r_addr")
        self.gen, self.ecp5 = getattr(dut, f"ram{k}_gen"), getattr(dut, f"ram{k}_ecp5")
        self.inputs = [self.w_addr, self.w_data, self.w_en, self.r_addr]
        self.mem: dict[int, int] = {}
        self.written: list[int] = []
        self.in_flight: deque = deque()          # (cycle, address, expected or None, read-after-write)
        self.last_write: int | None = None
        abits = max(1, (depth - 1).bit_length())
        # addresses written and read often: the ends, each address bit alone, the low words
        # (a DP16KD's per-tile address register copy k resets to k), a few random ones
        self.hot = sorted({0, depth - 1, max(0, depth - 2)} | set(range(min(depth, 32)))
                          | {1 << i for i in range(abits) if 1 << i < depth}
                          | {rng.randrange(depth) for _ in range(6)})
        self.stats = {"ram": k, "width": width, "depth": depth, "checked": 0, "read_after_write": 0,
                      "writes": 0, "overwrites": 0}

    def data(self) -> int:
        rng, w = self.rng, self.width
        if rng.random() < 0.7:
            return rng.getrandbits(w)
        ones = (1 << w) - 1
        return rng.choice([0, ones, ones // 3, ones ^ (ones // 3), 1 << rng.randrange(w), 1 << (w - 1)])

    def write_address(self) -> int:
        rng = self.rng
        return rng.choice(self.hot) if rng.random() < 0.5 else rng.randrange(self.depth)

    def read_address(self) -> int:
        rng, x = self.rng, self.rng.random()
        if x < 0.25 and self.last_write is not None:
            return self.last_write
        if x < 0.6:
            return rng.choice(self.hot)
        if x < 0.85 and self.written:
            return rng.choice(self.written)
        return rng.randrange(self.depth)

    def check(self, cycle: int, tally: Tally) -> None:
        """Sample r_data of both forms; compare with the read presented `latency` cycles ago."""
        if not self.in_flight or self.in_flight[0][0] != cycle - self.latency:
            return
        _, addr, expected, raw = self.in_flight.popleft()
        if expected is None:
            return                                   # never written: undefined in both forms
        gen, ecp5 = int(self.gen.value), int(self.ecp5.value)
        self.stats["checked"] += 1
        self.stats["read_after_write"] += raw
        if not (gen == ecp5 == expected):
            tally.mismatch(f"ram{self.k} ({self.width} x {self.depth}) cycle {cycle}: read of {addr} "
                           f"presented in cycle {cycle - self.latency}: expected {expected:#x}, "
                           f"plain {gen:#x}, ecp5 {ecp5:#x}",
                           ram=self.k, cycle=cycle, addr=addr, expected=expected, gen=gen, ecp5=ecp5)

    def drive(self, cycle: int, w_en: bool, *, read: bool = True) -> None:
        """Present this cycle's write (if w_en) and read; update the reference."""
        w_addr, w_data = self.write_address(), self.data()
        r_addr = self.read_address()
        if w_en and r_addr == w_addr:
            r_addr = (r_addr + 1) % self.depth       # never read the address written this cycle
        raw = self.last_write is not None and r_addr == self.last_write
        if read:
            self.in_flight.append((cycle, r_addr, self.mem.get(r_addr), raw))
        self.w_addr.value, self.w_data.value, self.w_en.value = w_addr, w_data, int(w_en)
        self.r_addr.value = r_addr
        self.last_write = None
        if w_en:                                     # lands after this cycle's read: seen from the next
            self.stats["writes"] += 1
            if w_addr in self.mem:
                self.stats["overwrites"] += 1
            else:
                self.written.append(w_addr)
            self.mem[w_addr] = w_data
            self.last_write = w_addr


def _ram_cases(dut, cases, seed):
    rng = random.Random(seed)
    return [RamCase(dut, k, w, d, cases["ram_latency"], random.Random(rng.getrandbits(64)))
            for k, (w, d) in enumerate(cases["ram"])]


@cocotb.test()
async def ram_twin(dut):
    cases, seed, cycles, _ = _options()
    rams = _ram_cases(dut, cases, seed)
    tally = Tally()
    await _start(dut, [h for r in rams for h in r.inputs])
    phases = [(0.3, 0.9), (0.8, 0.5), (1.0, 0.05)]   # (end as a fraction of the cycles, write rate)
    for cycle in range(cycles + cases["ram_latency"] + 1):
        await FallingEdge(dut.clk)
        for r in rams:
            r.check(cycle, tally)
        if cycle < cycles:
            rate = next(p for end, p in phases if cycle < end * cycles)
            for r in rams:
                r.drive(cycle, r.rng.random() < rate)
        else:
            for r in rams:
                r.w_en.value = 0
    for r in rams:
        assert not r.in_flight, (r.k, list(r.in_flight)[:3])
    tally.cases = [r.stats for r in rams]
    tally.finish(dut, "ram_twin")


@cocotb.test()
async def ram_reset(dut):
    cases, seed, _, _ = _options()
    rams = _ram_cases(dut, cases, seed + 1)
    tally = Tally()
    await _start(dut, [h for r in rams for h in r.inputs])
    cycle = 0
    # write every hot address (the low words included) and a few random ones, reading nothing
    targets = {r.k: r.hot + [r.rng.randrange(r.depth) for _ in range(8)] for r in rams}
    for i in range(max(len(t) for t in targets.values())):
        await FallingEdge(dut.clk)
        for r in rams:
            if i < len(targets[r.k]):
                r.write_address = lambda a=targets[r.k][i]: a
                r.drive(cycle, True, read=False)
            else:
                r.w_en.value = 0
        cycle += 1
    for r in rams:
        del r.write_address                       # back to the class's method
    # idle, then a reset of a few cycles with the write enable low, then idle again
    for rst in (0, 0, 0, 1, 1, 1, 1, 0, 0):
        await FallingEdge(dut.clk)                # (the last write was taken at the edge before)
        for r in rams:
            r.w_en.value = 0
        dut.rst.value = rst
        cycle += 1
    await FallingEdge(dut.clk)
    cycle += 1
    # read every written word back, one a cycle
    order = {r.k: sorted(r.mem) for r in rams}
    for i in range(max(len(o) for o in order.values()) + cases["ram_latency"] + 1):
        for r in rams:
            r.check(cycle, tally)
            if i < len(order[r.k]):
                addr = order[r.k][i]
                r.in_flight.append((cycle, addr, r.mem[addr], False))
                r.r_addr.value = addr
        await FallingEdge(dut.clk)
        cycle += 1
    for r in rams:
        assert not r.in_flight, (r.k, list(r.in_flight)[:3])
    tally.cases = [r.stats for r in rams]
    tally.finish(dut, "ram_reset")


# -- product -----------------------------------------------------------------------------------

class ProductCase:
    def __init__(self, dut, k: int, case: dict, latency: int, rng: random.Random):
        self.k, self.latency, self.rng = k, latency, rng
        self.width = case["width"]
        self.a_port, self.b_port = getattr(dut, f"mul{k}_a"), getattr(dut, f"mul{k}_b")
        self.gen, self.ecp5 = getattr(dut, f"mul{k}_gen"), getattr(dut, f"mul{k}_ecp5")
        self.a_bits, self.b_bits = case["a_bits"], case["b_bits"]
        self.a_range = self._range(case["a_bits"], case["a_signed"])
        self.b_range = self._range(case["b_bits"], case["b_signed"])
        self.a_ext, self.b_ext = self._extremes(*self.a_range), self._extremes(*self.b_range)
        # every pair of extremes first, in a shuffled order, then random operands
        self.script = [(a, b) for a in self.a_ext for b in self.b_ext]
        rng.shuffle(self.script)
        self.in_flight: deque = deque()
        self.stats = {"product": k, **case, "checked": 0, "extremes": 0}

    @staticmethod
    def _range(bits, is_signed):
        return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if is_signed else (0, (1 << bits) - 1)

    @staticmethod
    def _extremes(lo, hi):
        return sorted({lo, hi, 0, min(hi, 1), max(lo, -1), min(hi, lo + 1), max(lo, hi - 1)})

    def operand(self, lo, hi, extremes):
        return self.rng.choice(extremes) if self.rng.random() < 0.2 else self.rng.randint(lo, hi)

    def drive(self, cycle: int) -> None:
        if cycle < len(self.script):
            a, b = self.script[cycle]
        else:
            a = self.operand(*self.a_range, self.a_ext)
            b = self.operand(*self.b_range, self.b_ext)
        extreme = a in (self.a_range[0], self.a_range[1]) and b in (self.b_range[0], self.b_range[1])
        self.a_port.value = a & ((1 << self.a_bits) - 1)
        self.b_port.value = b & ((1 << self.b_bits) - 1)
        self.in_flight.append((cycle, a, b, extreme))

    def check(self, cycle: int, tally: Tally) -> None:
        if not self.in_flight or self.in_flight[0][0] != cycle - self.latency:
            return
        _, a, b, extreme = self.in_flight.popleft()
        gen = _to_signed(int(self.gen.value), self.width)
        ecp5 = _to_signed(int(self.ecp5.value), self.width)
        self.stats["checked"] += 1
        self.stats["extremes"] += extreme
        if not (gen == ecp5 == a * b):
            tally.mismatch(f"mul{self.k} ({self.stats['a_bits']}{'s' if self.stats['a_signed'] else 'u'} x "
                           f"{self.stats['b_bits']}{'s' if self.stats['b_signed'] else 'u'}) cycle {cycle}: "
                           f"{a} x {b} = {a * b}, plain {gen}, ecp5 {ecp5}",
                           product=self.k, cycle=cycle, a=a, b=b, gen=gen, ecp5=ecp5)


@cocotb.test()
async def product_twin(dut):
    cases, seed, _, cycles = _options()
    rng = random.Random(seed + 2)
    products = [ProductCase(dut, k, c, cases["product_latency"], random.Random(rng.getrandbits(64)))
                for k, c in enumerate(cases["product"])]
    tally = Tally()
    await _start(dut, [h for p in products for h in (p.a_port, p.b_port)])
    for cycle in range(cycles + cases["product_latency"] + 1):
        await FallingEdge(dut.clk)
        for p in products:
            p.check(cycle, tally)
            if cycle < cycles:
                p.drive(cycle)
    for p in products:
        assert not p.in_flight, (p.k, list(p.in_flight)[:3])
    tally.cases = [p.stats for p in products]
    tally.finish(dut, "product_twin")
