"""Bytes and words of one expert's data, and the NDP descriptor sequence of an expert task, all
derived from the contract (model/contract.py). Placement, traces and the performance model count
with these functions and the executor issues exactly the descriptors `ndp_steps` lists, so what
is modeled and what runs cannot drift apart.

Legend: D hidden, I expert intermediate, R stored rank, r rank used, n tokens of a task.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from ndpmoe.model.contract import (NdpConfig, Opcode, QuantFormat, act_row_len, fp16_factor_bytes, fp16_matrix_bytes,
                                   int8_factor_columns, int8_factor_format, output_struct)

MATRICES = ("w1", "w3", "w2")
VARIANTS = ("lo", "hi", "fp16")      # store format, higher-precision copy, plain fp16


def result_bytes(cfg: NdpConfig) -> int:
    """Bytes one NDP result (value, row, token) takes on the link: the output record, whole bytes."""
    return math.ceil(output_struct(cfg.t_max).width / 8)


@dataclass(frozen=True)
class NdpStep:
    """One descriptor an expert task issues, with the port words it reads and its link bytes."""
    opcode: Opcode
    operand: str                 # "x", "h", "w1".."w2", "B1".., "A1".., "B1x".. (what it reads)
    tokens: int
    rows: int                    # MATMUL rows (0 for LOAD_ACT)
    in_features: int             # as written into the descriptor
    bits: int
    group_size: int
    words: int                   # port words read from memory
    link_down: int               # bytes written over the link before it (activations)
    link_up: int                 # bytes of results coming back


@dataclass(frozen=True)
class ExpertSizes:
    """Sizes of one expert's data for a store format (fmt None: fp16 experts)."""
    hidden: int
    intermediate: int
    fmt: QuantFormat | None
    hi_fmt: QuantFormat | None = None
    stored_rank: int = 0
    ndp: NdpConfig | None = None

    def __post_init__(self):
        for name in ("hidden", "intermediate"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % 32:
                raise ValueError(f"{name} must be a positive multiple of 32, not {v!r}")
        if isinstance(self.stored_rank, bool) or not isinstance(self.stored_rank, int) or self.stored_rank < 0:
            raise ValueError(f"stored_rank must be a non-negative integer, not {self.stored_rank!r}")
        if self.ndp is not None:
            for fmt in (self.fmt, self.hi_fmt):
                if fmt is not None and fmt.word_bits != self.ndp.word_bits:
                    raise ValueError(f"format {fmt} has {fmt.word_bits}-bit words but the NDP port "
                                     f"is {self.ndp.word_bits} bits")

    def shape(self, matrix: str) -> tuple[int, int]:
        """(rows, in_features) of w1 / w3 ([I, D]) or w2 ([D, I])."""
        if matrix in ("w1", "w3"):
            return self.intermediate, self.hidden
        if matrix == "w2":
            return self.hidden, self.intermediate
        raise ValueError(f"matrix must be one of {MATRICES}, not {matrix!r}")

    def variant_fmt(self, variant: str) -> QuantFormat | None:
        if variant == "lo":
            return self.fmt
        if variant == "hi":
            if self.hi_fmt is None:
                raise ValueError("this store has no higher-precision copies (hi_fmt is None)")
            return self.hi_fmt
        if variant == "fp16":
            return None
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")

    def matrix_bytes(self, variant: str, matrix: str) -> int:
        fmt = self.variant_fmt(variant)
        rows, n_in = self.shape(matrix)
        return fp16_matrix_bytes(rows, n_in) if fmt is None else fmt.matrix_bytes(rows, n_in)

    @cached_property
    def _weight_bytes(self) -> dict[str, int]:
        out = {}
        for v in VARIANTS:
            if v == "hi" and self.hi_fmt is None:
                continue
            out[v] = sum(self.matrix_bytes(v, m) for m in MATRICES)
        return out

    def weight_bytes(self, variant: str = "lo") -> int:
        """Bytes of an expert's three matrices: its memory images, metadata included."""
        self.variant_fmt(variant)
        return self._weight_bytes[variant]

    @property
    def hi_extra_bytes(self) -> int:
        """What a higher-precision copy costs beyond the low-bit expert it replaces."""
        return self.weight_bytes("hi") - self.weight_bytes("lo")

    # -- compensation factors --------------------------------------------------------------------
    def matrix_factor_bytes_fp16(self, matrix: str, rank: int) -> int:
        """Bytes of one matrix's fp16 factors A [rows, r] and B [r, in] at rank `rank`."""
        self.check_rank(rank)
        return fp16_factor_bytes(*self.shape(matrix), rank)

    @cached_property
    def fp16_bytes_per_rank(self) -> int:
        """Bytes of one rank component of A and B (fp16), all three matrices."""
        return sum(fp16_factor_bytes(*self.shape(m), 1) for m in MATRICES)

    def factor_bytes_fp16(self, rank: int) -> int:
        self.check_rank(rank)
        return rank * self.fp16_bytes_per_rank

    def check_rank(self, rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= self.stored_rank:
            raise ValueError(f"rank must be an integer in [0, stored rank {self.stored_rank}], not {rank!r}")

    @property
    def padded_rank(self) -> int:
        """Columns of the int8 A factor (the stored rank, zero-padded to whole groups)."""
        return int8_factor_columns(self.stored_rank)

    def int8_factor_fmts(self, matrix: str) -> tuple[QuantFormat, QuantFormat]:
        """Formats of the int8 (A, B) factors as model.compensate.quantize_int8_symmetric makes them."""
        n_in = self.shape(matrix)[1]
        word_bits = self.ndp.word_bits if self.ndp is not None else (self.fmt.word_bits if self.fmt else 128)
        return int8_factor_format(self.stored_rank, word_bits), int8_factor_format(n_in, word_bits)

    @cached_property
    def int8_bytes_per_rank(self) -> int:
        """Bytes one more rank adds to the int8 factors the NDP reads: a row of each B (A is read
        whole, padded to the stored rank, whatever rank is used)."""
        return sum(self.int8_factor_bytes(m, 1)[1] for m in MATRICES)

    def int8_factor_bytes(self, matrix: str, rank: int | None = None) -> tuple[int, int]:
        """(A bytes, B bytes) of the int8 factors; B's first `rank` rows are a prefix of its image."""
        rank = self.stored_rank if rank is None else rank
        if self.stored_rank == 0:
            return 0, 0
        rows, n_in = self.shape(matrix)
        a, b = self.int8_factor_fmts(matrix)
        return a.matrix_bytes(rows, self.padded_rank), rank * b.row_bytes(n_in)

    # -- NDP descriptor sequence of one task -----------------------------------------------------
    def ndp_steps(self, variant: str, tokens: int, gemm: bool, comp_rank: int) -> list[NdpStep]:
        """Descriptors an expert task issues on the NDP: its low-bit GEMMs when `gemm`, its
        compensation at `comp_rank` when > 0, for `tokens` tokens in chunks of T_max.

        Per chunk: LOAD x; w1, w3; B1, B3 (same x); LOAD B1x, A1; LOAD B3x, A3;
                   LOAD h; w2; B2 (same h); LOAD B2h, A2.
        """
        cfg = self.ndp
        if cfg is None:
            raise ValueError("these sizes have no NDP configuration (ndp is None)")
        if comp_rank:
            self.check_rank(comp_rank)
            if variant != "lo":
                raise ValueError(f"compensation applies to the low-bit variant only, not {variant!r}")
        fmt = self.variant_fmt(variant)
        if gemm and (fmt is None or fmt.bits not in cfg.bits):
            raise ValueError(f"NDP configuration {cfg.name!r} cannot run {variant} weights ({fmt or 'fp16'})")
        res, wb = result_bytes(cfg), cfg.word_bytes
        steps: list[NdpStep] = []
        if not gemm and not comp_rank:
            return steps

        def load(name: str, t: int, n_in: int) -> None:
            row = act_row_len(n_in, cfg.word_bits)
            if row > cfg.max_in_features:
                raise ValueError(f"{name} has {n_in} inputs per token, more than NDP configuration "
                                 f"{cfg.name!r} buffers ({cfg.max_in_features})")
            steps.append(NdpStep(Opcode.LOAD_ACT, name, t, 0, row, 8, 32, t * row // wb, t * row, 0))

        def matmul(name: str, t: int, f: QuantFormat, rows: int, n_in: int) -> None:
            steps.append(NdpStep(Opcode.MATMUL, name, t, rows, n_in, f.bits, f.group_size,
                                 f.matrix_bytes(rows, n_in) // wb, 0, t * rows * res))

        def factor_a(m: str, idx: str, t: int) -> None:
            load(f"B{idx}x", t, self.padded_rank)
            matmul(f"A{idx}", t, self.int8_factor_fmts(m)[0], self.shape(m)[0], self.padded_rank)

        for start in range(0, tokens, cfg.t_max):
            t = min(cfg.t_max, tokens - start)
            load("x", t, self.hidden)
            if gemm:
                for m in ("w1", "w3"):
                    matmul(m, t, fmt, *self.shape(m))
            if comp_rank:
                for m, idx in (("w1", "1"), ("w3", "3")):
                    matmul(f"B{idx}", t, self.int8_factor_fmts(m)[1], comp_rank, self.hidden)
                for m, idx in (("w1", "1"), ("w3", "3")):
                    factor_a(m, idx, t)
            load("h", t, self.intermediate)
            if gemm:
                matmul("w2", t, fmt, *self.shape("w2"))
            if comp_rank:
                matmul("B2", t, self.int8_factor_fmts("w2")[1], comp_rank, self.intermediate)
                factor_a("w2", "2", t)
        return steps
