"""Bytes and words of one expert's data, and the NDP descriptor sequence of an expert task, all
derived from the contract (model/contract.py). Placement, traces and the performance model count
with these functions and the executor (host/execute.py) issues the very descriptors `ndp_steps`
yields, so what is modeled and what runs cannot drift apart.

Legend: D hidden, I expert intermediate, R stored rank, r rank used, n tokens of a task.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from ndpmoe.model.contract import (Descriptor, NdpConfig, QuantFormat, act_row_len, fp16_factor_bytes,
                                   fp16_matrix_bytes, int8_factor_columns, int8_factor_format, largest_group,
                                   output_struct)

MATRICES = ("w1", "w3", "w2")
VARIANTS = ("lo", "hi", "fp16")      # store format, higher-precision copy, plain fp16


def result_bytes(cfg: NdpConfig) -> int:
    """Bytes one NDP result (value, row, token) takes on the link: the output record, whole bytes."""
    return math.ceil(output_struct(cfg.t_max).width / 8)


STEP_KINDS = ("x", "h", "Bx", "w", "B", "A")   # LOAD_ACT of x, h, B x; MATMUL of weights, B, A


def operand_name(kind: str, matrix: str | None) -> str:
    if kind in ("x", "h"):
        return kind
    if kind == "w":
        return matrix
    idx = matrix[1]
    return f"B{idx}{'h' if matrix == 'w2' else 'x'}" if kind == "Bx" else f"{kind}{idx}"


@dataclass(frozen=True)
class NdpStep:
    """One descriptor an expert task issues, what it serves, the port words it reads and its link
    bytes. The descriptor's address is 0: the driver binds it to where the operand lies."""
    descriptor: Descriptor
    kind: str                    # STEP_KINDS
    matrix: str | None           # the expert matrix it serves (w1, w3, w2); None for the x, h loads
    start: int                   # first token of its chunk, within the task
    words: int                   # port words read from memory
    link_down: int               # bytes written over the link before it (activations)
    link_up: int                 # bytes of results coming back

    @property
    def operand(self) -> str:
        """What it reads: x, h, w1, B1, B1x (the activations B1 x; B2h for w2), A1, ..."""
        return operand_name(self.kind, self.matrix)


@dataclass(frozen=True)
class ExpertSizes:
    """Sizes of one expert's data for a store format (fmt None: fp16 experts)."""
    hidden: int
    intermediate: int
    fmt: QuantFormat | None
    hi_fmt: QuantFormat | None = None
    stored_rank: int = 0
    ndp: NdpConfig | None = None
    factor_precision: str = "fp16"   # the compensators the runtime uses: fp16 (GPU) + int8 (NDP), or
                                     # packed low-bit rows (int8, int4, int3) both units read

    def __post_init__(self):
        from ndpmoe.model.factor_quant import factor_bits
        factor_bits(self.factor_precision)
        if self.factor_precision != "fp16" and self.fmt is None:
            raise ValueError(f"factor precision {self.factor_precision!r} needs a packed store format (fmt)")
        self._check_fields()

    def _check_fields(self):
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

    def matrix_factor_bytes(self, matrix: str, rank: int, precision: str = "fp16") -> int:
        """Bytes of one matrix's rank-`rank` compensator stored at `precision` (fp16, or packed
        low-bit rows B [r, in] and A^T [r, out] at the experts' group and word, model/factor_quant.py)."""
        self.check_rank(rank)
        return rank * self._packed_rank_bytes(matrix, precision)

    def factor_bytes_per_rank(self, precision: str = "fp16") -> int:
        """Bytes of one rank component at `precision`, all three matrices."""
        return sum(self._packed_rank_bytes(m, precision) for m in MATRICES)

    def _packed_rank_bytes(self, matrix: str, precision: str) -> int:
        from ndpmoe.model.factor_quant import bytes_per_rank, factor_bits
        group, word = (64, 64) if self.fmt is None else (self.fmt.group_size, self.fmt.word_bits)
        return bytes_per_rank(*self.shape(matrix), factor_bits(precision), group, word)

    @cached_property
    def gpu_rank_bytes(self) -> int:
        """Bytes the GPU fetches per rank component, all three matrices, at the runtime's factor
        precision: fp16 A and B, or one packed row each of B and A^T."""
        if self.factor_precision == "fp16":
            return self.fp16_bytes_per_rank
        return self.factor_bytes_per_rank(self.factor_precision)

    def gpu_factor_bytes(self, rank: int) -> int:
        """Bytes of the rank-`rank` factors the GPU holds, all three matrices."""
        self.check_rank(rank)
        return rank * self.gpu_rank_bytes

    @property
    def factor_bits(self) -> int | None:
        from ndpmoe.model.factor_quant import factor_bits
        return factor_bits(self.factor_precision)

    def packed_factor_fmts(self, matrix: str) -> tuple[QuantFormat, QuantFormat]:
        """Formats of the low-bit (B, A^T) images of a matrix: one row per rank component."""
        from ndpmoe.model.factor_quant import factor_format
        bits = self.factor_bits
        if bits is None:
            raise ValueError("fp16 compensators have no packed images (factor_precision is 'fp16')")
        rows, n_in = self.shape(matrix)
        g, p = self.fmt.group_size, self.fmt.word_bits
        return factor_format(bits, n_in, g, p), factor_format(bits, rows, g, p)

    def ndp_factor_fmts(self, matrix: str) -> tuple[QuantFormat, QuantFormat]:
        """Formats of the (A, B) images the NDP multiplies: the int8 factors for fp16 stores, else
        A [rows, padded_rank] (model/factor_quant.ndp_a_image) and the packed B rows."""
        if self.factor_bits is None:
            return self.int8_factor_fmts(matrix)
        b_fmt = self.packed_factor_fmts(matrix)[0]
        return QuantFormat(self.factor_bits, largest_group(self.padded_rank), b_fmt.word_bits), b_fmt

    def ndp_factor_bytes(self, matrix: str, rank: int | None = None) -> tuple[int, int]:
        """(A bytes, B bytes) of the factor images the NDP holds; B's first `rank` rows are a
        prefix of its image, A is read whole."""
        if self.factor_bits is None:
            return self.int8_factor_bytes(matrix, rank)
        rank = self.stored_rank if rank is None else rank
        if self.stored_rank == 0:
            return 0, 0
        rows, n_in = self.shape(matrix)
        a, b = self.ndp_factor_fmts(matrix)
        return a.matrix_bytes(rows, self.padded_rank), rank * b.row_bytes(n_in)

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
    @cached_property
    def _steps_memo(self) -> dict[tuple, tuple[NdpStep, ...]]:
        return {}

    def ndp_steps(self, variant: str, tokens: int, gemm: bool, comp_rank: int) -> tuple[NdpStep, ...]:
        """Descriptors an expert task issues on the NDP: its low-bit GEMMs when `gemm`, its
        compensation at `comp_rank` when > 0, for `tokens` tokens in chunks of T_max.

        Per chunk: LOAD x; w1, w3; B1, B3 (same x); LOAD B1x, A1; LOAD B3x, A3;
                   LOAD h; w2; B2 (same h); LOAD B2h, A2.
        Memoized: the planner prices the same tasks over and over.
        """
        key = (variant, tokens, bool(gemm), comp_rank)
        steps = self._steps_memo.get(key)
        if steps is None:
            steps = self._steps_memo[key] = tuple(self._ndp_steps(variant, tokens, bool(gemm), comp_rank))
        return steps

    def _ndp_steps(self, variant: str, tokens: int, gemm: bool, comp_rank: int) -> list[NdpStep]:
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
        if not gemm and not comp_rank:
            return []
        res = result_bytes(cfg)
        factors = {m: self.ndp_factor_fmts(m) for m in MATRICES} if comp_rank else {}

        def chunk(t: int) -> list[tuple[Descriptor, str, str | None]]:
            """One chunk's (descriptor, kind, matrix), in issue order."""
            out = []

            def load(kind: str, matrix: str | None, n_in: int) -> None:
                row = act_row_len(n_in, cfg.word_bits)
                if row > cfg.max_in_features:
                    raise ValueError(f"{operand_name(kind, matrix)} has {n_in} inputs per token, more than NDP "
                                     f"configuration {cfg.name!r} buffers ({cfg.max_in_features})")
                out.append((Descriptor.load_act(tokens=t, in_features=row), kind, matrix))

            def matmul(kind: str, m: str, f: QuantFormat, rows: int, n_in: int) -> None:
                out.append((Descriptor.matmul(f, tokens=t, rows=rows, in_features=n_in), kind, m))

            load("x", None, self.hidden)
            if gemm:
                for m in ("w1", "w3"):
                    matmul("w", m, fmt, *self.shape(m))
            if comp_rank:
                for m in ("w1", "w3"):
                    matmul("B", m, factors[m][1], comp_rank, self.hidden)
                for m in ("w1", "w3"):
                    load("Bx", m, self.padded_rank)
                    matmul("A", m, factors[m][0], self.shape(m)[0], self.padded_rank)
            load("h", None, self.intermediate)
            if gemm:
                matmul("w", "w2", fmt, *self.shape("w2"))
            if comp_rank:
                matmul("B", "w2", factors["w2"][1], comp_rank, self.intermediate)
                load("Bx", "w2", self.padded_rank)
                matmul("A", "w2", factors["w2"][0], self.shape("w2")[0], self.padded_rank)
            return out

        steps: list[NdpStep] = []
        made: dict[int, list] = {}          # chunks of equal size issue equal descriptors
        for start in range(0, tokens, cfg.t_max):
            t = min(cfg.t_max, tokens - start)
            if t not in made:
                made[t] = [(d, kind, m, d.words(cfg), d.read_bytes(cfg) if kind in ("x", "h", "Bx") else 0,
                            d.results * res) for d, kind, m in chunk(t)]
            steps.extend(NdpStep(d, kind, m, start, words, down, up) for d, kind, m, words, down, up in made[t])
        return steps

        def add(d: Descriptor, kind: str, matrix: str | None, start: int) -> None:
            load = kind in ("x", "h", "Bx")
            steps.append(NdpStep(d, kind, matrix, start, d.words(cfg), d.read_bytes(cfg) if load else 0,
                                 d.results * res))

        def load(kind: str, matrix: str | None, start: int, t: int, n_in: int) -> None:
            row = act_row_len(n_in, cfg.word_bits)
            if row > cfg.max_in_features:
                raise ValueError(f"{operand_name(kind, matrix)} has {n_in} inputs per token, more than NDP configuration "
                                 f"{cfg.name!r} buffers ({cfg.max_in_features})")
            add(Descriptor.load_act(tokens=t, in_features=row), kind, matrix, start)

        def matmul(kind: str, m: str, start: int, t: int, f: QuantFormat, rows: int, n_in: int) -> None:
            add(Descriptor.matmul(f, tokens=t, rows=rows, in_features=n_in), kind, m, start)

        for start in range(0, tokens, cfg.t_max):
            t = min(cfg.t_max, tokens - start)
            load("x", None, start, t, self.hidden)
            if gemm:
                for m in ("w1", "w3"):
                    matmul("w", m, start, t, fmt, *self.shape(m))
            if comp_rank:
                for m in ("w1", "w3"):
                    matmul("B", m, start, t, self.int8_factor_fmts(m)[1], comp_rank, self.hidden)
                for m in ("w1", "w3"):
                    load("Bx", m, start, t, self.padded_rank)
                    matmul("A", m, start, t, self.int8_factor_fmts(m)[0], self.shape(m)[0], self.padded_rank)
            load("h", None, start, t, self.intermediate)
            if gemm:
                matmul("w", "w2", start, t, fmt, *self.shape("w2"))
            if comp_rank:
                matmul("B", "w2", start, t, self.int8_factor_fmts("w2")[1], comp_rank, self.intermediate)
                load("Bx", "w2", start, t, self.padded_rank)
                matmul("A", "w2", start, t, self.int8_factor_fmts("w2")[0], self.shape("w2")[0], self.padded_rank)
        return steps
