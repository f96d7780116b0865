"""Argument types and checks shared by the subcommands.

Each `type=` function here checks one value when argparse reads it, so a typo fails in a second
with one line naming the value and what is allowed (exit 2), not after minutes of work. Checks
that need two values or the model's shape run at the top of a command's `run()` and raise
`NdpmoeError` (one line, exit 2). Nothing heavy is imported: `--help` must stay light. It lives
in model/ because the commands of host/, rtl/ and sim/ all use it and model/ is what they share.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from ndpmoe.model.contract import SUPPORTED_BITS, SUPPORTED_GROUPS
from ndpmoe.model.errors import NdpmoeError


def _named(fn, name: str):
    fn.__name__ = name                  # argparse prints it for a failed conversion
    return fn


def _int(text: str) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, not {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None


def _span(lo, hi) -> str:
    if hi is None:
        return f">= {lo}"
    return f"in {lo}..{hi}"


def int_in(lo: int, hi: int | None = None):
    """An integer in [lo, hi] (no upper bound when hi is None)."""
    def parse(text):
        v = _int(text)
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be an integer {_span(lo, hi)}, not {text!r}")
        return v
    return _named(parse, "int")


def int_choice(choices):
    """An integer from `choices`."""
    choices = tuple(choices)

    def parse(text):
        v = _int(text)
        if v not in choices:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(map(str, choices))}, not {text!r}")
        return v
    return _named(parse, "int")


def float_in(lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False):
    """A finite number in the interval from lo to hi (open ends where asked)."""
    def parse(text):
        v = _float(text)
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open or hi == math.inf else ']'}"
            raise argparse.ArgumentTypeError(f"must be a finite number in {span}, not {text!r}")
        return v
    return _named(parse, "float")


def int_list(lo: int | None = None, hi: int | None = None, choices=None):
    """A comma-separated, non-empty list of integers, each in [lo, hi] or from `choices`."""
    def parse(text):
        parts = [p.strip() for p in str(text).split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, not {text!r}")
        out = []
        for p in parts:
            try:
                v = int(p)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected comma-separated integers, not {text!r} "
                                                 f"({p!r} is not an integer)") from None
            if choices is not None and v not in choices:
                raise argparse.ArgumentTypeError(f"each value must be one of {', '.join(map(str, choices))}, "
                                                 f"not {v} (in {text!r})")
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise argparse.ArgumentTypeError(f"each value must be an integer {_span(lo, hi)}, not {v} (in {text!r})")
            out.append(v)
        return tuple(out)
    return _named(parse, "list")


def float_list(lo: float = 0.0, lo_open: bool = True, allow_empty: bool = False):
    """A comma-separated list of finite numbers above (or from) lo; empty only if `allow_empty`."""
    one = float_in(lo, lo_open=lo_open)

    def parse(text):
        parts = [p.strip() for p in str(text).split(",") if p.strip()]
        if not parts and allow_empty:
            return ()
        if not parts:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of numbers, not {text!r}")
        try:
            return tuple(one(p) for p in parts)
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{exc} (in {text!r})") from None
    return _named(parse, "list")


def as_text(parse):
    """The same check, keeping the value as normalized text ("2,3,4") for code that wants a string."""
    return _named(lambda text: ",".join(map(str, parse(text))), "list")


BITS = int_choice(SUPPORTED_BITS)
GROUP = int_choice(SUPPORTED_GROUPS)
BITS_LIST = int_list(choices=SUPPORTED_BITS)


def hi_bits(text: str) -> int:
    """0 (no higher-precision copies) or a supported bit width."""
    v = _int(text)
    if v != 0 and v not in SUPPORTED_BITS:
        raise argparse.ArgumentTypeError(f"must be 0 (none) or one of {', '.join(map(str, SUPPORTED_BITS))}, "
                                         f"not {text!r}")
    return v


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------
def _first_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_parent_chain(p: Path, text: str) -> None:
    anc = _first_existing(p.parent if not p.exists() else p)
    if anc.exists() and not anc.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} lies under {str(anc)!r}, which is a file, not a folder")


def output_dir(text: str) -> Path:
    """A folder to write into: existing, or creatable (nothing in its way is a file)."""
    p = Path(text).expanduser()
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file; a folder is expected here")
    _check_parent_chain(p, text)
    return p


def output_file(text: str) -> Path:
    """A file to write: not a folder, and its folder exists or can be created."""
    p = Path(text).expanduser()
    if p.is_dir() or str(text).endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; a file name is expected here")
    _check_parent_chain(p, text)
    return p


def input_file(text: str) -> Path:
    """An existing, readable file."""
    p = Path(text).expanduser()
    if not p.exists():
        raise argparse.ArgumentTypeError(f"{text!r} does not exist")
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a file")
    if not os.access(p, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text!r} is not readable")
    return p


def _probe(folder: Path, option: str, what: str) -> None:
    from ndpmoe.model.integrity import temp_path

    probe = temp_path(folder / "probe")
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise NdpmoeError(f"{option} {what}: cannot write in {str(folder)!r} ({exc.strerror or exc})") from None


def prepare_output_dir(path: str | os.PathLike | None, option: str) -> Path | None:
    """Create the output folder now and prove it writable, before any work (None: nothing)."""
    if path is None:
        return None
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NdpmoeError(f"{option} {str(p)!r}: a file is in the way of this folder") from None
    except OSError as exc:
        raise NdpmoeError(f"{option} {str(p)!r}: cannot create this folder ({exc.strerror or exc})") from None
    _probe(p, option, repr(str(p)))
    return p


def prepare_output_file(path: str | os.PathLike | None, option: str) -> Path | None:
    """Create the output file's folder now and prove it writable; the file is written at the end."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        raise NdpmoeError(f"{option} {str(p)!r} is a folder; a file name is expected")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise NdpmoeError(f"{option} {str(p)!r}: a file is in the way of its folder") from None
    except OSError as exc:
        raise NdpmoeError(f"{option} {str(p)!r}: cannot create its folder ({exc.strerror or exc})") from None
    if p.exists() and not os.access(p, os.W_OK):
        raise NdpmoeError(f"{option} {str(p)!r} exists and is not writable")
    _probe(p.parent, option, repr(str(p)))
    return p
