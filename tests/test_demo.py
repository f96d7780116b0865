"""`ndpmoe demo --quick`: all six parts run, the report holds them, the bit-exact check passed."""
import json

from ndpmoe.host.demo import DemoOptions, run_demo


def test_quick_demo_report(tmp_path):
    report = run_demo(DemoOptions(out=tmp_path, quick=True), log=lambda s: None)
    text = report.path.read_text()
    steps = json.loads((tmp_path / "report.json").read_text())["steps"]
    assert [s["ok"] for s in steps] == [True] * 6, [(s["title"], s["ok"]) for s in steps]
    assert report.ok
    for part in ("Default MoE model", "Accuracy against bandwidth", "Co-simulation of one MoE layer",
                 "Throughput model", "FPGA", "Whole-model generation"):
        assert part in text
    assert "Bit-exact check: passed" in text and "RTL check: passed" in text
    assert (tmp_path / "accuracy" / "pareto.png").stat().st_size > 10_000
    for png in ("throughput.png", "fpga.png"):
        assert (tmp_path / png).stat().st_size > 10_000 and f"]({png})" in text
    cosim = next(s for s in steps if s["title"].startswith("Co-simulation"))["data"]
    assert all(run["ndp"]["max_abs_diff"] == 0 for run in cosim["runs"].values())
