"""The NDP side of execution, at the descriptor level.

`NdpBackend` is all an NDP implementation must offer: byte writes into its memory, one descriptor
at a time, results back as (token, row, value) integers, counters. `GoldenNdpBackend` runs the
bit-exact functional model (model/ndp_golden.py); the co-simulation's RTL backend
(sim/rtl_backend.py) implements the same four members over Verilator. `NdpDriver` is the host's
side: it places the store's images in the unit's memory once, and turns "multiply these int8
activations by that matrix" into memory writes + LOAD_ACT + MATMUL descriptors (contract.Descriptor),
each checked against the step the executor names (sizes.ExpertSizes.ndp_steps).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from ndpmoe.model.contract import (COUNTERS, Descriptor, ErrorCode, NdpConfig, QuantFormat, State, act_row_len)
from ndpmoe.model.ndp_golden import NdpGoldenUnit, act_image

from .ndp_cost import RTL_TARGET, NdpCostModel


class NdpError(RuntimeError):
    """The unit refused a descriptor (its ErrorCode) or a backend failed."""


@dataclass(frozen=True)
class NdpResult:
    results: list[tuple[int, int, int]]     # (token, row, value) in the unit's output order
    cycles: float | None = None             # measured busy cycles of this descriptor, if known


class NdpBackend(Protocol):
    """What an NDP unit must implement for the host runtime (golden model, RTL, hardware)."""
    config: NdpConfig

    def write(self, addr: int, data: bytes) -> None:
        """Write bytes into the unit's memory (byte address, any length)."""

    def run(self, descriptor: int) -> NdpResult:
        """Issue one packed descriptor (Descriptor.encode()), wait for it, return its results.
        Raises NdpError naming the contract.ErrorCode if the unit refused it."""

    def counters(self) -> dict[str, int]:
        """contract.COUNTERS values (busy_cycles, mem_stall_cycles, ...)."""


class GoldenNdpBackend:
    """NdpBackend over the bit-exact functional model. It has no clock: busy_cycles are modeled
    from `cost` (RTL design targets until the co-simulation refits them)."""

    def __init__(self, config: NdpConfig, mem_bytes: int = 1 << 24, cost: NdpCostModel = RTL_TARGET):
        if mem_bytes > config.mem_bytes:
            raise ValueError(f"mem_bytes {mem_bytes} exceeds what configuration {config.name!r} addresses "
                             f"({config.mem_bytes})")
        self.config = config
        self.cost = cost
        self.unit = NdpGoldenUnit(config, mem=bytearray(mem_bytes))
        self._counters = dict.fromkeys(COUNTERS, 0)

    def write(self, addr: int, data: bytes) -> None:
        self.unit.write(addr, data)

    def run(self, descriptor: int) -> NdpResult:
        d = Descriptor.decode(descriptor)
        results = self.unit.execute(d)
        if self.unit.state == State.ERROR:
            raise NdpError(f"NDP refused descriptor {d.describe()}: {ErrorCode(self.unit.error).name}")
        self._counters["busy_cycles"] += int(round(self.cost.cycles(d, self.config)))
        self._counters["words_read"] += d.words(self.config)
        self._counters["results_written"] += len(results)
        return NdpResult(results, None)

    def counters(self) -> dict[str, int]:
        return dict(self._counters)


@dataclass(frozen=True)
class NdpMatrix:
    """A matrix image resident in the unit's memory."""
    addr: int
    fmt: QuantFormat
    rows: int
    in_features: int


@dataclass(frozen=True)
class IssuedDescriptor:
    """What the driver issued, for traces and tests (compare with sizes.ndp_steps)."""
    descriptor: Descriptor   # as issued, its address bound
    words: int               # port words it reads
    bytes_written: int       # activation bytes written before a LOAD_ACT
    results: int             # results that came back


@dataclass
class NdpDriver:
    """Host-side driver: a bump allocator for resident images, an activation scratch area at the
    top of memory, and int8 matrix products issued as descriptors."""
    backend: NdpBackend
    log: list[IssuedDescriptor] = field(default_factory=list)
    _next: int = 0
    _resident: dict = field(default_factory=dict)

    @property
    def config(self) -> NdpConfig:
        return self.backend.config

    def _scratch_bytes(self) -> int:
        cfg = self.config
        return cfg.t_max * cfg.max_in_features

    def _mem_bytes(self) -> int:
        size = getattr(self.backend, "mem_bytes", None)       # a backend that states its memory size
        if size is not None:
            return size
        unit = getattr(self.backend, "unit", None)
        return len(unit.mem) if unit is not None else self.config.mem_bytes

    def place(self, key, image: torch.Tensor, fmt: QuantFormat, rows: int, in_features: int) -> NdpMatrix:
        """Make a packed image resident (once; it is the memory's own content, not link traffic)."""
        if key in self._resident:
            return self._resident[key]
        wb = self.config.word_bytes
        if fmt.word_bits != self.config.word_bits:
            raise ValueError(f"image of {key!r} is packed for {fmt.word_bits}-bit words, the NDP port is "
                             f"{self.config.word_bits} bits")
        data = bytes(image.contiguous().numpy().tobytes())
        if len(data) != fmt.matrix_bytes(rows, in_features):
            raise ValueError(f"image of {key!r} has {len(data)} bytes, expected {fmt.matrix_bytes(rows, in_features)}")
        addr = -(-self._next // wb) * wb
        if addr + len(data) > self._mem_bytes() - self._scratch_bytes():
            raise ValueError(f"NDP memory of {self._mem_bytes()} bytes is full placing {key!r} "
                             f"({len(data)} bytes at {addr:#x})")
        self.backend.write(addr, data)
        self._next = addr + len(data)
        m = NdpMatrix(addr, fmt, rows, in_features)
        self._resident[key] = m
        return m

    def resident(self, key) -> NdpMatrix:
        try:
            return self._resident[key]
        except KeyError:
            raise ValueError(f"{key!r} is not resident in NDP memory") from None

    @staticmethod
    def _check_step(d: Descriptor, step: Descriptor | None, what: str) -> None:
        """Refuse `d` unless it is the step the caller names (address aside)."""
        if step is not None and step.at(0) != d.at(0):
            raise ValueError(f"{what} makes the descriptor {d.describe()}, but the step to issue is "
                             f"{step.describe()}")

    def load(self, x_q: torch.Tensor, step: Descriptor | None = None) -> None:
        """Write int8 activations [t <= T_max, in] and LOAD_ACT them into the buffer. `step`: the
        LOAD_ACT the caller expects these activations to make (refused when they do not)."""
        cfg = self.config
        t, n_in = x_q.shape
        if not 0 < t <= cfg.t_max:
            raise ValueError(f"a load holds 1..T_max = {cfg.t_max} tokens, not {t}")
        image = act_image(x_q, cfg.word_bits)
        addr = self._mem_bytes() - self._scratch_bytes()
        d = Descriptor.load_act(tokens=t, in_features=act_row_len(n_in, cfg.word_bits), addr=addr)
        self._check_step(d, step, f"activations [{t}, {n_in}]")
        self.backend.write(addr, bytes(image.numpy().tobytes()))
        self.backend.run(d.encode())
        self.log.append(IssuedDescriptor(d, d.words(cfg), image.numel(), 0))

    def matmul(self, m: NdpMatrix, tokens: int, rows: int | None = None,
               step: Descriptor | None = None) -> torch.Tensor:
        """MATMUL of the first `rows` rows (a prefix of the image) against the loaded tokens:
        acc int64 [tokens, rows]. `step`: the MATMUL the caller expects (refused when it differs)."""
        rows = m.rows if rows is None else rows
        if not 0 < rows <= m.rows:
            raise ValueError(f"rows must be in 1..{m.rows}, not {rows}")
        d = Descriptor.matmul(m.fmt, tokens=tokens, rows=rows, in_features=m.in_features, addr=m.addr)
        self._check_step(d, step, f"a MATMUL of {rows} rows of the image at {m.addr:#x}")
        res = self.backend.run(d.encode()).results
        acc = torch.zeros(tokens, rows, dtype=torch.int64)
        if res:
            r = torch.tensor(res, dtype=torch.int64)
            acc[r[:, 0], r[:, 1]] = r[:, 2]
        self.log.append(IssuedDescriptor(d, d.words(self.config), 0, len(res)))
        return acc
