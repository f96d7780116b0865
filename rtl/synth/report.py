"""Read what Yosys and nextpnr wrote (stat.json, report.json, nextpnr.log) into one result."""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ndpmoe.rtl.synth.targets import FpgaTarget

_UTIL_LINE = re.compile(r"^Info:\s+(\w+):\s+(\d+)/\s*(\d+)\s+\d+%")
# Yosys names mapped nets after the cells it hung on them: `design.acc_TRELLIS_FF_Q_DI_LUT4_Z`.
_MAPPED_SUFFIX = re.compile(r"_(?:SB_|TRELLIS_|LUT4|CCU2C|PFUMX|L6MUX21|MULT18X18D|ALU54B|DP16KD|PDPW16KD|DPR16X4)")
_VERILOG_LOC = re.compile(r"^(.*\.v):(\d+)\.")
_SRC_ATTR = re.compile(r'^\s*\(\* src = "([^"]+)" \*\)')


def signal_name(net: str) -> str:
    """The HDL signal a mapped net came from (bit index dropped)."""
    return re.sub(r"\[\d+\]$", "", _MAPPED_SUFFIX.split(net, 1)[0])


def python_source(verilog_lines: list[str], loc: str | None) -> str | None:
    """Amaranth's `(* src = "file.py:N" *)` above the Verilog line nextpnr names, if any."""
    m = _VERILOG_LOC.match(loc or "")
    if not m or not verilog_lines:
        return None
    line = int(m.group(2)) - 1
    for i in range(line - 1, max(line - 4, -1), -1):
        attr = _SRC_ATTR.match(verilog_lines[i]) if i < len(verilog_lines) else None
        if attr:
            # several sources are joined by "|"; amaranth's own lines (clock ports) say nothing
            srcs = [x for x in attr.group(1).split("|") if "/amaranth/" not in x]
            return _relative(srcs[0]) if srcs else None
    return None


def _relative(src: str) -> str:
    try:
        return str(Path(src).relative_to(Path.cwd()))
    except ValueError:
        return src


@dataclass(frozen=True)
class PathStep:
    kind: str            # clk-to-q, routing, logic, setup, source
    delay_ns: float
    cell: str            # the cell the step ends at
    port: str
    net: str | None      # routing steps only
    source: str | None   # Verilog location of the net, where nextpnr knows it
    hdl: str | None      # the Amaranth (Python) line that location came from


@dataclass(frozen=True)
class CriticalPath:
    start: str           # launching cell
    end: str             # capturing cell
    delay_ns: float
    logic_ns: float
    routing_ns: float
    logic_levels: int    # logic steps between the two registers (a carry chain counts per cell)
    steps: tuple[PathStep, ...]

    def nets(self) -> list[str]:
        return [s.net for s in self.steps if s.net]

    def signals(self) -> list[str]:
        """The HDL signals along the path, consecutive repeats merged. Yosys names a mapped net
        after one of the cells on it, so a name in the middle of a path is a hint, not proof."""
        out = []
        for net in self.nets():
            name = signal_name(net)
            if not out or out[-1] != name:
                out.append(name)
        return out

    def hdl_lines(self) -> list[str]:
        return list(dict.fromkeys(s.hdl for s in self.steps if s.hdl))

    def describe(self) -> str:
        return (f"{self.delay_ns:.2f} ns = {self.logic_ns:.2f} logic + {self.routing_ns:.2f} routing, "
                f"{self.logic_levels} logic steps; {signal_name(self.start)} -> {signal_name(self.end)}")


@dataclass
class SynthResult:
    config: str
    target: str
    speed: int | None
    freq_target_mhz: float
    fits: bool
    fmax_mhz: float | None
    luts: int | None
    ffs: int | None
    dsps: int | None
    brams: int | None
    utilization: dict[str, dict[str, int]]        # nextpnr BEL type -> {used, available}
    yosys_cells: dict[str, int]                   # cell type -> count after synthesis
    critical_path: CriticalPath | None
    seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    extra: dict = field(default_factory=dict)     # sweep point parameters, throughput, ...

    @property
    def meets_target(self) -> bool:
        return self.fits and self.fmax_mhz is not None and self.fmax_mhz >= self.freq_target_mhz

    def to_json(self) -> dict:
        out = asdict(self)
        out["meets_target"] = self.meets_target
        return out

    @classmethod
    def from_json(cls, raw: dict) -> "SynthResult":
        raw = dict(raw)
        raw.pop("meets_target", None)
        cp = raw.get("critical_path")
        if cp:
            cp = dict(cp, steps=tuple(PathStep(**s) for s in cp["steps"]))
            raw["critical_path"] = CriticalPath(**cp)
        return cls(**raw)


def read_yosys_cells(build: Path) -> dict[str, int]:
    stat = build / "stat.json"
    if not stat.exists():
        return {}
    cells = json.loads(stat.read_text())["design"]["num_cells_by_type"]
    return {k: int(v) for k, v in cells.items() if not k.startswith("$scopeinfo")}


def read_utilization(build: Path) -> dict[str, dict[str, int]]:
    """BEL usage from report.json, or from the log's utilisation table when placement failed."""
    report = build / "report.json"
    if report.exists():
        return {k: {"used": v["used"], "available": v["available"]}
                for k, v in json.loads(report.read_text())["utilization"].items()}
    util = {}
    log = build / "nextpnr.log"
    for line in (log.read_text(errors="replace").splitlines() if log.exists() else ()):
        m = _UTIL_LINE.match(line)
        if m:
            util[m.group(1)] = {"used": int(m.group(2)), "available": int(m.group(3))}
    return util


def over_capacity(util: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {k: v for k, v in util.items() if v["used"] > v["available"]}


def _critical_path(raw: dict, verilog_lines: list[str]) -> CriticalPath:
    steps = []
    for s in raw["path"]:
        sources = s.get("sources") or []
        source = sources[0] if sources else None
        # Yosys often keeps Amaranth's own src attribute (a .py line); else map the .v line back
        py = [x for x in sources if re.search(r"\.py:\d+$", x) and "/amaranth/" not in x]
        hdl = _relative(py[0]) if py else python_source(verilog_lines, source)
        steps.append(PathStep(kind=s["type"], delay_ns=round(float(s["delay"]), 3),
                              cell=s["to"]["cell"], port=s["to"]["port"], net=s.get("net"),
                              source=source, hdl=hdl))
    logic = sum(s.delay_ns for s in steps if s.kind in ("clk-to-q", "logic", "setup"))
    routing = sum(s.delay_ns for s in steps if s.kind == "routing")
    start = raw["path"][0]["from"]["cell"] if raw["path"] else "?"
    return CriticalPath(start=start, end=steps[-1].cell if steps else "?",
                        delay_ns=round(logic + routing, 3), logic_ns=round(logic, 3),
                        routing_ns=round(routing, 3),
                        logic_levels=sum(s.kind == "logic" for s in steps), steps=tuple(steps))


def read_timing(build: Path) -> tuple[float | None, CriticalPath | None]:
    """Achieved Fmax of the design's clock and its register-to-register critical path.

    Paths from or to '<async>' (the reset and si pins, the so pin) are I/O paths, not part of
    the clock's Fmax, and are skipped.
    """
    report = build / "report.json"
    if not report.exists():
        return None, None
    raw = json.loads(report.read_text())
    # nextpnr-ice40 may promote a constant net to a "clock" (DSP clock pins tied off): not ours
    clocks = {k: v["achieved"] for k, v in raw.get("fmax", {}).items() if "$PACKER_GND_NET" not in k}
    if not clocks:
        return None, None
    clock = min(clocks, key=clocks.get)
    paths = [p for p in raw.get("critical_paths", [])
             if p["from"] == f"posedge {clock}" and p["to"] == f"posedge {clock}"]
    top_v = build / "top.v"
    lines = top_v.read_text().splitlines() if top_v.exists() else []
    return round(clocks[clock], 2), (_critical_path(paths[0], lines) if paths else None)


def read_failing_endpoints(build: Path, freq_mhz: float, top: int = 12) -> dict | None:
    """Every register input the clock reaches later than its period, from nextpnr's detailed
    timing report (the arrival time it gives each endpoint), grouped by the HDL signal the
    register holds: how many fail, and the `top` signals with the latest arrivals. One run then
    shows all of what is left to pipeline, not just the single critical path. I/O paths
    (from the reset and si pins) are left out, as in the Fmax, and so are flip-flops' LSR
    inputs: nextpnr gives one arrival per endpoint, and Yosys folds the reset pin into the LSR
    logic of most registers (D = c ? x : 0 becomes a synchronous reset), whose pin path is not
    the clock's."""
    report = build / "report.json"
    if not report.exists():
        return None
    raw = json.loads(report.read_text())
    nets = raw.get("detailed_net_timings")
    if nets is None:
        return None
    period = 1000.0 / freq_mhz
    failing: dict[str, list[float]] = {}
    for net in nets:
        if net.get("event", "").startswith("<async>"):
            continue
        for end in net["endpoints"]:
            arrival = float(end["delay"][1])
            if end.get("event") == net.get("event") and end.get("port") != "LSR" and arrival > period:
                failing.setdefault(signal_name(end["cell"]), []).append(arrival)
    worst = sorted(failing.items(), key=lambda kv: -max(kv[1]))[:top]
    return {"period_ns": round(period, 3), "endpoints": sum(len(v) for v in failing.values()),
            "signals": len(failing),
            "worst": [{"signal": k, "endpoints": len(v), "arrival_ns": round(max(v), 3)} for k, v in worst]}


def resource_counts(target: FpgaTarget, util: dict, cells: dict) -> dict[str, int | None]:
    """LUTs, FFs, DSPs, block RAMs in the target's own units.

    ECP5: LUTs = TRELLIS_COMB slots used (LUT4s, carry halves, LUT-RAM), FFs = TRELLIS_FF.
    iCE40: LUT and FF share a logic cell, so both come from Yosys's cell counts (SB_LUT4, SB_DFF*).
    """
    def used(bel):
        return util.get(bel, {}).get("used") if util else None

    if target.ff_bel:
        luts, ffs = used(target.lut_bel), used(target.ff_bel)
    else:
        luts = cells.get("SB_LUT4")
        ffs = sum(n for k, n in cells.items() if k.startswith("SB_DFF")) if cells else None
    dsps = used(target.dsp_bel) if target.dsp_bel else 0
    brams = sum(used(b) or 0 for b in target.bram_bels) if util else None
    return {"luts": luts, "ffs": ffs, "dsps": dsps, "brams": brams}


def log_tail(path: Path, lines: int = 12) -> str:
    if not path.exists():
        return f"(no {path.name})"
    text = path.read_text(errors="replace").splitlines()
    errors = [l for l in text if "ERROR" in l]
    return "\n".join(errors[-lines:] or text[-lines:])
