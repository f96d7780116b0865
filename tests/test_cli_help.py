"""`ndpmoe --help` and every subcommand's --help print without importing torch or amaranth."""
import subprocess
import sys

import pytest

from ndpmoe.host.cli import SUBCOMMANDS

PROBE = """
import sys
from ndpmoe.host.cli import main
try:
    main({argv!r})
except SystemExit as exc:
    assert exc.code == 0, exc.code
heavy = sorted(m for m in ("torch", "amaranth", "cocotb", "transformers") if m in sys.modules)
print("HEAVY", ",".join(heavy))
"""


@pytest.mark.parametrize("argv", [["--help"]] + [[name, "--help"] for name in SUBCOMMANDS])
def test_help_imports_nothing_heavy(argv):
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True, check=True)
    assert "usage: ndpmoe" in out.stdout
    heavy = out.stdout.rsplit("HEAVY", 1)[1].strip()
    assert heavy == "", f"`ndpmoe {' '.join(argv)}` imported {heavy}"
