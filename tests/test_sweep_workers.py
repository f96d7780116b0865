"""`ndpmoe fpga-sweep --workers N / --ray-address`: checked before any point runs."""
from ndpmoe.host.cli import main

SMALL = ["fpga-sweep", "--base", "small", "--target", "ecp5-25k", "--word-bits", "64", "--bits", "8",
         "--t-max", "1,2", "--freq", "50"]


def test_bad_workers_or_address_are_refused_before_work(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(SMALL + ["--out", str(out), "--ray-address", "127.0.0.1:9"]) == 2
    assert "Ray address '127.0.0.1:9' does not answer" in capsys.readouterr().err
    assert main(SMALL + ["--out", str(out), "--workers", "-2"]) == 2
    assert "--workers must be a positive integer, not -2" in capsys.readouterr().err
    assert not out.exists()
