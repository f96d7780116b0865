"""Verilog of every named configuration, lint-clean under Verilator with the written-down waivers."""
import pytest

from ndpmoe.model.contract import CONFIGS, NdpConfig
from ndpmoe.rtl.export import LINT_WAIVERS, UNIT_TOP, lint, write_unit
from ndpmoe.rtl.geometry import Geometry
from ndpmoe.rtl.verilator_env import have_verilator

HAVE_VERILATOR = have_verilator()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_verilog_lints_clean(name, tmp_path):
    path = write_unit(name, tmp_path)
    text = path.read_text()
    assert f"module {UNIT_TOP}(" in text
    if not HAVE_VERILATOR:
        pytest.skip("no Verilator")
    status, messages = lint(path)
    assert status == 0 and not messages, messages
    assert set(LINT_WAIVERS) == {"WIDTHEXPAND", "WIDTHTRUNC", "CASEINCOMPLETE"}


def test_bad_parameters_are_refused():
    with pytest.raises(TypeError, match="cfg must be an NdpConfig"):
        Geometry("default")
    with pytest.raises(ValueError, match="tokens_parallel must be an integer in"):
        NdpConfig("x", t_max=2, tokens_parallel=3)
