"""Fault scenarios of a co-simulated layer: the memory stops answering, the unit is reset in the
middle of the layer. Each must surface as an NdpError naming the descriptor (never a silent hang
of the simulator), and after `reset()` a rerun of the whole layer must give the golden output."""
from __future__ import annotations

import torch

from ndpmoe.host.ndp import NdpError
from ndpmoe.model.contract import Opcode

from .cosim_layer import LayerSetup
from .rtl_backend import Fault, NdpReset, NdpTimeout, RtlNdpBackend

EXPECTED = {"hang": NdpTimeout, "reset": NdpReset}


def _middle_matmul(descriptors) -> tuple[int, int]:
    """(index, words) of the MATMUL nearest the middle of the layer's descriptor sequence."""
    mid = len(descriptors) // 2
    idx = min((i for i, d in enumerate(descriptors) if d.descriptor.opcode == Opcode.MATMUL), key=lambda i: abs(i - mid))
    return idx, descriptors[idx].words


def fault_scenarios(s: LayerSetup, rtl: RtlNdpBackend, y_golden: torch.Tensor, descriptors) -> dict:
    """Run the layer with each fault at the middle MATMUL, reset, rerun. `descriptors`: the
    golden run's IssuedDescriptor list (the same sequence the RTL run issues)."""
    at, words = _middle_matmul(descriptors)
    out = {}
    for kind in ("hang", "reset"):
        ex = s.executor(rtl)
        fault = Fault(kind, rtl.issued + at, cycles=max(1, words // 2))      # half way through its words
        rtl.inject(fault)
        caught = None
        try:
            s.run(ex)
        except NdpError as exc:
            caught = exc
        finally:
            rtl.faults.remove(fault)
        rtl.reset()
        y, _ = s.run(ex)
        out[kind] = {"descriptor": at, "raised": type(caught).__name__ if caught else None,
                     "expected": EXPECTED[kind].__name__, "message": str(caught) if caught else None,
                     "caught": isinstance(caught, EXPECTED[kind]),
                     "rerun_equal_to_golden": bool(torch.equal(y, y_golden))}
    return out
