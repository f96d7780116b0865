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

Metadata word: E entries of 32 bits, entry j at bits [32j, 32j + 32); the scale is an unsigned
mantissa, the zero point a two's-complement int16 in Q11.4 (zero / 2^ZERO_FRAC_BITS codes)::

     31              16 15               0
    +------------------+------------------+
    |  zero (int16,    |  scale (uint16)  |
    |  Q11.4 fixed pt) |  mantissa        |
    +------------------+------------------+

Codes are unsigned b-bit integers, 0 .. 2^b - 1.

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

Dequantization: w = (code - zero / 2^ZERO_FRAC_BITS) * scale * 2^-scale_exp, with one signed
integer `scale_exp` per matrix (host-side metadata, int32 in the expert store; the hardware never
sees it). model/qtensor.scale_exponent picks floor(log2(SCALE_MAX / largest group scale)), which
puts the largest mantissa in [2^15, 2^16): positive while the largest scale is below SCALE_MAX / 2
(22 for 0.01; real weights always), 0 up to SCALE_MAX, negative above.

Activations
===========
Per-token symmetric int8: x ~= x_q * x_scale[t], x_q in [-127, 127]. In memory each activation is
one two's-complement byte; token t's row is `act_row_len(in)` = roundup(in, P) bytes (zeros past
`in`), rows back to back; that length covers the padded input of every bit width and is what a
LOAD_ACT's `in_features` field holds (a positive multiple of P: see Descriptor). The host never
writes -128, but the unit computes it exactly (the widths below allow |x| <= 128).

Descriptors
===========
The host drives the unit with descriptors (Descriptor: fields, operations, output order, and the
sizes every consumer derives from it); the unit reports State and ErrorCode (STATUS), refusing a
descriptor without reading memory, and the COUNTERS.

NDP arithmetic (bit-exact, see model/ndp_golden.py)
====================================================
    acc[t, r] = sum_g scale[r, g] * (2^ZERO_FRAC_BITS * sum_{i in g} code[r, i] * x[t, i]
                                      - zero[r, g] * sum_{i in g} x[t, i])
    y[t, r]   = acc[t, r] * 2^-(scale_exp + ZERO_FRAC_BITS) * x_scale[t]
Every intermediate is a two's-complement integer, exact; the widths are derived below from the
largest magnitude each can reach (G <= 128, code <= 255, |x| <= 128, |zero| <= 2^15, scale < 2^16),
so they hold every value; the term and the scaled term (31 and 47 bits) need every one of their
bits. An implementation may carry them wider::

    width            bits   holds
    GROUP_QX_BITS      23   sum_{i in g} code * x, one group
    GROUP_X_BITS       16   sum_{i in g} x
    TERM_BITS          31   2^ZERO_FRAC_BITS * sum(code * x) - zero * sum(x)
    SCALED_TERM_BITS   47   scale * that term
    ACC_BITS           54   acc over up to MAX_IN_FEATURES inputs
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, fields, replace
from functools import lru_cache

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
_GROUP_TERM_BOUND = max(SUPPORTED_GROUPS) * (ACT_MAX + 1) * ((1 << ZERO_FRAC_BITS) * 255 + (1 << (ZERO_BITS - 1)))
TERM_BITS = _bits_for_signed(_GROUP_TERM_BOUND)
SCALED_TERM_BITS = _bits_for_signed(_GROUP_TERM_BOUND * SCALE_MAX)


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
    LOAD_ACT = 1   # read `tokens` rows of `in_features` (a multiple of P) int8 activations at `addr`
    MATMUL = 2     # stream the packed matrix at `addr` against the loaded activations (see Descriptor)


class ErrorCode(enum.IntEnum):
    """Why a descriptor was refused (status field `error`). Refused descriptors read no memory."""
    NONE = 0
    BAD_OPCODE = 1
    BAD_BITS = 2          # bit width not in this build
    BAD_GROUP = 3         # group size code not one of SUPPORTED_GROUPS
    BAD_IN_FEATURES = 4   # zero, not a multiple of G (MATMUL) or P (LOAD_ACT), or above the buffer's capacity
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
GROUP_SIZES = {code: size for size, code in GROUP_CODES.items()}

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


_DESCRIPTOR_LIMITS = tuple((name, 1 << width) for name, width in DESCRIPTOR.fields)
_OPCODES = {int(op): op for op in Opcode}


@lru_cache(maxsize=4096)
def _row_words(bits: int, group_size: int, word_bits: int, in_features: int) -> tuple[int, int]:
    """(words, of which streamed once) of one packed row: the once words are the metadata words
    and, at 3 bits, the hi-plane words."""
    fmt = QuantFormat(bits, group_size, word_bits)
    hi = fmt.padded_in(in_features) // fmt.codes_per_block if bits == 3 else 0
    return fmt.row_words(in_features), fmt.superblocks(in_features) + hi


@dataclass(frozen=True)
class Descriptor:
    """One NDP command: the DESCRIPTOR word the unit takes on its command stream, as an object.

    Fields, LSB first (DESCRIPTOR above is the one definition of the widths; a test holds this
    table to it)::

        field        bits       meaning
        opcode       [0, 2)     Opcode
        bits         [2, 6)     bits per weight code, as a number (2, 3, 4 or 8)
        group        [6, 8)     group size code: G = 32 << group (GROUP_CODES; 3 is refused)
        tokens       [8, 16)    T, tokens to use (1 .. T_max)
        rows         [16, 32)   MATMUL: rows of the matrix to stream (a prefix of the image)
        in_features  [32, 48)   LOAD_ACT: bytes per token row; MATMUL: inputs per row
        addr         [48, 80)   byte address in the unit's memory, a multiple of P / 8

    NOP does nothing. LOAD_ACT reads `tokens` x `in_features` bytes at `addr`, token after token,
    into the activation buffer (each byte one two's-complement int8 activation); `in_features`
    must be a positive multiple of P (so that it covers padded_in of every bit width) up to the
    build's max_in_features: the host writes act_row_len(n) for n inputs, never n itself. `bits`
    and `group` are ignored; the host writes 8 and code 0. MATMUL streams the first `rows` rows
    of the packed matrix at `addr` (format `bits`, G, P) against the first `tokens` loaded tokens
    and their first padded_in(in_features) inputs; `in_features` is a positive multiple of G.

    Output stream: a MATMUL emits `rows` x `tokens` results (token, row, value), row by row and
    within a row token 0 .. T-1 (`output_order`); a LOAD_ACT or NOP emits none.

    The sizes below hold for a descriptor the unit accepts (model/ndp_golden.check_descriptor);
    they take the NdpConfig for its port width P and tokens_parallel.
    """
    opcode: int
    bits: int = 0
    group: int = 0
    tokens: int = 0
    rows: int = 0
    in_features: int = 0
    addr: int = 0

    def __post_init__(self):
        for name, limit in _DESCRIPTOR_LIMITS:
            v = getattr(self, name)
            if type(v) is not int and (isinstance(v, bool) or not isinstance(v, int)):
                raise TypeError(f"descriptor field {name} must be an integer, not {v!r}")
            if not 0 <= v < limit:
                raise ValueError(f"descriptor field {name} must be in [0, 2^{limit.bit_length() - 1}), not {v}")
        op = _OPCODES.get(self.opcode)
        if op is not None:
            object.__setattr__(self, "opcode", op)

    # -- making one -------------------------------------------------------------------------------
    @classmethod
    def load_act(cls, *, tokens: int, in_features: int, addr: int = 0) -> "Descriptor":
        """LOAD_ACT of `tokens` rows of `in_features` bytes (act_row_len of the inputs)."""
        return cls(Opcode.LOAD_ACT, bits=8, group=GROUP_CODES[32], tokens=tokens, in_features=in_features,
                   addr=addr)

    @classmethod
    def matmul(cls, fmt: QuantFormat, *, tokens: int, rows: int, in_features: int, addr: int = 0) -> "Descriptor":
        """MATMUL of the first `rows` rows of a matrix packed in `fmt`."""
        return cls(Opcode.MATMUL, bits=fmt.bits, group=GROUP_CODES[fmt.group_size], tokens=tokens, rows=rows,
                   in_features=in_features, addr=addr)

    def at(self, addr: int) -> "Descriptor":
        """The same command at another address."""
        return replace(self, addr=addr)

    # -- the packed word ----------------------------------------------------------------------------
    def encode(self) -> int:
        return DESCRIPTOR.pack(**{name: int(getattr(self, name)) for name, _ in DESCRIPTOR.fields})

    @classmethod
    def decode(cls, raw: int) -> "Descriptor":
        if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw < (1 << DESCRIPTOR.width):
            raise ValueError(f"a packed descriptor is an integer in [0, 2^{DESCRIPTOR.width}), not {raw!r}")
        return cls(**DESCRIPTOR.unpack(raw))

    # -- what it names ------------------------------------------------------------------------------
    @property
    def group_size(self) -> int:
        try:
            return GROUP_SIZES[self.group]
        except KeyError:
            raise ValueError(f"group code {self.group} names no group size; expected one of {GROUP_SIZES}") from None

    def fmt(self, word_bits: int) -> QuantFormat:
        """The packed format a MATMUL streams."""
        return QuantFormat(self.bits, self.group_size, word_bits)

    def describe(self) -> str:
        op = self.opcode.name if isinstance(self.opcode, Opcode) else f"opcode {self.opcode}"
        group = GROUP_SIZES.get(self.group, f"code {self.group}")
        return (f"{op} bits={self.bits} group={group} tokens={self.tokens} rows={self.rows} "
                f"in={self.in_features} addr={self.addr:#x}")

    # -- sizes of an accepted descriptor --------------------------------------------------------------
    def read_bytes(self, cfg: NdpConfig) -> int:
        """Bytes it reads from `addr` on (one contiguous range)."""
        return self.words(cfg) * cfg.word_bytes

    def words(self, cfg: NdpConfig) -> int:
        """Port words it reads (the words_read counter's increment)."""
        if self.opcode == Opcode.LOAD_ACT:
            return self.tokens * self.in_features // cfg.word_bytes
        if self.opcode == Opcode.MATMUL:
            return self.rows * _row_words(self.bits, self.group_size, cfg.word_bits, self.in_features)[0]
        return 0

    def once_words(self, cfg: NdpConfig) -> int:
        """Words that take one datapath beat whatever the passes: a MATMUL's metadata words and
        3-bit hi-plane words; every word of a LOAD_ACT."""
        if self.opcode == Opcode.LOAD_ACT:
            return self.words(cfg)
        if self.opcode == Opcode.MATMUL:
            return self.rows * _row_words(self.bits, self.group_size, cfg.word_bits, self.in_features)[1]
        return 0

    def passes(self, cfg: NdpConfig) -> int:
        """Beats per code word: ceil(T / tokens_parallel) for a MATMUL, else 1."""
        return cfg.passes(self.tokens) if self.opcode == Opcode.MATMUL else 1

    def beats(self, cfg: NdpConfig) -> int:
        """Datapath beats: once words one each, the other words one per pass."""
        once = self.once_words(cfg)
        return once + (self.words(cfg) - once) * self.passes(cfg)

    @property
    def results(self) -> int:
        """Results on the output stream."""
        return self.rows * self.tokens if self.opcode == Opcode.MATMUL else 0

    def output_order(self) -> list[tuple[int, int]]:
        """(token, row) of each result, in stream order: row by row, tokens 0 .. T-1 in a row."""
        if self.opcode != Opcode.MATMUL:
            return []
        return [(t, r) for r in range(self.rows) for t in range(self.tokens)]


assert tuple(f.name for f in fields(Descriptor)) == tuple(n for n, _ in DESCRIPTOR.fields)


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
