"""Functional coverage of the NDP bench (cocotb-coverage): what the checked descriptors exercised.

Cover groups, under "ndp" in cocotb-coverage's database, each sampled by sim/tb.py:

- matmul:  every MATMUL that ran, crossed: bit width x group size x T x memory word size P (the
           build's P: one value per run, the CI runs two builds);
- error:   the error code of every checked descriptor (NONE and each refusal);
- stall:   a handshake that stalled at least one cycle in a descriptor's run, per handshake and
           kind of descriptor: the command port (the host waits), a memory request (the memory
           waits), a late response word (the datapath waits: the unit's mem_stall count), a
           response word held (the unit waits), a result held (the consumer waits: out_stall;
           MATMUL only);
- reset:   the state a reset found the unit in: idle, or a LOAD_ACT / MATMUL before its first
           word, while reading, or after its last word (draining), alone or with a descriptor
           queued behind it;
- pair:    two descriptors back to back (the second handed over while the first was still in
           the unit), by kind: MATMUL, LOAD_ACT, NOP, refused.
"""
from __future__ import annotations

import itertools

from cocotb_coverage.coverage import CoverCross, CoverPoint, coverage_db

from ndpmoe.model.contract import SUPPORTED_GROUPS, ErrorCode, NdpConfig, Opcode

from .workload import Step

KINDS = ("MATMUL", "LOAD_ACT", "NOP", "refused")
RUNS = ("LOAD_ACT", "MATMUL")
HANDSHAKES = ("command", "mem_request", "mem_response_late", "mem_response_held", "result")
PHASES = ("before_first_word", "reading", "draining")


def step_kind(step: Step) -> str:
    if step.error != ErrorCode.NONE:
        return "refused"
    return Opcode(step.descriptor.opcode).name


def reset_bins() -> list[tuple]:
    return [("idle", None, False)] + [(op, phase, queued) for op in RUNS for phase in PHASES
                                      for queued in (False, True)]


class NdpCoverage:
    """The cover groups of one run (one build): call the samplers as descriptors are checked."""

    ROOT = "ndp"

    def __init__(self, cfg: NdpConfig):
        self.cfg = cfg
        r = self.ROOT
        names = [f"{r}.matmul.bits", f"{r}.matmul.group", f"{r}.matmul.tokens", f"{r}.matmul.word_bits"]
        if names[0] in coverage_db:
            raise RuntimeError("the NDP coverage groups exist already: one NdpCoverage per process")
        bins = (list(cfg.bits), list(SUPPORTED_GROUPS), list(range(1, cfg.t_max + 1)), [cfg.word_bits])
        points = [CoverPoint(name, xf=lambda *args, i=i: args[i], bins=b) for i, (name, b) in enumerate(zip(names, bins))]
        # the cross is made from the points' bins; the points wrap it, so they are sampled first
        sample = CoverCross(f"{r}.matmul.cross", items=names)(lambda *args: None)
        for point in reversed(points):
            sample = point(sample)
        self._matmul = sample
        self._error = CoverPoint(f"{r}.error.code", bins=[e.name for e in ErrorCode])(lambda code: None)
        # (a LOAD_ACT has no results: no result of its own can wait)
        stall_bins = [(h, run) for h, run in itertools.product(HANDSHAKES, RUNS) if (h, run) != ("result", "LOAD_ACT")]
        self._stall = CoverPoint(f"{r}.stall.handshake", bins=stall_bins)(lambda handshake, run: None)
        self._reset = CoverPoint(f"{r}.reset.state", bins=reset_bins())(lambda op, phase, queued: None)
        self._pair = CoverPoint(f"{r}.pair.kinds", bins=list(itertools.product(KINDS, KINDS)))(
            lambda first, second: None)

    # -- samplers ---------------------------------------------------------------------------------
    def checked(self, step: Step, waits: dict[str, int]) -> None:
        """A step ended and was checked; `waits`: cycles each handshake stalled in its run."""
        self._error(step.error.name)
        kind = step_kind(step)
        if kind == "MATMUL":
            d = step.descriptor
            self._matmul(d.bits, d.group_size, d.tokens, self.cfg.word_bits)
        if kind in RUNS:
            for handshake, cycles in waits.items():
                if cycles:
                    self._stall(handshake, kind)

    def handed_over(self, first: Step | None, second: Step) -> None:
        """`second` was handed over while `first` (the youngest in flight, if any) was in the unit."""
        if first is not None:
            self._pair(step_kind(first), step_kind(second))

    def reset(self, op: str, phase: str | None, queued: bool) -> None:
        self._reset(op, phase, queued)

    # -- results ----------------------------------------------------------------------------------
    def groups(self) -> dict[str, dict]:
        """Per cover point or cross: bins hit, bins in all, and the bins missed."""
        out = {}
        for name in sorted(coverage_db):
            item = coverage_db[name]
            if not name.startswith(self.ROOT + ".") or not isinstance(item, (CoverPoint, CoverCross)):
                continue
            hits = item.detailed_coverage
            out[name[len(self.ROOT) + 1:]] = {
                "hit": sum(1 for v in hits.values() if v), "bins": len(hits),
                "missed": [_label(b) for b, v in hits.items() if not v]}
        return out

    def missed(self, name: str) -> list:
        """The raw bins of cover point `name` (e.g. "matmul.cross") with no hit yet."""
        item = coverage_db[f"{self.ROOT}.{name}"]
        return [b for b, v in item.detailed_coverage.items() if not v]


def _label(bin_) -> str:
    return "/".join(str(b) for b in bin_) if isinstance(bin_, tuple) else str(bin_)
