"""Elaboration-time sizes of the NDP datapath, derived from one NdpConfig.

Vocabulary (as in model/contract.py): P word bits, b code bits, G group size, E metadata entries
per word, T tokens. Datapath words:

- beat: one cycle of the datapath. A memory word gives one beat (metadata, 3-bit hi plane) or
  `passes` beats (code words, once per group of `tokens_parallel` tokens).
- L lanes: codes per code beat of the densest format (P/2 for 2- and 3-bit).
- block: lanes summed by the first adder tree (min(32, L)): the finest group granularity, and the
  granularity of the activation sums the buffer precomputes at LOAD_ACT time.
- K = L / block: block sums per beat (so up to K groups complete per beat).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from ndpmoe.model.contract import (ACT_BITS, META_ENTRY_BITS, MAX_ROWS, SUPPORTED_GROUPS, NdpConfig, QuantFormat)


def log2(value: int) -> int:
    if value <= 0 or value & (value - 1):
        raise ValueError(f"expected a power of two, not {value}")
    return value.bit_length() - 1


def bits_for(value: int) -> int:
    """Unsigned bits holding 0..value."""
    return max(1, int(value).bit_length())


def signed_bits_for(bound: int) -> int:
    """Two's-complement bits holding -bound..bound."""
    return int(bound).bit_length() + 1


@dataclass(frozen=True)
class Geometry:
    cfg: NdpConfig

    def __post_init__(self):
        if not isinstance(self.cfg, NdpConfig):
            raise TypeError(f"cfg must be an NdpConfig, not {self.cfg!r}")

    # -- memory words -----------------------------------------------------------------------
    @property
    def word_bits(self) -> int:
        return self.cfg.word_bits

    @property
    def word_bytes(self) -> int:
        return self.cfg.word_bytes

    @property
    def meta_entries(self) -> int:
        """E: groups described by one metadata word."""
        return self.word_bits // META_ENTRY_BITS

    def codes_per_beat(self, bits: int) -> int:
        """Codes one code beat carries: a whole word, or one lo-plane word for 3-bit."""
        return QuantFormat(bits, 32, self.word_bits).codes_per_block // (2 if bits == 3 else 1)

    # -- lanes and adder tree -------------------------------------------------------------------
    @property
    def lanes(self) -> int:
        return max(self.codes_per_beat(b) for b in self.cfg.bits)

    @property
    def block(self) -> int:
        return min(min(SUPPORTED_GROUPS), self.lanes)

    @property
    def blocks(self) -> int:
        """K: block sums per beat, and the most groups one beat can complete."""
        return self.lanes // self.block

    def lane_code_bits(self, lane: int) -> int:
        """Widest code lane `lane` ever sees (lanes past a format's codes get zero)."""
        return max(b for b in self.cfg.bits if lane < self.codes_per_beat(b))

    # -- tokens -----------------------------------------------------------------------------
    @property
    def tokens_parallel(self) -> int:
        return self.cfg.tokens_parallel

    @property
    def max_passes(self) -> int:
        return self.cfg.passes(self.cfg.t_max)

    @property
    def pass_bits(self) -> int:
        return bits_for(self.max_passes - 1)

    @property
    def token_bits(self) -> int:
        return bits_for(self.cfg.t_max)

    # -- activation buffer ------------------------------------------------------------------
    @property
    def act_row_bytes(self) -> int:
        """Bytes of one activation RAM row: the lanes' activations for one beat."""
        return self.lanes * ACT_BITS // 8

    @property
    def words_per_act_row(self) -> int:
        return self.act_row_bytes // self.word_bytes

    @property
    def act_rows_per_token(self) -> int:
        """RAM rows one token may use, rounded up to a power of two for a {pass, row} address."""
        rows = self.cfg.max_in_features // self.lanes
        return 1 << bits_for(rows - 1) if rows > 1 else 1

    @property
    def act_row_addr_bits(self) -> int:
        return log2(self.act_rows_per_token)

    @property
    def act_depth(self) -> int:
        return self.max_passes * self.act_rows_per_token

    @property
    def xsum_bits(self) -> int:
        """One precomputed block sum of activations."""
        return signed_bits_for(self.block << (ACT_BITS - 1))

    # -- positions and sizes ----------------------------------------------------------------
    @property
    def in_bits(self) -> int:
        """Input positions within a row: 0..max_in_features."""
        return bits_for(self.cfg.max_in_features)

    @property
    def row_bits(self) -> int:
        return bits_for(MAX_ROWS)

    @cached_property
    def max_row_words(self) -> int:
        return max(QuantFormat(b, g, self.word_bits).row_words(self.cfg.max_in_features)
                   for b in self.cfg.bits for g in SUPPORTED_GROUPS)

    @cached_property
    def length_bits(self) -> int:
        """Words of one descriptor's read (a whole matrix or a whole activation load)."""
        load = self.cfg.t_max * self.cfg.max_in_features // self.word_bytes
        return bits_for(max(MAX_ROWS * self.max_row_words, load))

    @property
    def addr_bits(self) -> int:
        return self.cfg.addr_bits
