"""A pipelined adder tree: sums of aligned blocks of values, a register after every level.

Shared by the multiply lanes (code x activation products) and the activation loader (activation
block sums). A register after every level keeps each level to one adder of a few tens of bits,
which is what an ECP5 at >= 150 MHz allows.
"""
from __future__ import annotations

from amaranth.hdl import Module, Signal, Value

from .geometry import log2


def block_sums(m: Module, values: list[Value], block: int, name: str) -> tuple[list[Signal], int]:
    """Sums of values[k*block:(k+1)*block] for every k, each level registered.

    Returns (sums, latency in cycles). Widths grow by one bit per level, so nothing overflows.
    """
    if len(values) % block:
        raise ValueError(f"{len(values)} values do not split into blocks of {block}")
    level = list(values)
    for depth in range(log2(block)):
        nxt = []
        for i in range(0, len(level), 2):
            a, b = level[i], level[i + 1]
            s = Signal((Value.cast(a) + Value.cast(b)).shape(), name=f"{name}_l{depth}_{i // 2}")
            m.d.sync += s.eq(a + b)
            nxt.append(s)
        level = nxt
    return level, log2(block)
