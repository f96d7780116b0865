"""Named hardware presets for the performance model: links, GPUs, expert memories, NDP units,
and the two systems built from them (GPU-only offloading, GPU + CXL memory with NDP).

Bandwidths are sustained figures in GB/s (1e9 bytes/s). Where a measured figure is commonly quoted
it is used (PCIe 4.0 x16: 31.5 GB/s peak, about 25 GB/s measured; the same 80 % is applied to
PCIe 5.0). NDP throughput is NOT a bandwidth here: it follows from the unit's cycles per word
(host/ndp_cost.py) and the clock below.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

from ndpmoe.model.contract import NdpConfig, get_config

from .ndp_cost import RTL_COSIM, NdpCostModel


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, not {value!r}")


@dataclass(frozen=True)
class LinkPreset:
    """Host <-> GPU interconnect (also the path from the CXL memory to the GPU)."""
    name: str
    gbps: float               # sustained, one direction (links are full duplex)
    latency_us: float         # per round trip that a layer's data flow needs

    def __post_init__(self):
        _positive("gbps", self.gbps)


@dataclass(frozen=True)
class GpuPreset:
    name: str
    hbm_gbps: float
    tflops: float             # dense fp16 tensor throughput
    memory_gb: float

    def __post_init__(self):
        _positive("hbm_gbps", self.hbm_gbps)
        _positive("tflops", self.tflops)


@dataclass(frozen=True)
class MemoryPreset:
    """The memory the experts live in (host DRAM, or the DRAM behind a CXL device)."""
    name: str
    gbps: float

    def __post_init__(self):
        _positive("gbps", self.gbps)


@dataclass(frozen=True)
class NdpPreset:
    """NDP units beside the expert memory: `units` copies of one contract configuration."""
    name: str
    config: str               # contract.CONFIGS name: port width, T_max, buffer size
    units: int
    clock_mhz: float
    cost: NdpCostModel = RTL_COSIM       # cycles per word and overhead measured on the co-simulated RTL

    def __post_init__(self):
        get_config(self.config)
        _positive("units", self.units)
        _positive("clock_mhz", self.clock_mhz)

    @cached_property
    def ndp_config(self) -> NdpConfig:
        return get_config(self.config)

    @property
    def peak_gbps(self) -> float:
        """Streaming throughput of all units if the memory always answers."""
        word_bytes = self.ndp_config.word_bytes
        return self.units * word_bytes * self.clock_mhz * 1e6 / self.cost.cycles_per_word / 1e9


LINKS = {p.name: p for p in (
    LinkPreset("pcie4-x16", gbps=25.0, latency_us=10.0),
    LinkPreset("pcie5-x16", gbps=50.0, latency_us=8.0),
    # CXL.mem rides the PCIe 5.0 x16 PHY; loads skip the DMA setup, hence the lower latency.
    LinkPreset("cxl-x16", gbps=50.0, latency_us=2.0),
)}

GPUS = {p.name: p for p in (
    GpuPreset("rtx4090", hbm_gbps=1008.0, tflops=165.0, memory_gb=24.0),
    GpuPreset("a100-80gb", hbm_gbps=2039.0, tflops=312.0, memory_gb=80.0),
    GpuPreset("h100-sxm", hbm_gbps=3350.0, tflops=989.0, memory_gb=80.0),
)}

MEMORIES = {p.name: p for p in (
    MemoryPreset("ddr5-4800-8ch", gbps=307.2),      # host DRAM, 8 channels
    MemoryPreset("cxl-ddr5-4800-4ch", gbps=153.6),  # a CXL memory expander's 4 channels
)}

NDPS = {p.name: p for p in (
    # An ASIC-class unit per channel pair, bandwidth-matched to 4 DDR5-4800 channels:
    # 8 x 32 B x 600 MHz = 153.6 GB/s at 1 word/cycle.
    NdpPreset("cxl-ndp", config="wide", units=8, clock_mhz=600.0),
    # The same units at an FPGA clock (see the synthesis flow for the reachable Fmax).
    NdpPreset("cxl-ndp-fpga", config="wide", units=8, clock_mhz=150.0),
)}


@dataclass(frozen=True)
class SystemPreset:
    name: str
    gpu: GpuPreset
    link: LinkPreset
    memory: MemoryPreset
    ndp: NdpPreset | None = None


SYSTEMS = {s.name: s for s in (
    SystemPreset("gpu-only", GPUS["rtx4090"], LINKS["pcie4-x16"], MEMORIES["ddr5-4800-8ch"]),
    SystemPreset("gpu-ndp", GPUS["rtx4090"], LINKS["cxl-x16"], MEMORIES["cxl-ddr5-4800-4ch"], NDPS["cxl-ndp"]),
)}


def _lookup(kind: str, table: dict, name: str):
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {kind} preset {name!r}; expected one of {sorted(table)}") from None


def get_system(name: str, *, gpu: str | None = None, link: str | None = None,
               memory: str | None = None, ndp: str | None = None) -> SystemPreset:
    """A system preset, with any of its parts swapped for another named preset."""
    system = _lookup("system", SYSTEMS, name)
    if gpu is not None:
        system = replace(system, gpu=_lookup("GPU", GPUS, gpu))
    if link is not None:
        system = replace(system, link=_lookup("link", LINKS, link))
    if memory is not None:
        system = replace(system, memory=_lookup("memory", MEMORIES, memory))
    if ndp is not None:
        if system.ndp is None:
            raise ValueError(f"system {name!r} has no NDP unit; --ndp {ndp!r} needs --system gpu-ndp")
        system = replace(system, ndp=_lookup("NDP", NDPS, ndp))
    return system
