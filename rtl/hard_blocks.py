"""Block RAMs and multipliers with their registers on: what the FPGA's hard blocks do best.

Yosys infers ECP5 block RAMs without their output register and multipliers without their input
and output registers (TOOLCHAIN.md), and nextpnr then times an unregistered DP16KD read at
about 5.8 ns clock-to-out at speed grade 6, most of a 150 MHz cycle before any routing. So the
unit builds these two things through this module:

- `RegisteredRam`: one write and one read port, every input registered twice and the read data
  registered (RAM_READ_LATENCY 4). On ECP5 the second level gives each DP16KD its own copy of
  the address and enable registers, fed from a copy per RAM_BRANCHING block RAMs (the block
  RAMs of a wide row sit across the device: one address net reaching all of them was the
  critical path, then one register copy per block RAM fed from one place), and the DP16KD runs
  with REGMODE OUTREG.
- `registered_product`: a x b with the operands and the product registered (2 cycles); on ECP5
  a MULT18X18D with REG_INPUTA/B and REG_OUTPUT on CLK0.

The choice is made by the `platform` given to elaborate: `Ecp5HardBlocks()` (the synthesis flow
passes it for ECP5 targets) instantiates the primitives, anything else (None in simulation,
users' own Vivado/Quartus flows) builds the same cycle behaviour from plain Amaranth. Verilator
runs the ECP5 form too, against behavioural models of the primitives (`ecp5_models.v`), so
the netlist nextpnr times is the one the benches check bit-exactly.
"""
from __future__ import annotations

from amaranth.hdl import ClockSignal, Const, Instance, Module, Signal, Value, signed, unsigned
from amaranth.lib import memory, wiring
from amaranth.lib.wiring import In, Out

from .fanout import register_copies
from .platforms import ECP5_MODELS, PRIMITIVES, Ecp5HardBlocks, platform_for, simulation_models, uses_ecp5  # noqa: F401

RAM_INPUT_STAGES = 2             # registers ahead of the block RAM's own address register
RAM_READ_LATENCY = RAM_INPUT_STAGES + 2
RAM_BRANCHING = 4                # block RAMs per first-level copy of an address or enable
PRODUCT_LATENCY = 2

DSP_WIDTH = 18                   # MULT18X18D: signed 18 x 18 -> 36
BRAM_BITS = 16384                # DP16KD data bits (without parity use, 18 Kib with it)
# DP16KD data widths and the lowest address bit of the word address at each (Yosys's
# brams_map_16kd.v convention: a 14-bit bit-granular address; 36 is the pseudo-dual-port mode)
_BRAM_MODES = ((36, 5, 512), (18, 4, 1024), (9, 3, 2048), (4, 2, 4096), (2, 1, 8192), (1, 0, 16384))


def bram_mode(depth: int) -> tuple[int, int, int]:
    """(data width, lowest word-address bit, words) of the widest DP16KD mode holding `depth`."""
    for width, shift, words in _BRAM_MODES:
        if depth <= words:
            return width, shift, words
    raise ValueError(f"RAM depth {depth} exceeds one DP16KD column (at most {_BRAM_MODES[-1][2]} words)")


class RegisteredRam(wiring.Component):
    """`depth` x `width` bits. Cycle 0: `w_addr`, `w_data`, `w_en`, `r_addr` presented; cycle 2:
    in the second input registers, the write lands at its end; cycle 4: `r_data` holds the word
    at the cycle-2 address. A read of a word written in the same cycle is undefined (the users never
    do that: no_rw_check).

    Its input registers are reset-less, in both forms: the ECP5 form's per-block-RAM copies of
    the write enable differ in their power-on values only (rtl/fanout.py), so a reset never
    writes, and a write already in the input registers lands in both forms alike.
    """

    def __init__(self, width: int, depth: int):
        for name, v in (("width", width), ("depth", depth)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"RAM {name} must be a positive integer, not {v!r}")
        self._width, self._depth = width, depth
        abits = max(1, (depth - 1).bit_length())
        super().__init__({
            "w_addr": In(abits), "w_data": In(width), "w_en": In(1),
            "r_addr": In(abits), "r_data": Out(width),
        })

    def elaborate(self, platform):
        m = Module()
        if uses_ecp5(platform):
            self._elaborate_ecp5(m, platform)
        else:
            self._elaborate_generic(m)
        return m

    def _elaborate_generic(self, m):
        ports = (("w_addr", self.w_addr), ("w_data", self.w_data), ("w_en", self.w_en), ("r_addr", self.r_addr))
        mid = [Signal.like(s, name=f"{n}_mid", reset_less=True) for n, s in ports]
        w_addr, w_data, w_en, r_addr = (Signal.like(s, name=f"{n}_in", reset_less=True) for n, s in ports)
        m.d.sync += [r.eq(s) for r, (_, s) in zip(mid, ports)]
        m.d.sync += [w_addr.eq(mid[0]), w_data.eq(mid[1]), w_en.eq(mid[2]), r_addr.eq(mid[3])]
        m.submodules.mem = mem = memory.Memory(shape=unsigned(self._width), depth=self._depth, init=[],
                                               attrs={"no_rw_check": 1})
        wp, rp = mem.write_port(), mem.read_port(domain="sync")
        out = Signal(self._width, reset_less=True)
        m.d.comb += [wp.addr.eq(w_addr), wp.data.eq(w_data), wp.en.eq(w_en), rp.addr.eq(r_addr), rp.en.eq(1)]
        m.d.sync += out.eq(rp.data)
        m.d.comb += self.r_data.eq(out)

    def _elaborate_ecp5(self, m, platform):
        width, shift, _words = bram_mode(self._depth)
        abits = len(self.r_addr)
        tiles = -(-self._width // width)
        # one register copy of each address and enable per block RAM (rtl/fanout.py)
        # two levels of register copies: one per RAM_BRANCHING block RAMs, then one per block
        # RAM (a wide row's block RAMs sit across the device)
        def tree(value, name):
            trunks = register_copies(m, value, -(-tiles // RAM_BRANCHING), f"{name}_trunk", platform,
                                     reset_less=True, distinct=False)
            return [register_copies(m, trunks[i // RAM_BRANCHING], 1, f"{name}{i}", platform,
                                    reset_less=True, distinct=False)[0] for i in range(tiles)]
        r_addrs, w_addrs, w_ens = tree(self.r_addr, "r_addr"), tree(self.w_addr, "w_addr"), tree(self.w_en, "w_en")
        w_data_mid = Signal(tiles * width, name="w_data_mid", reset_less=True)
        w_data = Signal(tiles * width, name="w_data_in", reset_less=True)
        m.d.sync += [w_data_mid.eq(self.w_data), w_data.eq(w_data_mid)]
        r_data = Signal(tiles * width)
        for i in range(tiles):
            def address(addr):
                return {bit: (addr[bit - shift] if shift <= bit < shift + abits else Const(0, 1))
                        for bit in range(14)}
            wa, ra = address(w_addrs[i]), address(r_addrs[i])
            we = w_ens[i]
            din = w_data[i * width:(i + 1) * width]
            dout = r_data[i * width:(i + 1) * width]
            ports = {"i_CLKA": ClockSignal(), "i_CLKB": ClockSignal(),
                     "i_RSTA": 0, "i_RSTB": 0, "i_OCEA": 1, "i_OCEB": 1,
                     "i_CSA0": 0, "i_CSA1": 0, "i_CSA2": 0, "i_CSB0": 0, "i_CSB1": 0, "i_CSB2": 0}
            if width == 36:
                # pseudo dual port: port A writes 36 bits (ADA[3:0] the byte enables, the write
                # gated by the clock enable as Yosys maps it), port B reads them on DOB:DOA
                ports |= {"i_CEA": we, "i_WEA": 1, "i_CEB": 1, "i_WEB": 0}
                for bit in range(14):
                    ports[f"i_ADA{bit}"] = Const(1, 1) if bit < 4 else wa[bit]
                    ports[f"i_ADB{bit}"] = ra[bit]
                for j in range(18):
                    ports[f"i_DIA{j}"] = din[j]
                    ports[f"i_DIB{j}"] = din[18 + j]
                    ports[f"o_DOA{j}"] = dout[j]
                    ports[f"o_DOB{j}"] = dout[18 + j]
            else:
                ports |= {"i_CEA": 1, "i_WEA": we, "i_CEB": 1, "i_WEB": 0}
                for bit in range(14):
                    byte_enable = width == 18 and bit < 2
                    ports[f"i_ADA{bit}"] = Const(1, 1) if byte_enable else wa[bit]
                    ports[f"i_ADB{bit}"] = Const(0, 1) if byte_enable else ra[bit]
                for j in range(18):
                    ports[f"i_DIA{j}"] = din[j] if j < width else Const(0, 1)
                    ports[f"i_DIB{j}"] = 0
                    if j < width:
                        ports[f"o_DOB{j}"] = dout[j]
            m.submodules[f"bram{i}"] = Instance(
                "DP16KD",
                p_DATA_WIDTH_A=width, p_DATA_WIDTH_B=width,
                p_REGMODE_A="OUTREG", p_REGMODE_B="OUTREG",
                p_RESETMODE="SYNC", p_ASYNC_RESET_RELEASE="SYNC",
                p_CSDECODE_A="0b000", p_CSDECODE_B="0b000",
                p_WRITEMODE_A="NORMAL", p_WRITEMODE_B="NORMAL", p_GSR="DISABLED",
                **ports)
        m.d.comb += self.r_data.eq(r_data[:self._width])


def registered_product(m: Module, a, b, name: str, platform) -> Signal:
    """a x b (signed or unsigned operands of at most 17 bits unsigned / 18 signed), two cycles
    later: operands registered, then the product registered."""
    a, b = Value.cast(a), Value.cast(b)
    for what, v in (("a", a), ("b", b)):
        bits = len(v) + (0 if v.shape().signed else 1)
        if bits > DSP_WIDTH:
            raise ValueError(f"operand {what} of {name} has {len(v)} bits ({v.shape()}); "
                             f"a MULT18X18D takes at most {DSP_WIDTH} signed bits")
    width = len(a) + len(b) + (0 if a.shape().signed and b.shape().signed else 1)
    product = Signal(signed(width), name=name)
    if not uses_ecp5(platform):
        a_r = Signal(a.shape(), name=f"{name}_a", reset_less=True)
        b_r = Signal(b.shape(), name=f"{name}_b", reset_less=True)
        p_r = Signal(signed(width), name=f"{name}_p", reset_less=True)
        m.d.sync += [a_r.eq(a), b_r.eq(b), p_r.eq(a_r * b_r)]
        m.d.comb += product.eq(p_r)
        return product
    # both operands as signed 18-bit (an unsigned one of <= 17 bits is zero-extended)
    a18, b18 = Signal(signed(DSP_WIDTH), name=f"{name}_a18"), Signal(signed(DSP_WIDTH), name=f"{name}_b18")
    p36 = Signal(signed(2 * DSP_WIDTH), name=f"{name}_p36")
    m.d.comb += [a18.eq(a), b18.eq(b)]
    ports = {"i_CLK0": ClockSignal(), "i_CE0": 1, "i_RST0": 0,
             "i_SIGNEDA": 1, "i_SIGNEDB": 1, "i_SOURCEA": 0, "i_SOURCEB": 0}
    ports |= {f"i_A{j}": a18[j] for j in range(DSP_WIDTH)}
    ports |= {f"i_B{j}": b18[j] for j in range(DSP_WIDTH)}
    ports |= {f"o_P{j}": p36[j] for j in range(2 * DSP_WIDTH)}
    m.submodules[f"{name}_dsp"] = Instance(
        "MULT18X18D",
        p_REG_INPUTA_CLK="CLK0", p_REG_INPUTB_CLK="CLK0", p_REG_OUTPUT_CLK="CLK0",
        p_REG_PIPELINE_CLK="NONE", p_GSR="DISABLED",
        **ports)
    m.d.comb += product.eq(p36[:width])
    return product
