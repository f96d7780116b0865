"""The hardware/software contract of ndpmoe, defined once.

Every format, width, register and derived size lives here. The RTL generator (`rtl/`), the golden
models (`model/`), the host runtime (`host/`) and the test benches (`sim/`) import this module;
nothing re-types a width or an offset.

Vocabulary: P = memory word width in bits (the NDP port), b = bits per weight code, G = group size
along the input dimension, C = codes per block, E = metadata entries per word (groups described by
one metadata word), T = tokens.

Packed weight matrix (the "memory image", identical for the GPU path and the NDP unit)
======================================================================================

A matrix W [rows, in] is stored row after row; every row starts on a word boundary and is one
contiguous burst, so the NDP streams a whole matrix as one linear read. A row is padded from `in`
to `padded_in = roundup(in, C)` inputs; the padding is whole *phantom groups* whose metadata is
scale 0, zero 0, so they add exactly nothing whatever the codes and activations are.

A row is a sequence of *superblocks*: one metadata word describing the next E = P / 32 groups,
then the weight words of those groups (the last superblock may describe fewer groups)::

    row:  | meta | w w w ... w | meta | w w ... w | ... |
            E groups' (scale, zero)   their codes

Metadata word: E entries of 32 bits, entry j at bits [32j, 32j + 32)::

     31              16 15               0
    +------------------+------------------+
    |  zero (int16,    |  scale (uint16)  |
    |  Q11.4 fixed pt) |  mantissa        |
    +------------------+------------------+

Weight words, b in {2, 4, 8}: code i of a word at bits [b*i, b*i + b), C = P / b codes per word::

     P-1                                         2b   b    0
    +-------------+-----+-------------+-------------+--------+
    | code C-1    | ... | code 2      | code 1      | code 0 |
    +-------------+-----+-------------+-------------+--------+

Weight words, b = 3: a block of three words holds C = P codes; the 1-bit plane comes FIRST so
the unpacker latches it and then combines it with each 2-bit word as that word streams by (no
bubble on the memory side, every container a power of two)::

    word 0: hi plane  | bit i = bit 2 of code i               (i = 0 .. P-1)
    word 1: lo plane  | bits [2i, 2i+2) = bits 1:0 of code i  (i = 0 .. P/2-1)
    word 2: lo plane  | bits [2i, 2i+2) = bits 1:0 of code P/2 + i

Words are little-endian in byte memory: byte k of a word holds its bits [8k, 8k + 8).

Dequantization: w = (code - zero / 2^ZERO_FRAC_BITS) * scale * 2^-scale_exp, with one integer
`scale_exp` per matrix (host-side metadata, the hardware never needs it).

Activations
===========
Per-token symmetric int8: x ~= x_q * x_scale[t], x_q in [-127, 127]. In memory, token t's row is
`act_row_len(in)` = roundup(in, P) bytes (zeros past `in`), rows back to back; that length covers
the padded input of every bit width.

NDP arithmetic (bit-exact, see model/ndp_golden.py)
====================================================
    acc[t, r] = sum_g scale[r, g] * (2^ZERO_FRAC_BITS * sum_{i in g} code[r, i] * x[t, i]
                                      - zero[r, g] * sum_{i in g} x[t, i])
    y[t, r]   = acc[t, r] * 2^-(scale_exp + ZERO_FRAC_BITS) * x_scale[t]
`acc` is a signed ACC_BITS integer; `ACC_BITS` is derived below so no overflow is possible for any
operand values up to MAX_IN_FEATURES inputs.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from functools import cached_property

# ---------------------------------------------------------------------------------------------
# Supported operand formats
# ---------------------------------------------------------------------------------------------
SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUPS = (32, 64, 128)
SUPPORTED_WORD_BITS = (64, 128, 256)

META_ENTRY_BITS = 32            # one group's (scale, zero)
SCALE_BITS = 16                 # unsigned mantissa of the group scale
ZERO_BITS = 16                  # signed fixed-point zero point
ZERO_FRAC_BITS = 4              # zero is Q11.4: 1/16-code resolution
SCALE_MAX = (1 << SCALE_BITS) - 1
ZERO_MIN = -(1 << (ZERO_BITS - 1))
ZERO_MAX = (1 << (ZERO_BITS - 1)) - 1

ACT_BITS = 8
ACT_MAX = (1 << (ACT_BITS - 1)) - 1  # symmetric: [-127, 127], -128 unused
INT8_FACTOR_ZERO = 128               # int8 factors stored as unsigned 8-bit codes with zero 128

MAX_IN_FEATURES = 16384
MAX_ROWS = (1 << 16) - 1


def _bits_for_signed(bound: int) -> int:
    """Bits of a two's-complement integer holding every value in [-bound, bound]."""
    return bound.bit_length() + 1


# Worst case of one input's contribution: |scale * (2^F * code - zero) * x|.
_TERM_BOUND = SCALE_MAX * ((1 << ZERO_FRAC_BITS) * 255 + (1 << (ZERO_BITS - 1))) * (ACT_MAX + 1)
ACC_BITS = _bits_for_signed(_TERM_BOUND * MAX_IN_FEATURES)
# Group partial sums the lanes produce (per token, per group, G <= 128, code <= 255, |x| <= 128).
GROUP_QX_BITS = _bits_for_signed(max(SUPPORTED_GROUPS) * 255 * (ACT_MAX + 1))
GROUP_X_BITS = _bits_for_signed(max(SUPPORTED_GROUPS) * (ACT_MAX + 1))


def _check_choice(name: str, value, choices) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer in {choices}, not {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, not {value!r}")


def _roundup(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class QuantFormat:
    """A packed low-bit weight format: bits per code, group size and memory word width."""
    bits: int
    group_size: int
    word_bits: int = 128

    def __post_init__(self):
        _check_choice("bits", self.bits, SUPPORTED_BITS)
        _check_choice("group_size", self.group_size, SUPPORTED_GROUPS)
        _check_choice("word_bits", self.word_bits, SUPPORTED_WORD_BITS)

    # -- fixed sizes -------------------------------------------------------------------------
    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def word_bytes(self) -> int:
        return self.word_bits // 8

    @property
    def block_words(self) -> int:
        """Words of one packing block (3 for the split 3-bit planes, else 1)."""
        return 3 if self.bits == 3 else 1

    @property
    def codes_per_block(self) -> int:
        """C: codes held by one block."""
        return self.word_bits if self.bits == 3 else self.word_bits // self.bits

    @property
    def meta_per_word(self) -> int:
        """E: groups described by one metadata word."""
        return self.word_bits // META_ENTRY_BITS

    # -- derived per-row sizes ---------------------------------------------------------------
    def check_in_features(self, in_features: int) -> None:
        if isinstance(in_features, bool) or not isinstance(in_features, int):
            raise TypeError(f"in_features must be an integer, not {in_features!r}")
        if in_features <= 0 or in_features % self.group_size:
            raise ValueError(f"in_features must be a positive multiple of the group size "
                             f"{self.group_size}, not {in_features}")
        if in_features > MAX_IN_FEATURES:
            raise ValueError(f"in_features must be at most {MAX_IN_FEATURES}, not {in_features}")

    def padded_in(self, in_features: int) -> int:
        self.check_in_features(in_features)
        return _roundup(in_features, self.codes_per_block)

    def groups(self, in_features: int) -> int:
        self.check_in_features(in_features)
        return in_features // self.group_size

    def padded_groups(self, in_features: int) -> int:
        return self.padded_in(in_features) // self.group_size

    def superblocks(self, in_features: int) -> int:
        return -(-self.padded_groups(in_features) // self.meta_per_word)

    def weight_words(self, n_codes: int) -> int:
        """Words holding n_codes codes (n_codes a multiple of C)."""
        assert n_codes % self.codes_per_block == 0, (n_codes, self.codes_per_block)
        return n_codes // self.codes_per_block * self.block_words

    def superblock_groups(self, in_features: int) -> list[int]:
        """Groups described by each superblock of a row (all E but maybe the last)."""
        total, e = self.padded_groups(in_features), self.meta_per_word
        return [min(e, total - s * e) for s in range(self.superblocks(in_features))]

    def row_words(self, in_features: int) -> int:
        codes = self.padded_in(in_features)
        return self.superblocks(in_features) + self.weight_words(codes)

    def row_bytes(self, in_features: int) -> int:
        return self.row_words(in_features) * self.word_bytes

    def matrix_bytes(self, rows: int, in_features: int) -> int:
        """Bytes of the whole packed matrix, weights and metadata, as it sits in memory."""
        if isinstance(rows, bool) or not isinstance(rows, int) or rows <= 0:
            raise ValueError(f"rows must be a positive integer, not {rows!r}")
        return rows * self.row_bytes(in_features)

    def bits_per_weight(self, rows: int, in_features: int) -> float:
        return 8 * self.matrix_bytes(rows, in_features) / (rows * in_features)

    def __str__(self) -> str:
        return f"int{self.bits}-g{self.group_size}-p{self.word_bits}"


def act_row_len(in_features: int, word_bits: int) -> int:
    """Bytes of one token's int8 activations in memory: covers padded_in of every bit width."""
    _check_choice("word_bits", word_bits, SUPPORTED_WORD_BITS)
    return _roundup(in_features, word_bits)


FP16_BYTES = 2                  # bytes of one fp16 value (experts and factors stored unquantized)


def fp16_matrix_bytes(rows: int, in_features: int) -> int:
    return FP16_BYTES * rows * in_features


def largest_group(in_features: int) -> int:
    """The largest supported group size that divides `in_features` (int8 factors use it)."""
    for g in sorted(SUPPORTED_GROUPS, reverse=True):
        if in_features % g == 0:
            return g
    raise ValueError(f"in_features {in_features} is not a multiple of {min(SUPPORTED_GROUPS)}")


# Compensation factors of a matrix W [rows, in]: A [rows, r] and B [r, in], each just another matrix.
FACTOR_COLUMN_ALIGN = min(SUPPORTED_GROUPS)   # int8 factors are zero-padded to whole groups


def fp16_factor_bytes(rows: int, in_features: int, rank: int) -> int:
    """Bytes of rank `rank` of W's factors stored fp16 (A [rows, r] and B [r, in])."""
    return fp16_matrix_bytes(rows, rank) + fp16_matrix_bytes(rank, in_features)


def int8_factor_columns(in_features: int) -> int:
    """Columns of an int8 factor matrix in memory: its inputs zero-padded to whole groups."""
    return _roundup(in_features, FACTOR_COLUMN_ALIGN)


def int8_factor_format(in_features: int, word_bits: int) -> QuantFormat:
    """Format of an int8 factor matrix with `in_features` inputs: symmetric codes around
    INT8_FACTOR_ZERO, the largest supported group dividing its padded width."""
    return QuantFormat(8, largest_group(int8_factor_columns(in_features)), word_bits)


# ---------------------------------------------------------------------------------------------
# Bit-field structures shared by the host and the gateware
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BitStruct:
    """An ordered set of unsigned bit fields, LSB first (the order of an Amaranth StructLayout).

    `rtl/` turns it into `data.StructLayout(dict(fields))`; the host packs and unpacks the same
    fields here, so both sides read one definition.
    """
    name: str
    fields: tuple[tuple[str, int], ...]

    @property
    def width(self) -> int:
        return sum(w for _, w in self.fields)

    def offset(self, field_name: str) -> int:
        pos = 0
        for name, width in self.fields:
            if name == field_name:
                return pos
            pos += width
        raise KeyError(f"{self.name} has no field {field_name!r}")

    def pack(self, **values: int) -> int:
        unknown = set(values) - {n for n, _ in self.fields}
        if unknown:
            raise ValueError(f"{self.name} has no field(s) {sorted(unknown)}")
        raw, pos = 0, 0
        for name, width in self.fields:
            v = int(values.get(name, 0))
            if not 0 <= v < (1 << width):
                raise ValueError(f"{self.name}.{name} must fit in {width} unsigned bits, not {v}")
            raw |= v << pos
            pos += width
        return raw

    def unpack(self, raw: int) -> dict[str, int]:
        out, pos = {}, 0
        for name, width in self.fields:
            out[name] = (raw >> pos) & ((1 << width) - 1)
            pos += width
        return out


class Opcode(enum.IntEnum):
    """NDP operations (descriptor field `opcode`)."""
    NOP = 0
    LOAD_ACT = 1   # read `tokens` x act_row_len(in_features) int8 activations at `addr` into the buffer
    MATMUL = 2     # stream the packed matrix at `addr` against the loaded activations


class ErrorCode(enum.IntEnum):
    """Why a descriptor was refused (status field `error`). Refused descriptors read no memory."""
    NONE = 0
    BAD_OPCODE = 1
    BAD_BITS = 2          # bit width not in this build
    BAD_GROUP = 3         # group size code not one of SUPPORTED_GROUPS
    BAD_IN_FEATURES = 4   # zero, not a multiple of the group, or above the buffer's capacity
    BAD_TOKENS = 5        # zero or above T_max
    BAD_ROWS = 6          # zero rows
    MISALIGNED_ADDR = 7   # address not on a word boundary
    ADDR_RANGE = 8        # the read would run past the end of memory
    ACT_MISMATCH = 9      # MATMUL needs more tokens or inputs than LOAD_ACT put in the buffer


class State(enum.IntEnum):
    IDLE = 0
    BUSY = 1
    DONE = 2
    ERROR = 3


GROUP_CODES = {32: 0, 64: 1, 128: 2}   # descriptor field `group` encodes log2(G) - 5

DESCRIPTOR = BitStruct("descriptor", (
    ("opcode", 2),
    ("bits", 4),          # 2, 3, 4 or 8, as a number
    ("group", 2),         # GROUP_CODES
    ("tokens", 8),
    ("rows", 16),
    ("in_features", 16),
    ("addr", 32),         # byte address, word aligned
))

STATUS = BitStruct("status", (
    ("state", 2),         # State
    ("error", 4),         # ErrorCode
))

# Performance counters, each COUNTER_BITS wide, readable by the host.
COUNTERS = ("busy_cycles", "mem_stall_cycles", "out_stall_cycles", "words_read", "results_written")
COUNTER_BITS = 48


def make_descriptor(opcode: Opcode, *, addr: int, in_features: int, tokens: int, rows: int = 0,
                    bits: int = 8, group_size: int = 32) -> int:
    """Pack a descriptor. Values are only range-checked to fit their fields: the unit itself
    validates the rest, so tests can build bad descriptors on purpose."""
    group = GROUP_CODES.get(group_size, 3)
    return DESCRIPTOR.pack(opcode=int(opcode), bits=bits, group=group, tokens=tokens, rows=rows,
                           in_features=in_features, addr=addr)


def output_struct(t_max: int) -> BitStruct:
    """One result on the output stream: (token, row, value)."""
    return BitStruct("result", (
        ("value", ACC_BITS),
        ("row", 16),
        ("token", max(1, (t_max - 1).bit_length())),
    ))


# ---------------------------------------------------------------------------------------------
# NDP unit configurations: one object drives the generator, the benches and the runtime
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NdpConfig:
    """Design parameters of one NDP unit build."""
    name: str
    word_bits: int = 128                      # P: memory port width
    t_max: int = 8                            # activation buffer capacity in tokens
    max_in_features: int = 4096               # activation buffer capacity in inputs per token
    bits: tuple[int, ...] = SUPPORTED_BITS    # bit widths this build decodes
    addr_bits: int = 32                       # byte address width of the memory
    mem_bytes: int = 1 << 32                  # memory size the unit may address
    clock_mhz: float = 150.0                  # clock the performance model assumes
    tokens_parallel: int = 1                  # tokens the datapath multiplies per memory word

    def __post_init__(self):
        _check_choice("word_bits", self.word_bits, SUPPORTED_WORD_BITS)
        if not isinstance(self.t_max, int) or not 1 <= self.t_max <= 255:
            raise ValueError(f"t_max must be an integer in [1, 255], not {self.t_max!r}")
        if (not isinstance(self.max_in_features, int) or self.max_in_features % self.word_bits
                or not 0 < self.max_in_features <= MAX_IN_FEATURES):
            raise ValueError(f"max_in_features must be a positive multiple of word_bits "
                             f"{self.word_bits} up to {MAX_IN_FEATURES}, not {self.max_in_features!r}")
        if not self.bits or any(b not in SUPPORTED_BITS for b in self.bits):
            raise ValueError(f"bits must be a non-empty subset of {SUPPORTED_BITS}, not {self.bits!r}")
        if self.mem_bytes > (1 << self.addr_bits):
            raise ValueError(f"mem_bytes {self.mem_bytes} does not fit {self.addr_bits} address bits")
        if (isinstance(self.tokens_parallel, bool) or not isinstance(self.tokens_parallel, int)
                or not 1 <= self.tokens_parallel <= self.t_max):
            raise ValueError(f"tokens_parallel must be an integer in [1, t_max={self.t_max}], "
                             f"not {self.tokens_parallel!r}")

    @property
    def word_bytes(self) -> int:
        return self.word_bits // 8

    @property
    def lanes(self) -> int:
        """Multiply lanes: codes of the densest format in one word (3-bit: one lo-plane word)."""
        return max(self.word_bits // (2 if b == 3 else b) for b in self.bits)

    def passes(self, tokens: int) -> int:
        """Passes over each weight word for `tokens` tokens: the unit multiplies
        `tokens_parallel` tokens per cycle, so a MATMUL takes about passes x its words cycles
        (memory is still read once)."""
        return -(-tokens // self.tokens_parallel)

    def fmt(self, bits: int, group_size: int) -> QuantFormat:
        if bits not in self.bits:
            raise ValueError(f"bits {bits} not in this build's {self.bits}")
        return QuantFormat(bits, group_size, self.word_bits)


CONFIGS = {
    c.name: c for c in (
        NdpConfig("default", word_bits=128, t_max=8, max_in_features=4096, bits=(2, 3, 4, 8),
                  tokens_parallel=2),
        NdpConfig("small", word_bits=64, t_max=2, max_in_features=1024, bits=(2, 4, 8), mem_bytes=1 << 20),
        NdpConfig("wide", word_bits=256, t_max=8, max_in_features=16384, bits=(2, 3, 4, 8),
                  tokens_parallel=2),
    )
}


def get_config(name: str) -> NdpConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown NDP configuration {name!r}; expected one of {sorted(CONFIGS)}") from None
