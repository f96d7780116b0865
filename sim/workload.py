"""Random NDP workloads and their expected outcomes, from the golden model.

A workload is a memory image plus a list of steps, built in order while a golden NdpGoldenUnit
runs alongside, so every step carries exactly what the unit must do: the descriptor, the error
code, the results (bit-exact, in output order) and the words it must read. Steps:

- LOAD_ACT of random int8 activations (-128..127: the full byte range, not only the contract's
  symmetric range, to exercise the extremes), T 1..t_max tokens;
- MATMUL of a random packed matrix: bits in the build's widths, G in {32, 64, 128}, random codes,
  scales 0..65535 and zeros -32768..32767, T 1..the loaded tokens;
- bad descriptors: a valid one with one or two fields broken (so the checks' order matters);
- NOP; and resets in the middle of a descriptor (the golden unit is reset with it).

Memory: activation rows and matrices are packed from address 0 up to `mem_bytes`; when it is
full the workload starts a new batch (a new image), which the bench loads before its steps.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import torch

from ndpmoe.model.contract import (ACC_BITS, GROUP_SIZES, SCALE_MAX, SUPPORTED_GROUPS, ZERO_MAX, ZERO_MIN,
                                   Descriptor, ErrorCode, NdpConfig, Opcode, QuantFormat, act_row_len)
from ndpmoe.model.ndp_golden import NdpGoldenUnit, check_descriptor
from ndpmoe.model.packing import pack_matrix


@dataclass
class Step:
    """One descriptor and what must come of it."""
    descriptor: Descriptor
    error: ErrorCode
    results: list[tuple[int, int, int]]      # (token, row, value), golden order
    words: int                               # memory words the unit must read
    reset_after: int | None = None           # cycles after the handshake to reset the unit

    @property
    def raw(self) -> int:
        return self.descriptor.encode()

    def describe(self) -> str:
        return (f"{self.descriptor.describe()} -> {self.error.name}"
                + (f", reset after {self.reset_after} cycles" if self.reset_after is not None else ""))


@dataclass
class Batch:
    image: bytearray                         # memory contents from address 0
    steps: list[Step] = field(default_factory=list)


@dataclass(frozen=True)
class Mix:
    """Workload shape. Probabilities of a step's kind, and size limits."""
    load: float = 0.08
    bad: float = 0.15
    nop: float = 0.02
    reset: float = 0.02
    max_rows: int = 12
    max_in: int = 512


class WorkloadGenerator:
    """Deterministic for a given (cfg, seed)."""

    def __init__(self, cfg: NdpConfig, mem_bytes: int, seed: int, mix: Mix = Mix()):
        if mem_bytes > cfg.mem_bytes:
            raise ValueError(f"mem_bytes {mem_bytes} exceeds the configuration's {cfg.mem_bytes}")
        self.cfg, self.mem_bytes, self.mix = cfg, mem_bytes, mix
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.gold = NdpGoldenUnit(cfg, mem=bytearray(mem_bytes))
        self._top = 0

    # -- memory ---------------------------------------------------------------------------------
    def _place(self, data: torch.Tensor) -> int | None:
        wb = self.cfg.word_bytes
        addr = -(-self._top // wb) * wb
        if addr + data.numel() > self.mem_bytes:
            return None
        self.gold.write(addr, data)
        self._top = addr + data.numel()
        return addr

    # -- steps ------------------------------------------------------------------------------------
    def batches(self, count: int):
        """Yield Batches until `count` steps are made."""
        made = 0
        while made < count:
            self.gold.mem[:] = bytes(len(self.gold.mem))
            self._top = 0
            batch = Batch(self.gold.mem)
            # A fresh image invalidates the old activations' source, not the loaded buffer: keep
            # going, but start each batch with a load so MATMULs have work.
            step = self._load()
            while step is not None and made < count:
                batch.steps.append(step)
                made += 1
                step = self._next_step()
            batch.image = bytearray(self.gold.mem[:self._top])
            yield batch

    def _next_step(self) -> Step | None:
        r, mix = self.rng.random(), self.mix
        if self.gold.act is None or r < mix.load:
            return self._load()
        r -= mix.load
        if r < mix.nop:
            return self._run(Descriptor(Opcode.NOP))
        r -= mix.nop
        if r < mix.bad:
            return self._bad()
        step = self._matmul()
        if step is not None and self.rng.random() < mix.reset / (1 - mix.load - mix.nop - mix.bad):
            step = self._with_reset(step)
        return step

    def _run(self, d: Descriptor) -> Step:
        results = self.gold.execute(d)
        ok = self.gold.error == ErrorCode.NONE
        return Step(d, self.gold.error, results, d.words(self.cfg) if ok else 0)

    def _load(self) -> Step | None:
        cfg = self.cfg
        tokens = self.rng.randint(1, cfg.t_max)
        n_in = act_row_len(self.rng.randint(1, min(self.mix.max_in, cfg.max_in_features)), cfg.word_bits)
        n_in = min(n_in, cfg.max_in_features)
        x = torch.randint(-128, 128, (tokens, n_in), generator=self.gen, dtype=torch.int8)
        addr = self._place(x.view(torch.uint8).reshape(-1))
        if addr is None:
            return None
        return self._run(Descriptor.load_act(tokens=tokens, in_features=n_in, addr=addr))

    def _matmul_descriptor(self, place: bool) -> Descriptor | None:
        cfg, rng = self.cfg, self.rng
        t_loaded, in_loaded = self.gold.loaded
        bits = rng.choice(cfg.bits)
        group = rng.choice(SUPPORTED_GROUPS)
        fmt = QuantFormat(bits, group, cfg.word_bits)
        choices = [n for n in range(group, min(in_loaded, self.mix.max_in) + 1, group)
                   if fmt.padded_in(n) <= in_loaded]
        if not choices:
            return None
        n_in = rng.choice(choices)
        rows = rng.randint(1, self.mix.max_rows)
        tokens = rng.randint(1, t_loaded)
        addr = 0
        if place:
            codes = torch.randint(0, fmt.qmax + 1, (rows, n_in), generator=self.gen, dtype=torch.uint8)
            scale = torch.randint(0, SCALE_MAX + 1, (rows, n_in // group), generator=self.gen)
            zero = torch.randint(ZERO_MIN, ZERO_MAX + 1, (rows, n_in // group), generator=self.gen)
            addr = self._place(pack_matrix(codes, scale, zero, fmt))
            if addr is None:
                return None
        return Descriptor.matmul(fmt, tokens=tokens, rows=rows, in_features=n_in, addr=addr)

    def _matmul(self) -> Step | None:
        d = self._matmul_descriptor(place=True)
        if d is None:
            return None if self._top else self._load()
        step = self._run(d)
        assert step.error == ErrorCode.NONE, step.describe()
        assert all(abs(v) < 1 << (ACC_BITS - 1) for _, _, v in step.results)
        return step

    def _with_reset(self, step: Step) -> Step:
        """The unit is reset a random number of cycles into the step: no results count, and the
        golden unit forgets its activations as the hardware does."""
        step.reset_after = self.rng.randint(1, max(2, step.words))
        step.results = []
        self.gold.act = None
        return step

    def _bad(self) -> Step:
        """A valid descriptor with one or two fields broken; the golden checker names the error."""
        cfg, rng = self.cfg, self.rng
        for _ in range(100):
            if rng.random() < 0.3:
                d = Descriptor.load_act(tokens=rng.randint(1, cfg.t_max), in_features=cfg.word_bits)
            else:
                d = self._matmul_descriptor(place=False)
                if d is None:
                    continue
            for _ in range(rng.choice((1, 1, 2))):
                d = self._break(d)
            if check_descriptor(cfg, d, self.gold.loaded) != ErrorCode.NONE:
                return self._run(d)
        raise RuntimeError("could not make a bad descriptor")

    def _break(self, d: Descriptor) -> Descriptor:
        cfg, rng = self.cfg, self.rng
        word = cfg.word_bytes
        kind = rng.choice(("opcode", "bits", "group", "in", "tokens", "rows", "align", "range", "act"))
        if kind == "opcode":
            return replace(d, opcode=3)
        if kind == "bits":
            return replace(d, bits=rng.choice([b for b in range(16) if b not in cfg.bits]))
        if kind == "group":
            return replace(d, group=3)
        if kind == "in":
            return replace(d, in_features=rng.choice([0, d.in_features + 16, cfg.max_in_features + cfg.word_bits,
                                                      (1 << 16) - 1]))
        if kind == "tokens":
            return replace(d, tokens=rng.choice([0, cfg.t_max + 1, 255]))
        if kind == "rows":
            return replace(d, rows=0)
        if kind == "align":
            return replace(d, addr=d.addr + rng.randint(1, word - 1))
        if kind == "range":
            return replace(d, addr=(cfg.mem_bytes - rng.randint(1, 64) * word) % (1 << 32), rows=max(d.rows, 64))
        t_loaded, in_loaded = self.gold.loaded
        if t_loaded < cfg.t_max and rng.random() < 0.5:
            return replace(d, tokens=rng.randint(t_loaded + 1, cfg.t_max))
        g = GROUP_SIZES.get(d.group, max(SUPPORTED_GROUPS))
        return replace(d, in_features=(in_loaded // g + 1) * g)
