"""A top level that keeps a component's ports off the package pins.

Every input port of the wrapped component is driven from one long shift register fed by the
`si` pin; every output port bit is folded into a multiple-input signature register (MISR) that
shifts out on the `so` pin. So the whole design needs four pins (clk, rst, si, so) on any
package, Yosys cannot prove any input constant or any output unobserved (nothing is optimized
away), and the wrapper adds at most one LUT level on either side of the design (each MISR bit is
an XOR of its neighbour and one output bit), so it does not become the critical path itself.
"""
from __future__ import annotations

from amaranth import Cat, Module, Signal, Value
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out


def split_ports(component: wiring.Component) -> tuple[list[Value], list[Value]]:
    """(inputs, outputs) of a component as plain Values, in signature order."""
    if not isinstance(component, wiring.Component):
        raise TypeError(f"the wrapped design must be an amaranth wiring.Component, not {component!r}")
    inputs, outputs = [], []
    for _path, member, value in component.signature.flatten(component):
        value = Value.cast(value)
        (inputs if member.flow == wiring.In else outputs).append(value)
    return inputs, outputs


class PinWrapper(wiring.Component):
    """Shift-register inputs and MISR outputs around `design`; ports: si, so (+ clk, rst)."""

    def __init__(self, design: wiring.Component):
        self._inputs, self._outputs = split_ports(design)
        if not self._outputs:
            raise ValueError(f"design {design!r} has no output ports: nothing would be observable")
        self._design = design
        # a signature dict, not annotations: `from __future__ import annotations` hides those
        super().__init__({"si": In(1), "so": Out(1)})

    @property
    def input_bits(self) -> int:
        return sum(len(v) for v in self._inputs)

    @property
    def output_bits(self) -> int:
        return sum(len(v) for v in self._outputs)

    def elaborate(self, platform):
        m = Module()
        m.submodules.design = self._design

        if self._inputs:
            chain = Signal(self.input_bits)
            m.d.sync += chain.eq(Cat(self.si, chain[:-1]))
            m.d.comb += Cat(*self._inputs).eq(chain)

        observed = Cat(*self._outputs)
        misr = Signal(self.output_bits)
        m.d.sync += misr.eq(Cat(misr[1:], 0) ^ observed)
        m.d.comb += self.so.eq(misr[0])
        return m
