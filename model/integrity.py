"""Integrity of what the project writes and reads back: content hashes, sealed files, atomic
writes and the cleanup of temporary files a killed writer left.

- A *sealed* file is a safetensors file whose header carries its kind, its metadata (JSON) and a
  SHA-256 over the kind, the metadata and every tensor (name, dtype, shape, bytes). A reader
  recomputes the hash and compares the metadata with what it expects, so a flipped byte, an edited
  field or a truncated file is refused (`CacheEntryError` naming the file), never used.
- Writes go to a temporary beside the final path and are renamed over it: a reader sees the old
  file or the new one. Temporaries are named `.<final>.ndpmoe-tmp-<host>-<pid>-<random>`, removed
  when the writer fails, and `clean_stale_temps` removes those whose writer is gone (same host,
  process no longer running) or that are older than any write takes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path

from .errors import CacheEntryError

TEMP_TAG = ".ndpmoe-tmp-"
STALE_AGE_S = 12 * 3600          # no single write of a cache entry takes this long
_TEMP_RE = re.compile(re.escape(TEMP_TAG) + r"(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]+$")
# One header entry holds kind, metadata and seal: safetensors writes several entries in an order
# that changes from run to run, one entry gives the same bytes for the same content.
HEADER_KEY = "ndpmoe"


def notice(message: str) -> None:
    """One line on stderr about what the project did on its own (a rebuild, a skipped store)."""
    print(f"ndpmoe: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Hashes
# ---------------------------------------------------------------------------------------------
def canonical_json(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def tensor_hash(h, *tensors) -> None:
    """Feed dtype, shape and bytes of each tensor (None allowed) into the hash object `h`."""
    import torch

    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        flat = t.new_empty(t.numel()).copy_(t.reshape(-1))      # packed, whatever the view's strides
        h.update(flat.view(torch.uint8).numpy())


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def content_hash(kind: str, meta: dict, tensors: dict) -> str:
    h = hashlib.sha256(kind.encode() + b"\0" + canonical_json(meta))
    for name in sorted(tensors):
        h.update(name.encode() + b"\0")
        tensor_hash(h, tensors[name])
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Temporary files
# ---------------------------------------------------------------------------------------------
def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temp_path(final: str | os.PathLike) -> Path:
    """A fresh temporary name beside `final` that `clean_stale_temps` recognizes."""
    final = Path(final)
    return final.parent / f".{final.name}{TEMP_TAG}{_host_tag()}-{os.getpid()}-{secrets.token_hex(3)}"


def _remove(path: Path) -> None:
    """A file, a link (not what it points to) or a folder with its contents."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike):
    """Yield a temporary path to write (a file or a folder); on success it is renamed to `final`
    (replacing a file; a folder replaces only a missing one), on any failure it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    try:
        yield tmp
        if tmp.is_dir() and (final.is_dir() or final.is_symlink()):
            _remove(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


def _writer_gone(host: str, pid: int) -> bool:
    if host != _host_tag():
        return False                  # another machine's writer: only its age tells
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:           # alive, another user's
        return False
    return False


def clean_stale_temps(folder: str | os.PathLike, max_age_s: float = STALE_AGE_S) -> list[Path]:
    """Remove the temporaries in `folder` whose writer is gone or that are older than
    `max_age_s`; returns what was removed. Other files are never touched."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return removed
    now = time.time()
    for p in entries:
        m = _TEMP_RE.search(p.name)
        if m is None:
            continue
        try:
            age = now - p.lstat().st_mtime
        except FileNotFoundError:
            continue
        if _writer_gone(m["host"], int(m["pid"])) or age > max_age_s:
            try:
                _remove(p)
                removed.append(p)
            except OSError:
                pass                  # a read-only cache: nothing to do about it here
    return removed


def writable_folder(folder: str | os.PathLike) -> bool:
    """Whether files can be created in `folder` (created if missing): tried, not guessed, so a
    read-only mount or a full disk answers honestly even for root."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = temp_path(folder / "probe")
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Sealed safetensors files
# ---------------------------------------------------------------------------------------------
def write_sealed(path: str | os.PathLike, tensors: dict, kind: str, meta: dict) -> None:
    """Write `tensors` with `meta` (JSON-able) and their content hash, atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    header = {"kind": kind, "meta": meta, "sha256": content_hash(kind, meta, tensors)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={HEADER_KEY: canonical_json(header).decode()})


def read_sealed(path: str | os.PathLike, kind: str, expect: dict | None = None) -> tuple[dict, dict]:
    """(tensors, meta) of a sealed file, after checking its kind, its content hash and that every
    `expect` key of its metadata has the expected value; CacheEntryError otherwise."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CacheEntryError(f"{path}: unreadable, truncated or not a safetensors file "
                              f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    try:
        sealed = json.loads(header[HEADER_KEY])
        meta, seal = sealed["meta"], sealed["sha256"]
        if sealed["kind"] != kind:
            raise CacheEntryError(f"{path}: holds a {sealed['kind']!r}, not a {kind!r}")
    except (KeyError, TypeError, json.JSONDecodeError):
        raise CacheEntryError(f"{path}: not a sealed {kind!r} file (no readable seal: written by another "
                              f"version or another program, or its header was damaged)") from None
    digest = content_hash(kind, meta, tensors)
    if digest != seal:
        raise CacheEntryError(f"{path}: corrupted: its content hash {digest[:16]}... differs from its seal "
                              f"{str(seal)[:16]}...")
    for key, want in (expect or {}).items():
        if meta.get(key) != want:
            raise CacheEntryError(f"{path}: holds {key} = {meta.get(key)!r}, expected {want!r}")
    return tensors, meta


def check_shapes(path: str | os.PathLike, tensors: dict, expected: dict) -> None:
    """Every name in `expected` present in `tensors` with that shape; CacheEntryError otherwise."""
    for name, shape in expected.items():
        t = tensors.get(name)
        if t is None:
            raise CacheEntryError(f"{path}: tensor {name!r} is missing")
        if tuple(t.shape) != tuple(shape):
            raise CacheEntryError(f"{path}: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")


def code_digest(files: tuple[str, ...]) -> str:
    """16 hex digits of SHA-256 over the project's source files `files` (paths like
    'model/quantize.py', relative to the package root), so a cache keyed by it goes stale on an edit."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for rel in files:
        h.update((root / rel).read_bytes())
    return h.hexdigest()[:16]
