"""What an FPGA build of the NDP unit delivers at its achieved clock.

The datapath multiplies one port word's codes by `tokens_parallel` tokens per cycle; a MATMUL of
T tokens makes passes(T) = ceil(T / tokens_parallel) passes over each word (memory is read once).

  peak weight bandwidth      = Fmax x port bytes                        (one word every cycle)
  sustained weight bandwidth = Fmax x port bytes x words per cycle      (T <= tokens_parallel)
                               ... / passes(t_max) with a full activation buffer
  expert-GEMM throughput     = Fmax x MACs per cycle,
  MACs per cycle             = words per cycle x tokens_parallel x in / row words
                               (contract sizes: a row's metadata words carry no MACs and
                               phantom padding codes are not counted)

`words_per_cycle` is how many port words the datapath takes per cycle while it streams a
matrix. Its default, 1.0, is the RTL's DESIGN TARGET (memory always ready), not a measurement:
pass the value measured in simulation (words_read / busy_cycles of a single-pass MATMUL).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ndpmoe.model.contract import NdpConfig
from ndpmoe.rtl.synth.report import SynthResult

RTL_TARGET_WORDS_PER_CYCLE = 1.0
DEFAULT_GROUP_SIZE = 64


def check_words_per_cycle(words_per_cycle) -> float:
    if isinstance(words_per_cycle, bool) or not isinstance(words_per_cycle, (int, float)) \
            or not 0 < words_per_cycle <= 1:
        raise ValueError(f"words per cycle must be a number in (0, 1], not {words_per_cycle!r}")
    return float(words_per_cycle)


def macs_per_cycle(cfg: NdpConfig, bits: int, words_per_cycle: float = RTL_TARGET_WORDS_PER_CYCLE,
                   group_size: int = DEFAULT_GROUP_SIZE, in_features: int | None = None) -> float:
    """Useful multiply-accumulates per cycle streaming a `bits`-wide matrix of `in_features`
    inputs (default: the buffer's max_in_features) with tokens_parallel tokens per pass."""
    in_features = cfg.max_in_features if in_features is None else in_features
    fmt = cfg.fmt(bits, group_size)
    return (check_words_per_cycle(words_per_cycle) * cfg.tokens_parallel * in_features
            / fmt.row_words(in_features))


@dataclass(frozen=True)
class Throughput:
    fmax_mhz: float
    word_bytes: int
    words_per_cycle: float
    words_per_cycle_source: str
    peak_gbps: float                     # GB/s of port words at one word per cycle
    sustained_gbps: float                # GB/s at words_per_cycle, one pass (T <= tokens_parallel)
    full_buffer_gbps: float              # GB/s with t_max tokens loaded (passes(t_max) per word)
    macs_per_cycle: dict[int, float]     # bit width -> MACs per cycle
    gmacs: dict[int, float]              # bit width -> GMAC/s at fmax

    def to_json(self) -> dict:
        return asdict(self)


def throughput(cfg: NdpConfig, fmax_mhz: float, words_per_cycle: float = RTL_TARGET_WORDS_PER_CYCLE,
               group_size: int = DEFAULT_GROUP_SIZE) -> Throughput:
    words_per_cycle = check_words_per_cycle(words_per_cycle)
    source = ("RTL design target, not measured" if words_per_cycle == RTL_TARGET_WORDS_PER_CYCLE
              else "given")
    macs = {b: round(macs_per_cycle(cfg, b, words_per_cycle, group_size), 2) for b in cfg.bits}
    peak = fmax_mhz * 1e6 * cfg.word_bytes / 1e9
    return Throughput(fmax_mhz=fmax_mhz, word_bytes=cfg.word_bytes, words_per_cycle=words_per_cycle,
                      words_per_cycle_source=source, peak_gbps=round(peak, 3),
                      sustained_gbps=round(peak * words_per_cycle, 3),
                      full_buffer_gbps=round(peak * words_per_cycle / cfg.passes(cfg.t_max), 3),
                      macs_per_cycle=macs,
                      gmacs={b: round(m * fmax_mhz / 1e3, 2) for b, m in macs.items()})


def attach_throughput(r: SynthResult, ndp_config: NdpConfig, words_per_cycle: float) -> None:
    """Record in `r.extra["throughput"]` what the build delivers at its Fmax (if it fits)."""
    if r.fits and r.fmax_mhz:
        r.extra["throughput"] = throughput(ndp_config, r.fmax_mhz, words_per_cycle).to_json()
