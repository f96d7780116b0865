"""A small FIFO store in LUT RAM, read asynchronously, split into column slices that each have
their own copy of the read pointer.

A wide entry (the result FIFO's is two 48-bit values and a row) takes dozens of 16-deep LUT-RAM
cells spread over the fabric; one read pointer driving the address of all of them, with the
read data going on to a register, is a path of routing from end to end. Here each slice of
columns is read at its own registered copy of the pointer (rtl/fanout.py), so every copy sits
by its cells.
"""
from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal, Value, unsigned
from amaranth.lib import memory

from .fanout import register_copies


def sliced_lut_ram(m: Module, name: str, width: int, depth: int, *, w_addr, w_data, w_en, r_advance,
                   slices: int, platform=None):
    """Storage of `depth` entries of `width` bits. Writes at `w_addr` when `w_en`; the read
    pointer starts at 0 and steps (mod depth) in every cycle `r_advance` is high.
    Returns (read data at the pointer, combinational; the pointer)."""
    if not isinstance(slices, int) or not 1 <= slices <= width:
        raise ValueError(f"slices must be an integer in 1..{width}, not {slices!r}")
    pointer = Signal(range(depth), name=f"{name}_rp")
    step = Mux(pointer == depth - 1, 0, pointer + 1)
    pointer_next = Mux(r_advance, step, pointer)
    m.d.sync += pointer.eq(pointer_next)
    # every copy equals `pointer` in every cycle (same next value, same reset value 0)
    copies = register_copies(m, pointer_next, slices, f"{name}_rp", platform, distinct=False)
    per = -(-width // slices)
    data = []
    for i in range(slices):
        lo, hi = i * per, min(width, (i + 1) * per)
        if lo >= hi:
            break
        store = memory.Memory(shape=unsigned(hi - lo), depth=depth, init=[])
        m.submodules[f"{name}_{i}"] = store
        wp, rp = store.write_port(), store.read_port(domain="comb")
        m.d.comb += [wp.addr.eq(w_addr), wp.data.eq(Value.cast(w_data)[lo:hi]), wp.en.eq(w_en), rp.addr.eq(copies[i])]
        data.append(rp.data)
    return Cat(*data), pointer
