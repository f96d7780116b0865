"""Directed steps for the coverage bins a random run missed (sim/ndp_coverage.py), each with its
golden outcome, checked by the same bench as the random ones.

- MATMUL bins (bit width x group x T): one LOAD_ACT of t_max tokens, then a small MATMUL per
  missed bin;
- error codes: a LOAD_ACT, then per missed code a descriptor with the one field broken that the
  unit refuses with it;
- stalls: loads and long MATMULs queued, once under heavy stalls on every handshake and once
  with none;
- back-to-back pairs: for each missed (first, second), the two descriptors handed over one behind
  the other (a LOAD_ACT first, so MATMULs have activations);
- reset states: a descriptor (and maybe one queued behind it) that the bench resets when it sees
  the unit in the wanted state (sim/tb.py, `reset_in_phase`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch

from ndpmoe.model.contract import (GROUP_CODES, SCALE_MAX, ZERO_MAX, ZERO_MIN, Descriptor, ErrorCode, NdpConfig,
                                   Opcode, act_row_len)
from ndpmoe.model.ndp_golden import NdpGoldenUnit
from ndpmoe.model.packing import pack_matrix

from .workload import Batch, Step

LOAD_IN = 512           # activations per token the directed loads bring (enough for every bin)


@dataclass
class ResetCase:
    """Run `setup` to its end, hand over `first` (and `queued` behind it), reset the unit once it
    is in `phase`; with `first` None, reset the idle unit after `setup`."""
    setup: Step
    first: Step | None
    queued: Step | None
    phase: str | None


class ClosureSteps:
    """Builds directed batches; deterministic for a given (cfg, seed)."""

    def __init__(self, cfg: NdpConfig, mem_bytes: int, seed: int):
        self.cfg = cfg
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.gold = NdpGoldenUnit(cfg, mem=bytearray(mem_bytes))
        self._top = 0

    # -- memory and steps ---------------------------------------------------------------------------
    def _new_image(self) -> None:
        self.gold.mem[:] = bytes(len(self.gold.mem))
        self._top = 0

    def _place(self, data: torch.Tensor) -> int:
        wb = self.cfg.word_bytes
        addr = -(-self._top // wb) * wb
        if addr + data.numel() > len(self.gold.mem):
            raise ValueError(f"the directed steps need more than the bench's {len(self.gold.mem)} bytes of memory")
        self.gold.write(addr, data)
        self._top = addr + data.numel()
        return addr

    def _run(self, d: Descriptor) -> Step:
        results = self.gold.execute(d)
        ok = self.gold.error == ErrorCode.NONE
        return Step(d, self.gold.error, results, d.words(self.cfg) if ok else 0)

    def _load(self) -> Step:
        cfg = self.cfg
        n_in = min(act_row_len(LOAD_IN, cfg.word_bits), cfg.max_in_features)
        x = torch.randint(-128, 128, (cfg.t_max, n_in), generator=self.gen, dtype=torch.int8)
        addr = self._place(x.view(torch.uint8).reshape(-1))
        return self._run(Descriptor.load_act(tokens=cfg.t_max, in_features=n_in, addr=addr))

    def _matmul(self, bits: int, group: int, tokens: int, rows: int = 2) -> Step:
        fmt = self.cfg.fmt(bits, group)
        n_in = group * self.rng.choice((1, 2))
        codes = torch.randint(0, fmt.qmax + 1, (rows, n_in), generator=self.gen, dtype=torch.uint8)
        scale = torch.randint(0, SCALE_MAX + 1, (rows, n_in // group), generator=self.gen)
        zero = torch.randint(ZERO_MIN, ZERO_MAX + 1, (rows, n_in // group), generator=self.gen)
        addr = self._place(pack_matrix(codes, scale, zero, fmt))
        step = self._run(Descriptor.matmul(fmt, tokens=tokens, rows=rows, in_features=n_in, addr=addr))
        assert step.error == ErrorCode.NONE, step.describe()
        return step

    def _of_kind(self, kind: str) -> Step:
        cfg = self.cfg
        if kind == "LOAD_ACT":
            return self._load()
        if kind == "MATMUL":
            return self._matmul(self.rng.choice(cfg.bits), self.rng.choice(sorted(GROUP_CODES)),
                                self.rng.randint(1, cfg.t_max))
        if kind == "NOP":
            return self._run(Descriptor(Opcode.NOP))
        step = self._run(Descriptor(3, tokens=1, in_features=cfg.word_bits))        # an opcode no build has
        assert step.error == ErrorCode.BAD_OPCODE
        return step

    # -- batches --------------------------------------------------------------------------------------
    def matmul_batch(self, missed: list[tuple]) -> Batch:
        """(bits, group, T, P) bins of the MATMUL cross."""
        self._new_image()
        steps = [self._load()] + [self._matmul(bits, group, tokens) for bits, group, tokens, _ in missed]
        return Batch(bytearray(self.gold.mem[:self._top]), steps)

    def error_batch(self, missed: list[str]) -> Batch:
        """A LOAD_ACT, then per missed error code (its name) a descriptor with one field broken
        that the golden check refuses with exactly that code."""
        cfg = self.cfg
        self._new_image()
        load = self._load()
        steps = [load]
        ok = Descriptor(Opcode.MATMUL, bits=cfg.bits[0], group=GROUP_CODES[32], tokens=1, rows=1, in_features=32)
        broken = {
            "BAD_OPCODE": Descriptor(3, tokens=1, in_features=cfg.word_bits),
            "BAD_BITS": replace(ok, bits=next(b for b in range(16) if b not in cfg.bits)),
            "BAD_GROUP": replace(ok, group=3),
            "BAD_IN_FEATURES": replace(ok, in_features=0),
            "BAD_TOKENS": replace(ok, tokens=0),
            "BAD_ROWS": replace(ok, rows=0),
            "ACT_MISMATCH": replace(ok, in_features=load.descriptor.in_features + 32),
            "MISALIGNED_ADDR": replace(ok, addr=1),
            "ADDR_RANGE": replace(ok, rows=64, addr=cfg.mem_bytes - cfg.word_bytes),
        }
        for name in missed:
            if name == ErrorCode.NONE.name:
                steps.append(self._of_kind("MATMUL"))
                continue
            step = self._run(broken[name])
            assert step.error == ErrorCode[name], (name, step.describe())
            steps.append(step)
        return Batch(bytearray(self.gold.mem[:self._top]), steps)

    def pairs_batch(self, missed: list[tuple[str, str]]) -> Batch:
        """Each missed (first, second) pair, one behind the other, after a LOAD_ACT."""
        self._new_image()
        steps = [self._load()]
        for first, second in missed:
            steps += [self._of_kind(first), self._of_kind(second)]
        return Batch(bytearray(self.gold.mem[:self._top]), steps)

    def stall_batch(self) -> Batch:
        """LOAD_ACT, a MATMUL of many rows, again: queued, under heavy stalls they stall every
        handshake; without stalls the MATMUL's words pile up behind the load (the unit holds
        the memory)."""
        self._new_image()
        steps = []
        for _ in range(2):
            steps += [self._load(), self._matmul(self.cfg.bits[0], 32, self.cfg.t_max, rows=16)]
        return Batch(bytearray(self.gold.mem[:self._top]), steps)

    def reset_cases(self, missed: list[tuple]) -> tuple[Batch, list[ResetCase]]:
        """A batch whose image holds the data of every case (it has no steps of its own), and a
        case per missed (op, phase, queued) bin ("idle": a reset with nothing in the unit)."""
        self._new_image()
        cases = []
        for op, phase, queued in missed:
            setup = self._load()
            first = behind = None
            if op != "idle":
                # a MATMUL of several rows: it reads for a while and drains for a while
                first = self._load() if op == "LOAD_ACT" else self._matmul(self.cfg.bits[0], 32, 1, rows=8)
                behind = self._of_kind("MATMUL") if queued else None
            cases.append(ResetCase(setup, first, behind, phase))
            self.gold.act = None                                   # the reset forgets the activations
        return Batch(bytearray(self.gold.mem[:self._top]), []), cases
