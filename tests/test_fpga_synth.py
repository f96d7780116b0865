"""FPGA flow: the pin wrapper, names and numbers without tools, and one real Yosys + nextpnr run
of the smallest configuration (marked slow; under 3 minutes with the YoWASP first-call compile).
"""
from __future__ import annotations

import argparse
import re

import pytest
from amaranth.back import verilog
from amaranth.hdl import Fragment, Module, Value
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ndpmoe.model.contract import get_config
from ndpmoe.rtl.synth import constraints, flow
from ndpmoe.rtl.synth.design import TOP_NAME, ndp_unit, write_wrapped_verilog
from ndpmoe.rtl.synth.report import read_failing_endpoints
from ndpmoe.rtl.synth.cmd_synth import TMG_RIPUP_DEFAULT, add_arguments, parse_seeds
from ndpmoe.rtl.synth.run import SOURCE_ROOT, check_freq, run_seeds, run_synth, verilog_identity
from ndpmoe.rtl.synth.sweep import SweepAxes, derive, markdown_table, parse_bits_sets, sweep_points
from ndpmoe.rtl.synth.targets import TARGETS, get_target
from ndpmoe.rtl.synth.throughput import macs_per_cycle, throughput
from ndpmoe.rtl.synth.wrapper import PinWrapper, split_ports


class _Adder(wiring.Component):
    def __init__(self):
        super().__init__({"a": In(8), "b": In(8), "s": Out(9), "odd": Out(1)})

    def elaborate(self, platform):
        m = Module()
        m.d.sync += self.s.eq(self.a + self.b)
        m.d.comb += self.odd.eq(self.s[0])
        return m


def _module_ports(text: str, name: str) -> set[str]:
    header = re.search(rf"module \\?{re.escape(name)}\s*\(([^)]*)\)", text)
    return {p.strip().lstrip("\\") for p in header.group(1).split(",")}


def test_wrapper_puts_every_port_behind_four_pins():
    top = PinWrapper(_Adder())
    assert (top.input_bits, top.output_bits) == (16, 10)
    text = verilog.convert(top, name=TOP_NAME)
    assert _module_ports(text, TOP_NAME) == {"clk", "rst", "si", "so"}


def test_wrapper_covers_all_ports_of_the_ndp_unit():
    unit = ndp_unit(get_config("small"))
    widths = {wiring.In: 0, wiring.Out: 0}
    for _path, member, value in unit.signature.flatten(unit):
        widths[member.flow] += len(Value.cast(value))
    top = PinWrapper(unit)
    assert (top.input_bits, top.output_bits) == (widths[wiring.In], widths[wiring.Out])
    assert top.input_bits > 100 and top.output_bits > 100     # descriptor, memory word, results
    Fragment.get(top, None)                                   # and it elaborates around the unit


def test_wrapper_rejects_what_it_cannot_wrap():
    with pytest.raises(TypeError, match="wiring.Component"):
        split_ports(object())


def test_names_and_values_are_checked():
    with pytest.raises(ValueError, match="unknown FPGA target 'ecp5-45k'"):
        get_target("ecp5-45k")
    with pytest.raises(ValueError, match="unknown NDP configuration 'tiny'"):
        run_synth("tiny", "ecp5-85k")
    with pytest.raises(ValueError, match=r"speed grade of 'ecp5-85k' must be one of \(6, 7, 8\), not 9"):
        get_target("ecp5-85k").check_speed(9)
    with pytest.raises(ValueError, match="'ice40-hx8k' has no speed grade"):
        get_target("ice40-hx8k").check_speed(6)
    with pytest.raises(ValueError, match="not -5"):
        check_freq(-5)
    with pytest.raises(ValueError, match="needs a target with DSP blocks, not 'ice40-hx8k'"):
        flow.dsp_premap(get_target("ice40-hx8k"), 9)
    assert "ice40_dsp" in flow.dsp_premap(get_target("ice40-up5k"), 9)
    with pytest.raises(ValueError, match=r"\[2, 18\], not 40"):
        flow.dsp_premap(get_target("ecp5-85k"), 40)
    assert get_target("ecp5-85k").check_speed(None) == 6      # nextpnr's default, the slowest


def test_throughput_follows_the_contract_sizes():
    cfg = get_config("default")                  # P = 128
    tp = throughput(cfg, 150.0)
    assert tp.peak_gbps == pytest.approx(2.4) and tp.sustained_gbps == pytest.approx(2.4)
    assert tp.full_buffer_gbps == pytest.approx(2.4 / cfg.passes(cfg.t_max), abs=1e-3)
    # 2-bit, G = 64, 4096 inputs: 64 codes per word, one metadata word per 4 groups -> 80 words a row
    per_token = 4096 / 80
    assert macs_per_cycle(cfg, 2) == pytest.approx(per_token * cfg.tokens_parallel)
    assert tp.gmacs[2] == pytest.approx(per_token * cfg.tokens_parallel * 0.15, abs=0.01)
    assert throughput(cfg, 150.0, words_per_cycle=0.5).sustained_gbps == pytest.approx(1.2)
    with pytest.raises(ValueError, match="not 1.5"):
        throughput(cfg, 150.0, words_per_cycle=1.5)


def test_sweep_points_vary_one_axis_at_a_time():
    base = get_config("default")
    points = sweep_points(base, SweepAxes())
    names = [p.name for p in points]
    tp = f"tp{base.tokens_parallel}"
    assert names[0] == f"p128-b2348-t8-{tp}" and len(names) == len(set(names)) == 7
    assert {f"p64-b2348-t8-{tp}", f"p256-b2348-t8-{tp}", f"p128-b48-t8-{tp}", f"p128-b2348-t32-{tp}"} <= set(names)
    assert all(p.max_in_features % p.word_bits == 0 for p in points)
    grid = sweep_points(base, SweepAxes(word_bits=(64, 128), bits=((4, 8),), t_max=(2,),
                                        tokens_parallel=(1, 4)), grid=True)
    assert [p.name for p in grid] == ["p64-b48-t2-tp1", "p128-b48-t2-tp1"]    # tp 4 > t_max 2 is skipped
    assert parse_bits_sets("2348,48") == ((2, 3, 4, 8), (4, 8))
    with pytest.raises(ValueError, match="'25'"):
        parse_bits_sets("25")
    assert markdown_table([]).count("\n") == 1


def test_constraint_templates_name_the_clock():
    assert "create_clock -name clk -period 6.667 [get_ports clk]" in constraints.xdc(150)
    assert "create_clock -name clk -period 10.000" in constraints.sdc(100)
    assert 'FREQUENCY PORT "clk" 150 MHZ;' in constraints.lpf(150)
    assert "set_frequency clk 48" in constraints.pcf(48)


# The CI check: the whole flow on the smallest unit. "small" itself (about 6k LUTs and 6k FFs)
# needs 2-5 minutes of nextpnr on 2 cores, too long next to YoWASP's first-call compile, so the
# check builds the same RTL with one bit width (8, so 8 lanes), one token and 256 inputs: every
# block of the unit (descriptor check, reader, buffer, sequencer, unpacker, lanes, group and
# scale stages, output, registers) is still there, about 2.5k LUTs. ECP5-25k: the smallest
# device it fits with room, and with default DSP mapping nextpnr-ecp5 places it in ~1 CPU-minute.
CI_CONFIG = derive(get_config("small"), bits=(8,), t_max=1, max_in_features=256)
CI_TARGET, CI_FREQ_MHZ = "ecp5-25k", 50.0


@pytest.mark.slow
def test_smallest_configuration_fits_and_meets_a_modest_clock(tmp_path):
    r = run_synth(CI_CONFIG, CI_TARGET, freq_mhz=CI_FREQ_MHZ, build=tmp_path)
    assert r.error is None and r.fits, r.error
    assert r.fmax_mhz >= CI_FREQ_MHZ, r.critical_path.describe()
    assert r.luts > 1000 and r.ffs > 1000 and r.dsps > 0     # the unit, not an optimized-away shell
    assert r.critical_path.delay_ns > 0 and r.critical_path.start and r.critical_path.end
    assert r.utilization[get_target(CI_TARGET).lut_bel]["available"] == 24288
    # the primitives the ECP5 flow instantiates made it through Yosys and nextpnr
    assert r.extra["primitives"] == "ecp5" and r.brams > 0
    # nothing arrives later than the clock the design met, and the worst arrival is the critical path's
    assert r.extra["failing"]["endpoints"] == 0
    slow = read_failing_endpoints(tmp_path, 1000 / (r.critical_path.delay_ns - 0.5))
    assert slow["endpoints"] > 0 and abs(slow["worst"][0]["arrival_ns"] - r.critical_path.delay_ns) < 0.05


def test_failing_endpoints_count_clocked_register_inputs_only(tmp_path):
    clk = "posedge $glbnet$clk"
    nets = [
        {"net": "a", "event": clk, "endpoints": [
            {"cell": "design.acc_TRELLIS_FF_Q_3", "port": "DI", "event": clk, "delay": [1.0, 7.5]},
            {"cell": "design.acc_TRELLIS_FF_Q_4", "port": "DI", "event": clk, "delay": [1.0, 7.0]},
            {"cell": "design.flag_TRELLIS_FF_Q", "port": "CE", "event": clk, "delay": [1.0, 6.0]},
            {"cell": "design.reg_TRELLIS_FF_Q", "port": "LSR", "event": clk, "delay": [1.0, 9.0]}]},
        {"net": "rst", "event": "<async>", "endpoints": [
            {"cell": "design.x_TRELLIS_FF_Q", "port": "DI", "event": clk, "delay": [1.0, 12.0]}]},
    ]
    (tmp_path / "report.json").write_text(__import__("json").dumps({"detailed_net_timings": nets}))
    r = read_failing_endpoints(tmp_path, 150.0)
    assert (r["endpoints"], r["signals"]) == (2, 1)
    assert r["worst"] == [{"signal": "design.acc", "endpoints": 2, "arrival_ns": 7.5}]
    assert read_failing_endpoints(tmp_path, 100.0)["endpoints"] == 0
    assert read_failing_endpoints(tmp_path / "missing", 100.0) is None


def test_seeds_option_parses_ranges_and_lists():
    assert parse_seeds("1-5") == [1, 2, 3, 4, 5]
    assert parse_seeds("1,3,7") == [1, 3, 7]
    for bad in ("5-1", "1,1", "a", "-3", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="seeds must be"):
            parse_seeds(bad)
    with pytest.raises(ValueError, match="seeds must be a non-empty list"):
        run_seeds("small", "ecp5-25k", [])


def test_timing_driven_ripup_reaches_the_nextpnr_command_line():
    target = get_target("ecp5-85k")
    plain = flow.nextpnr_args(target, 150.0, 6, seed=3)
    ripup = flow.nextpnr_args(target, 150.0, 6, seed=3, tmg_ripup=True)
    assert "--tmg-ripup" not in plain and ripup.count("--tmg-ripup") == 1
    assert [a for a in ripup if a != "--tmg-ripup"] == plain      # nothing else changes
    assert plain[plain.index("--seed") + 1] == "3" and plain[plain.index("--router") + 1] == "router2"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).tmg_ripup is TMG_RIPUP_DEFAULT
    assert parser.parse_args(["--tmg-ripup"]).tmg_ripup is True
    assert parser.parse_args(["--no-tmg-ripup"]).tmg_ripup is False


def test_another_seed_places_only_the_netlist_of_the_same_verilog(tmp_path):
    """run_seeds places the first seed's netlist again; a folder holding another design's netlist
    is refused before any tool runs."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "top.v").write_text("module top(); endmodule\n")
    with pytest.raises(ValueError, match="netlist of other Verilog"):
        run_synth(CI_CONFIG, CI_TARGET, freq_mhz=CI_FREQ_MHZ, build=tmp_path / "run", netlist_from=other)


def test_the_same_rtl_in_another_checkout_is_the_same_verilog(tmp_path):
    """The reuse key and the netlist check see past the absolute source paths Amaranth writes into
    `src` attributes, and nothing else."""
    here = tmp_path / "here.v"
    write_wrapped_verilog(CI_CONFIG, here)
    text = here.read_text()
    assert str(SOURCE_ROOT) in text
    other_root = "/somewhere/else/ndpmoe"
    elsewhere = tmp_path / "elsewhere.v"
    elsewhere.write_text(text.replace(str(SOURCE_ROOT), other_root))
    assert elsewhere.read_bytes() != here.read_bytes()
    assert verilog_identity(elsewhere, other_root) == verilog_identity(here)
    changed = tmp_path / "changed.v"
    changed.write_text(text.replace("endmodule", "endmodule\n// another design", 1))
    assert verilog_identity(changed) != verilog_identity(here)


def _adder_design(cfg):
    return _Adder()


def test_seeds_side_by_side_place_the_first_seeds_netlist(tmp_path):
    """run_seeds with workers: Yosys once (the first seed, here), the other seeds as Ray tasks on
    that netlist, each in its own folder at its own seed; nextpnr gives each seed the result it
    gives that seed placed on its own."""
    import sys

    import ray.cloudpickle
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])    # the factory lives in this test
    options = dict(freq_mhz=CI_FREQ_MHZ, factory=_adder_design)
    results = run_seeds(CI_CONFIG, CI_TARGET, [4, 2, 9], build=tmp_path / "seeds", workers=2, **options)
    assert [r.error for r in results] == [None] * 3 and all(r.fits for r in results)
    first = tmp_path / "seeds" / "seed4"
    assert [r.extra["build"] for r in results] == [str(tmp_path / "seeds" / f"seed{s}") for s in (4, 2, 9)]
    assert "netlist from" not in " ".join(results[0].extra["notes"])
    for seed, r in zip((2, 9), results[1:]):
        assert r.extra["notes"] == [f"netlist from {first}"] and "yosys" not in r.seconds
        # the folder holds that seed's run: its reuse key (which names the seed) matches
        stored = run_synth(CI_CONFIG, CI_TARGET, seed=seed, build=tmp_path / "seeds" / f"seed{seed}", reuse=True,
                           **options)
        assert stored.seconds == r.seconds and stored.extra["key"] == r.extra["key"]
    alone = run_synth(CI_CONFIG, CI_TARGET, seed=9, build=tmp_path / "alone", netlist_from=first, **options)
    assert alone.fmax_mhz == results[2].fmax_mhz and alone.critical_path == results[2].critical_path
    with pytest.raises(ValueError, match="seeds must be distinct"):
        run_seeds(CI_CONFIG, CI_TARGET, [1, 1], build=tmp_path / "twice", **options)
    with pytest.raises(ValueError, match="--workers must be a positive integer, not -1"):
        run_seeds(CI_CONFIG, CI_TARGET, [1, 2], build=tmp_path / "bad", workers=-1, **options)
    assert not (tmp_path / "twice").exists() and not (tmp_path / "bad").exists()


def test_synth_workers_are_checked_before_work(tmp_path, capsys):
    from ndpmoe.host.cli import main

    out = tmp_path / "synth"
    assert main(["synth", "--workers", "2", "--out", str(out)]) == 2
    assert "--workers / --ray-address spread the seeds of --seeds" in capsys.readouterr().err
    assert main(["synth", "--seeds", "1-2", "--ray-address", "127.0.0.1:9", "--out", str(out)]) == 2
    assert "Ray address '127.0.0.1:9' does not answer" in capsys.readouterr().err
    assert main(["synth", "--seeds", "1-2", "--workers", "0", "--ray-address", "nonsense", "--out", str(out)]) == 2
    assert "is not HOST:PORT" in capsys.readouterr().err
    assert not out.exists()
