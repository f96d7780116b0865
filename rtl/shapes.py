"""Amaranth views of the contract (model/contract.py): layouts and enums, never re-typed.

Every field width and enum value here comes from the contract's BitStructs and IntEnums, so the
gateware, the golden model and the host pack the same bits.
"""
from __future__ import annotations

import enum as py_enum

from amaranth.hdl import Shape, unsigned
from amaranth.lib import data, enum

from ndpmoe.model.contract import (ACC_BITS, COUNTER_BITS, COUNTERS, DESCRIPTOR, STATUS, BitStruct, ErrorCode,
                            Opcode, State, output_struct)


def struct_layout(bits: BitStruct, **overrides) -> data.StructLayout:
    """A BitStruct as an Amaranth StructLayout (same fields, same LSB-first order).

    `overrides` swaps a field's plain width for a shape of the same width (an enum)."""
    fields = {}
    for name, width in bits.fields:
        shape = overrides.pop(name, unsigned(width))
        if Shape.cast(shape).width != width:
            raise TypeError(f"{bits.name}.{name} is {width} bits; {shape!r} does not match")
        fields[name] = shape
    if overrides:
        raise ValueError(f"{bits.name} has no field(s) {sorted(overrides)}")
    return data.StructLayout(fields)


def amaranth_enum(source: type[py_enum.IntEnum], width: int) -> type[enum.Enum]:
    """The contract's IntEnum as an Amaranth enum of an explicit width (same names and values)."""
    namespace = enum.EnumType.__prepare__(source.__name__, (enum.Enum,), shape=unsigned(width))
    for member in source:
        namespace[member.name] = member.value
    return enum.EnumType(source.__name__, (enum.Enum,), namespace, shape=unsigned(width))


OpcodeShape = amaranth_enum(Opcode, dict(DESCRIPTOR.fields)["opcode"])
ErrorShape = amaranth_enum(ErrorCode, dict(STATUS.fields)["error"])
StateShape = amaranth_enum(State, dict(STATUS.fields)["state"])

DescriptorLayout = struct_layout(DESCRIPTOR, opcode=OpcodeShape)
StatusLayout = struct_layout(STATUS, state=StateShape, error=ErrorShape)
CountersLayout = data.StructLayout({name: unsigned(COUNTER_BITS) for name in COUNTERS})


def result_layout(t_max: int) -> data.StructLayout:
    """One output stream result (value, row, token); value is the ACC_BITS two's complement."""
    layout = struct_layout(output_struct(t_max))
    assert dict(output_struct(t_max).fields)["value"] == ACC_BITS
    return layout
