"""`ndpmoe bench`, the performance model and the bad-input errors it promises."""
import json
import re

import pytest

from ndpmoe.host.bench import ROWS, BenchOptions, run_bench
from ndpmoe.host.cli import main
from ndpmoe.host.cmd_bench import ALL_ROWS, add_arguments, format_bench, options_from_args
from ndpmoe.host.models import get_model
from ndpmoe.host.ndp_cost import RTL_TARGET, NdpCostModel, fit_ndp_cost, relative_error
from ndpmoe.host.presets import get_system
from ndpmoe.host.sizes import ExpertSizes
from ndpmoe.model.contract import QuantFormat, get_config

FAST = ["--trace", "synthetic", "--tokens", "8"]


def test_bench_table(capsys, tmp_path):
    out_json = tmp_path / "bench.json"
    rc = main(["bench", "--model", "olmoe-1b-7b", "--system", "gpu-ndp", "--cache-gb", "0.2", "--topn", "1,4",
               "--json", str(out_json)] + FAST)
    text = capsys.readouterr().out
    assert rc == 0
    for label in ("fp16 + LRU", "uniform int3", "hobbit int4", "ours top-1 r32", "ours top-4 r32",
                  "(= top-4 bytes)", "trace: SYNTHETIC", "NDP cycles: fit to the co-simulated RTL", "planning cost"):
        assert label in text, label
    rows = json.loads(out_json.read_text())["rows"]
    # fp16, uniform, top-1, top-4, adaptive at the bytes of each, HOBBIT at top-1's bytes
    assert len(rows) == 7 and all(r["tokens_per_s"] > 0 for r in rows)
    by = {r["label"]: r for r in rows}
    # Restoration adds bytes: Top-4 moves more over the link than uniform low-bit.
    assert by["ours top-4 r32"]["total_link_bytes_per_token"] > by["uniform int3"]["total_link_bytes_per_token"]
    # The equal-bytes rows land near the bytes of the row they name (one rescaling step).
    uni, top1 = by["uniform int3"]["moved_bytes_per_token"], by["ours top-1 r32"]["moved_bytes_per_token"]
    hob = next(r for r in rows if r["label"].startswith("hobbit"))["moved_bytes_per_token"]
    assert abs((hob - uni) - (top1 - uni)) <= 0.5 * (top1 - uni)


def _without_planning_times(line: str) -> str:
    """A printed line without the measured planning times and the tokens/s that include them
    (they differ from run to run)."""
    if line.startswith("planning cost"):
        return re.sub(r"\d+\.\d+", "#", line)
    return re.sub(r"(\s+\d+\.\d+){3}$", "", line)


def test_bench_library_rows_are_what_the_command_prints(capsys, tmp_path):
    """`ndpmoe bench` prints the library's rows: the same figures from run_bench as in the
    command's JSON (all but the measured planning time), laid out by format_bench as printed."""
    out_json = tmp_path / "bench.json"
    argv = ["--model", "olmoe-1b-7b", "--system", "gpu-ndp", "--cache-gb", "0.2", "--topn", "2",
            "--policy", "uniform,topn,hobbit"] + FAST
    assert main(["bench", *argv, "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out.splitlines()
    options = options_from_args(_parse(argv))
    assert options == BenchOptions(model="olmoe-1b-7b", system="gpu-ndp", cache_gb=0.2, topn=(2,),
                                   rows=("uniform", "topn", "hobbit"), trace="synthetic", tokens=8)
    result = run_bench(options, log=lambda s: None)
    labels = [r.label for r in result.rows]
    assert labels[:2] == ["uniform int3", "ours top-2 r32"] and labels[2].startswith("hobbit int4 top-1, ")
    cli_rows = json.loads(out_json.read_text())["rows"]
    for row, cli in zip(result.rows, cli_rows, strict=True):
        lib = row.to_json()
        measured = ("planning_us_per_token_per_layer", "planning_total_us_per_token_per_layer", "planning_time_s",
                    "tokens_per_s")
        lib_measured = [lib.pop(k) for k in measured]
        cli_measured = [cli.pop(k) for k in measured]
        assert lib == cli
        for figures, row_json in ((lib_measured, lib), (cli_measured, cli)):
            exposed_us, total_us, planning_s, tps = figures
            # tokens/s counts the exposed planning: the median step's, every step
            assert 0 < exposed_us <= total_us * (1 + 1e-9)
            assert planning_s == pytest.approx(exposed_us * 1e-6 * row_json["layers"])
            assert tps == pytest.approx(row_json["tokens"] / (row_json["modeled_time_s"] + planning_s))
    assert list(map(_without_planning_times, format_bench(result).splitlines())) == \
        list(map(_without_planning_times, printed))


def _parse(argv):
    import argparse
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_bench_command_defaults_are_the_library_defaults():
    assert options_from_args(_parse([])) == BenchOptions()
    assert ALL_ROWS.split(",") == list(ROWS)


@pytest.mark.parametrize("argv, message", [
    (["--model", "gpt-moe"], "unknown model 'gpt-moe'"),
    (["--system", "tpu"], "unknown system preset 'tpu'"),
    (["--link", "nvlink"], "unknown link preset 'nvlink'"),
    (["--system", "gpu-only", "--ndp", "cxl-ndp"], "has no NDP unit"),
    (["--cache-gb", "0.01"], "--cache-gb 0.01 .* smaller than one int3-g64-p128 expert"),
    (["--topn", "2"], r"--topn 2: n must be in \[1, k\) = \[1, 2\)"),
    (["--cache-policy", "fifo"], "unknown --cache-policy 'fifo'"),
    (["--policy", "magic"], "unknown --policy row 'magic'"),
])
def test_bench_bad_input(capsys, argv, message):
    rc = main(["bench"] + FAST + argv)
    err = capsys.readouterr().err
    assert rc == 2 and re.search(message, err), err


def test_ndp_cost_fit_recovers_coefficients():
    truth = NdpCostModel(cycles_per_word=1.25, overhead_cycles=40.0, source="truth")
    samples = [(w, p, truth.descriptor_cycles(w, p)) for w in (16, 256, 4096) for p in (1, 2)]
    fit = fit_ndp_cost(samples)
    assert abs(fit.cycles_per_word - 1.25) < 1e-9 and abs(fit.overhead_cycles - 40) < 1e-6
    assert relative_error(fit, samples) < 1e-9 and fit.measured and not RTL_TARGET.measured
    with pytest.raises(ValueError, match="at least two"):
        fit_ndp_cost([(16, 1, 80.0)])


def test_perf_model_orders_systems():
    """Sanity of the model on Mixtral shapes: a cold expert costs link time on GPU-only and NDP
    time on GPU-NDP, where the bandwidth-matched units stream it faster than the link."""
    from ndpmoe.host.perf_model import layer_time, task_usage
    spec = get_model("mixtral-8x7b")
    only, ndp = get_system("gpu-only"), get_system("gpu-ndp")
    wide = get_config("wide")
    sizes = ExpertSizes(spec.hidden, spec.intermediate, QuantFormat(3, 64, 256), None, 32, wide)
    fetch = layer_time(task_usage(sizes, only, "lo", 1, "gpu", None, 0, True, 0), only)
    near = layer_time(task_usage(sizes, ndp, "lo", 1, "ndp", None, 0, False, 0), ndp)
    assert fetch.link_s == pytest.approx(sizes.weight_bytes("lo") / 25e9)
    assert near.ndp_s < fetch.link_s and near.link_s < fetch.link_s / 100
    # 8 units x 32-byte words x 600 MHz = 153.6 GB/s at one word per cycle, divided by the cycles
    # per word the RTL was measured at, which keeps it within 1 % of that
    assert ndp.ndp.peak_gbps == pytest.approx(153.6 / ndp.ndp.cost.cycles_per_word, rel=1e-9)
    assert 0.99 * 153.6 < ndp.ndp.peak_gbps <= 153.6
