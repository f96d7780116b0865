"""Fault injection: nothing silently wrong, nothing lost to a typo.

- Every cached or stored artefact (study-cache entries, the default model, its fp32 SmolLM2 source,
  expert stores) is damaged three ways (one byte of its data, one field of its metadata, its
  length) and read again: the reader rebuilds it (one line says so) or refuses it naming the
  file; the damaged bytes are never used. A rebuilt artefact equals the one first built.
- A writer killed by SIGKILL mid-write leaves a temporary that the next start removes, and the
  rerun writes exactly what an undisturbed writer writes.
- Every bad argument stops its command with one line naming the value (exit 2) before any
  expensive step: tripwires on the calibration, the model loads, the trace recording, the
  simulations and the benchmarks fail the test if one is reached.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ndpmoe.host.store import MANIFEST, TENSORS, StoreError, open_store
from ndpmoe.host.study_cache import KIND as STUDY_KIND
from ndpmoe.host.study_cache import StudyCache
from ndpmoe.model import smollm
from ndpmoe.model.contract import QuantFormat
from ndpmoe.model.default_moe import KIND as DEFAULT_KIND
from ndpmoe.model.default_moe import expected_shapes, load_blocks, load_default_moe, save_blocks
from ndpmoe.model.errors import CacheEntryError, NdpmoeError
from ndpmoe.model.integrity import HEADER_KEY, TEMP_TAG, read_sealed, write_sealed
from ndpmoe.model.moe import MoEWeights, RouterConfig
from ndpmoe.model.moe_quant import MATRICES
from ndpmoe.model.moefy import MoEfyConfig
from ndpmoe.model.quantize import quantize_rtn
from ndpmoe.model.text import file_text

from host_block import make_store

pytestmark = pytest.mark.usefixtures("one_thread")     # tests/conftest.py
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# The three faults, on any safetensors file
# ---------------------------------------------------------------------------------------------
def _header_len(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def flip_data_byte(path: Path) -> None:
    """One byte in the middle of the tensor data (the header untouched)."""
    data = bytearray(path.read_bytes())
    start = _header_len(path)
    data[(start + len(data)) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def edit_metadata(path: Path, edit) -> None:
    """The same tensors, one field of the JSON metadata changed by `edit(meta)`; the seal kept."""
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()[HEADER_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(header["meta"])
    save_file(tensors, str(path), metadata={HEADER_KEY: json.dumps(header)})


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 5])


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if TEMP_TAG in p.name]


# ---------------------------------------------------------------------------------------------
# Study-cache entries: recomputed and rewritten
# ---------------------------------------------------------------------------------------------
FMT = QuantFormat(3, 64, 64)


def _quantized(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = {"w1": (64, 128), "w3": (64, 128), "w2": (128, 64)}
    return [{m: quantize_rtn(torch.randn(*shape[m], generator=g), FMT) for m in MATRICES} for _ in range(2)]


def _same_quantized(a, b) -> None:
    for ea, eb in zip(a, b, strict=True):
        for m in MATRICES:
            assert torch.equal(ea[m].codes, eb[m].codes) and torch.equal(ea[m].scale, eb[m].scale)
            assert torch.equal(ea[m].zero, eb[m].zero) and ea[m].scale_exp == eb[m].scale_exp


def _never():
    raise AssertionError("a whole cache entry was recomputed")


STUDY_FAULTS = {
    "data byte": flip_data_byte,
    "metadata field": lambda p: edit_metadata(p, lambda m: m["format"].update(bits=2)),
    "truncated": truncate,
}


@pytest.mark.parametrize("fault", STUDY_FAULTS)
def test_damaged_study_entry_is_recomputed_never_used(tmp_path, capfd, fault):
    made = StudyCache(tmp_path, "ctx")
    key = made.key(0, "q")
    first = made.quantized(key, FMT, _quantized)
    STUDY_FAULTS[fault](made.path(key))

    calls = []
    again = StudyCache(tmp_path, "ctx")
    got = again.quantized(key, FMT, lambda: calls.append(1) or _quantized())
    assert calls == [1] and (again.hits, again.rebuilt) == (0, 1)
    _same_quantized(got, first)
    err = capfd.readouterr().err
    assert "recomputing" in err and made.path(key).name in err and len(err.strip().splitlines()) == 1
    # The recomputed entry was rewritten whole: the next reader uses it.
    third = StudyCache(tmp_path, "ctx")
    _same_quantized(third.quantized(key, FMT, _never), first)
    assert third.hits == 1


def test_study_entry_is_checked_against_what_the_reader_expects(tmp_path, capfd):
    cache = StudyCache(tmp_path, "ctx")
    key = cache.key(0, "q")
    cache.quantized(key, FMT, _quantized)
    # Resealed properly (a valid hash) but holding another format: still refused for this reader.
    tensors, meta = read_sealed(cache.path(key), STUDY_KIND)
    write_sealed(cache.path(key), tensors, STUDY_KIND, {**meta, "format": {**meta["format"], "group_size": 32}})
    calls = []
    StudyCache(tmp_path, "ctx").quantized(key, FMT, lambda: calls.append(1) or _quantized())
    assert calls == [1]
    err = capfd.readouterr().err
    assert "holds format" in err and "'group_size': 32" in err
    # An entry stored under another key (a copied file) is not this key's entry.
    other = cache.key(1, "q")
    cache.path(key).rename(cache.path(other))
    with pytest.raises(CacheEntryError, match="holds key"):
        read_sealed(cache.path(other), STUDY_KIND, {"key": other})


def test_read_only_study_cache_reads_and_does_not_store(capfd):
    root = Path("/proc/ndpmoe-no-such/study")       # cannot be created, not even by root
    cache = StudyCache(root, "ctx")
    assert "not writable" in capfd.readouterr().err
    qs = cache.quantized(cache.key(0, "q"), FMT, _quantized)      # no PermissionError after the work
    _same_quantized(qs, _quantized())


# ---------------------------------------------------------------------------------------------
# Expert stores: refused by open_store, rebuilt by the co-simulation's cache
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "s"
    make_store(path)
    return path


def _copy_store(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in (MANIFEST, TENSORS):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def _edit_manifest(folder: Path, edit, reseal: bool = False) -> None:
    raw = json.loads((folder / MANIFEST).read_text())
    edit(raw)
    if reseal:      # a consistent-looking manifest that still disagrees with the tensors
        from ndpmoe.host.store import _manifest_hash
        raw["manifest_sha256"] = _manifest_hash({k: v for k, v in raw.items() if k != "manifest_sha256"})
    (folder / MANIFEST).write_text(json.dumps(raw))


STORE_FAULTS = {
    "data byte": (lambda d: flip_data_byte(d / TENSORS), "corrupted"),
    "metadata field": (lambda d: _edit_manifest(d, lambda m: m["quant_format"].update(group_size=32)), "manifest_sha256"),
    "truncated": (lambda d: truncate(d / TENSORS), "truncated"),
    "resealed rank": (lambda d: _edit_manifest(d, lambda m: m.update(rank=8), reseal=True), "implies"),
    "resealed hidden": (lambda d: _edit_manifest(d, lambda m: m.update(hidden=256), reseal=True), "implies"),
}


@pytest.mark.parametrize("fault", STORE_FAULTS)
def test_damaged_store_is_refused_naming_the_file(store_dir, tmp_path, fault):
    d = _copy_store(store_dir, tmp_path / "s")
    damage, why = STORE_FAULTS[fault]
    damage(d)
    with pytest.raises(StoreError, match=why) as exc:
        open_store(d)
    assert str(d) in str(exc.value) and "rebuild" in str(exc.value)


def test_cosim_rebuilds_an_edited_store(tmp_path, monkeypatch, capfd):
    """The co-simulation's store cache opens with the format, rank and shapes it expects: the
    manifest edit that once gave 'identical' with a 4x larger error is caught and rebuilt."""
    from ndpmoe.sim.cosim_prepare import LoadedModel, QuantSettings, layer_store

    from host_block import block

    monkeypatch.setenv("NDPMOE_BUILD", str(tmp_path))
    cfg, blocks, _ = block()
    w = blocks[0][0]
    m = LoadedModel(None, {3: (w, cfg)}, None, None, "tiny block", "")
    q = QuantSettings(3, 64, 8, "rtn", 128)
    calib = {3: torch.randn(256, w.hidden, generator=torch.Generator().manual_seed(1))}
    folder = layer_store(m, 3, q, calib)
    first = open_store(folder).manifest
    assert capfd.readouterr().err == ""                    # a first build says nothing
    _edit_manifest(folder, lambda raw: raw["quant_format"].update(group_size=32))
    again = layer_store(m, 3, q, calib)
    err = capfd.readouterr().err
    assert again == folder and "rebuilding" in err and "layer 3" in err
    rebuilt = open_store(folder, expect_fmt=q.fmt(), expect_rank=8).manifest
    assert rebuilt == first                                 # same tensors, same hash
    assert layer_store(m, 3, q, calib) == folder and capfd.readouterr().err == ""


# ---------------------------------------------------------------------------------------------
# The default model: rebuilt, identical to the first build
# ---------------------------------------------------------------------------------------------
TINY = MoEfyConfig(num_experts=4, expert_size=128, shared_size=1024, top_k=1, calib_tokens=512,
                   cluster_iters=1, router_steps=1)


@pytest.fixture(scope="module")
def tiny_default(tmp_path_factory):
    """A one-layer default model with a tiny recipe in a private cache; the SmolLM2 fp32 folder is
    the configured cache's own (read only here: building it takes two minutes)."""
    source = smollm.smollm_folder()
    cache = tmp_path_factory.mktemp("cache")
    (cache / smollm.CACHE_NAME).symlink_to(source, target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NDPMOE_CACHE", str(cache))
        dm = load_default_moe(TINY, layers=[0], progress=False)
        path = next(cache.glob("smollm2-moe-*.safetensors"))
        yield cache, path, dm.blocks[0][0]


def _fields(w: MoEWeights) -> dict:
    return {n: getattr(w, n) for n in ("router", "w1", "w3", "w2", "shared_w1", "shared_w3", "shared_w2")}


DEFAULT_FAULTS = {
    "data byte": flip_data_byte,
    "metadata field": lambda p: edit_metadata(p, lambda m: m["router_configs"]["0"].update(top_k=2)),
    "truncated": truncate,
}


@pytest.mark.parametrize("fault", DEFAULT_FAULTS)
def test_damaged_default_model_is_refused_by_its_reader(tiny_default, tmp_path, fault):
    _, path, _ = tiny_default
    copy = tmp_path / path.name
    copy.write_bytes(path.read_bytes())
    load_blocks(copy, {}, {})
    DEFAULT_FAULTS[fault](copy)
    with pytest.raises(CacheEntryError, match=copy.name):
        load_blocks(copy, {}, {})


def test_damaged_default_model_is_rebuilt_identical(tiny_default, capfd):
    """load_default_moe rebuilds whatever its reader refuses (one rebuild here: each costs seconds)."""
    _, path, first = tiny_default
    flip_data_byte(path)
    dm = load_default_moe(TINY, layers=[0], progress=False)
    err = capfd.readouterr().err
    assert "rebuilding" in err and path.name in err and "corrupted" in err
    got = _fields(dm.blocks[0][0])
    for name, t in _fields(first).items():
        assert torch.equal(got[name], t), name
    assert dm.blocks[0][1].top_k == 1
    load_blocks(path, {}, {})                    # the rebuilt file passes its check


def test_default_model_is_checked_against_what_the_reader_expects(tmp_path):
    g = torch.Generator().manual_seed(0)
    e, i, d = 2, 64, 64
    w = MoEWeights(torch.randn(e, d, generator=g), torch.randn(e, i, d, generator=g), torch.randn(e, i, d, generator=g),
                   torch.randn(e, d, i, generator=g))
    cfg = MoEfyConfig(num_experts=2, expert_size=64, shared_size=0, top_k=1)
    info = {"moefy_config": cfg.to_dict(), "moe_layers": [0], "router_configs": {"0": RouterConfig(top_k=1).__dict__}}
    path = tmp_path / "m.safetensors"
    save_blocks(path, {0: (w, RouterConfig(top_k=1))}, info)
    blocks, _ = load_blocks(path, {"moe_layers": [0]}, expected_shapes(cfg, d, [0]))
    assert torch.equal(blocks[0][0].w2, w.w2)
    with pytest.raises(CacheEntryError, match="moefy_config"):
        load_blocks(path, {"moefy_config": MoEfyConfig().to_dict()}, {})
    with pytest.raises(CacheEntryError, match=r"'layers.0.w1' has shape \[2, 64, 64\], expected \[2, 128, 64\]"):
        load_blocks(path, {}, expected_shapes(MoEfyConfig(num_experts=2, expert_size=128, shared_size=0, top_k=1), d, [0]))
    with pytest.raises(CacheEntryError, match="not a sealed"):
        save_file({"x": torch.zeros(2)}, str(path))           # an older cache format, unsealed
        load_blocks(path, {}, {})


# ---------------------------------------------------------------------------------------------
# The SmolLM2 fp32 folder: every file hashed, a damaged folder is rebuilt
# ---------------------------------------------------------------------------------------------
def _fake_smollm(folder: Path) -> Path:
    """A folder with the layout and integrity record of the cached SmolLM2 (small stand-in files)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"hidden_size": 576, "num_hidden_layers": 30}))
    save_file({"w": torch.arange(64, dtype=torch.float32)}, str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_text(json.dumps({"vocab": list("abcdefgh")}))
    (folder / smollm.INTEGRITY_NAME).write_text(json.dumps({"files": smollm._file_record(folder)}))
    return folder


SMOLLM_FAULTS = {
    "data byte": (lambda f: flip_data_byte(f / "model.safetensors"), "model.safetensors is corrupted"),
    "metadata field": (lambda f: (f / "config.json").write_text(json.dumps({"hidden_size": 577, "num_hidden_layers": 30})),
                       "config.json"),
    "truncated": (lambda f: truncate(f / "tokenizer.json"), "tokenizer.json has"),
    "no record": (lambda f: (f / smollm.INTEGRITY_NAME).unlink(), "integrity.json is missing"),
}


class _Rebuilt(Exception):
    pass


@pytest.mark.parametrize("fault", SMOLLM_FAULTS)
def test_damaged_smollm_folder_is_rebuilt(tmp_path, monkeypatch, capfd, fault):
    folder = _fake_smollm(tmp_path / smollm.CACHE_NAME)
    assert smollm.check_folder(folder) is None
    damage, why = SMOLLM_FAULTS[fault]
    damage(folder)
    assert why in (smollm.check_folder(folder) or "")
    # smollm_folder() rebuilds it (the real rebuild dequantizes the GGUF for two minutes: the test
    # stops at the call, having checked that the damaged folder is not returned).
    monkeypatch.setenv("NDPMOE_CACHE", str(tmp_path))

    def stop(path):
        raise _Rebuilt(path)
    monkeypatch.setattr(smollm, "_build_cache", stop)
    with pytest.raises(_Rebuilt):
        smollm.smollm_folder()
    err = capfd.readouterr().err
    assert "rebuilding" in err and why in err


# ---------------------------------------------------------------------------------------------
# A writer killed mid-write
# ---------------------------------------------------------------------------------------------
WRITER = textwrap.dedent("""
    import sys, threading, time
    import safetensors.torch as st
    real = st.save_file
    lock = threading.Lock()

    def stalled(tensors, filename, metadata=None):      # written, not yet renamed: then killed
        real(tensors, filename, metadata=metadata)
        with lock:                                       # one whole line per writer
            print("WRITTEN", filename, flush=True)
        time.sleep(600)

    st.save_file = stalled                               # before any module binds the name
    sys.path.insert(0, {tests!r})
    from test_faults import write_artefact
    for kind, root in zip(sys.argv[1::2], sys.argv[2::2]):
        threading.Thread(target=write_artefact, args=(kind, root), daemon=True).start()
    time.sleep(600)
""")


def write_artefact(kind: str, root: str) -> None:
    """Write one artefact of `kind` under `root`, deterministically (the killed writer's job)."""
    root = Path(root)
    if kind == "study":
        cache = StudyCache(root, "ctx")
        cache.quantized(cache.key(0, "q"), FMT, _quantized)
    elif kind == "default":
        g = torch.Generator().manual_seed(0)
        w = MoEWeights(torch.randn(2, 64, generator=g), torch.randn(2, 64, 64, generator=g),
                       torch.randn(2, 64, 64, generator=g), torch.randn(2, 64, 64, generator=g))
        save_blocks(root / "blocks.safetensors", {0: (w, RouterConfig(top_k=1))}, {"moe_layers": [0]})
    elif kind == "store":
        make_store(root / "store")
    else:
        raise ValueError(kind)


def _next_start(kind: str, root: Path) -> None:
    """What the next run does first with this kind of artefact."""
    from ndpmoe.model.integrity import clean_stale_temps

    if kind == "study":
        StudyCache(root, "ctx")
    elif kind == "default":
        clean_stale_temps(root)        # load_default_moe's first step on its cache folder
    else:
        with pytest.raises(StoreError):
            open_store(root / "store")  # the killed writer committed no manifest


def _files(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_killed_writers_leave_nothing_and_the_rerun_is_identical(tmp_path):
    """One process writes a study entry, default-model blocks and a store at once and is killed
    with SIGKILL while all three are written but not yet renamed."""
    kinds = ("study", "default", "store")
    argv = []
    for kind in kinds:
        (tmp_path / kind).mkdir()
        argv += [kind, str(tmp_path / kind)]
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(tests=str(REPO / "tests")), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    watchdog = threading.Timer(120, proc.kill)          # a writer that dies or hangs fails the test
    watchdog.start()
    try:
        written = [proc.stdout.readline() for _ in kinds]
    finally:
        watchdog.cancel()
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    assert all(line.startswith("WRITTEN") for line in written), (written, err)
    for kind in kinds:
        root = tmp_path / kind
        assert _temps(root), f"{kind}: the killed writer left no temporary (the kill came too late to test anything)"
        _next_start(kind, root)
        assert _temps(root) == [], f"{kind}: a temporary survived the next start"
        write_artefact(kind, str(root))                     # the rerun
        reference = tmp_path / f"{kind}-reference"
        reference.mkdir()
        write_artefact(kind, str(reference))                # an undisturbed writer
        assert _files(root) == _files(reference), kind


def test_a_failed_write_removes_its_temporary(tmp_path):
    from ndpmoe.model.integrity import atomic_path

    final = tmp_path / "x.safetensors"
    final.write_bytes(b"the old entry")
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"half an entry")
            raise OSError(28, "disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"] and final.read_bytes() == b"the old entry"


# ---------------------------------------------------------------------------------------------
# Text files
# ---------------------------------------------------------------------------------------------
def _book(tmp_path: Path, text: str, encoding: str) -> Path:
    path = tmp_path / f"book-{encoding}.txt"
    path.write_bytes(text.encode(encoding))
    return path


BOOK = "\n\n".join(f"Paragraph {i} à é " + "word " * 20 for i in range(6))
ASCII_BOOK = "\n\n".join(f"Paragraph {i} " + "word " * 20 for i in range(6))


def test_text_must_decode(tmp_path):
    with pytest.raises(NdpmoeError, match="not valid utf-8.*--encoding"):
        file_text(_book(tmp_path, BOOK, "latin-1"))
    assert file_text(_book(tmp_path, BOOK, "latin-1"), "latin-1").calib.startswith("Paragraph 0 à é")
    with pytest.raises(ValueError, match="UTF-16"):
        file_text(_book(tmp_path, BOOK, "utf-16"))
    assert "à" in file_text(_book(tmp_path, BOOK, "utf-16"), "utf-16").eval
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="blob.bin"):
        file_text(binary)
    with pytest.raises(ValueError, match="NUL"):
        file_text(_book(tmp_path, ASCII_BOOK, "utf-16-le"))
    with pytest.raises(ValueError, match="--encoding 'nope'"):
        file_text(_book(tmp_path, BOOK, "utf-8"), "nope")


# ---------------------------------------------------------------------------------------------
# Arguments: refused in one line with exit 2, before any expensive step
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def tripwires(monkeypatch, tmp_path):
    """Every expensive step a command can reach raises; the CLI would then report an internal
    error (exit 1), never the exit 2 of a refused argument."""
    import ndpmoe.host.bench as bench
    import ndpmoe.host.cmd_eval as cmd_eval
    import ndpmoe.host.quant_bench as quant_bench
    import ndpmoe.host.study as study
    import ndpmoe.model.checkpoint as checkpoint
    import ndpmoe.model.default_moe as default_moe
    import ndpmoe.rtl.synth.run as synth_run
    import ndpmoe.sim.cosim as cosim
    import ndpmoe.sim.cost_calibration as cost_calibration
    import ndpmoe.sim.runner as runner

    ran = []

    def wire(name):
        def tripped(*args, **kwargs):
            ran.append(name)
            raise AssertionError(f"{name} ran before the bad argument was refused")
        return tripped
    for obj, attr in ((study.Study, "__init__"), (cmd_eval, "load_study_model"), (default_moe, "load_default_moe"),
                      (checkpoint, "load_model"), (bench, "prepare_bench"), (quant_bench, "run"), (cosim, "run_cosim"),
                      (cost_calibration, "calibrate"), (runner, "run"), (runner, "build"),
                      (synth_run, "run_synth")):
        monkeypatch.setattr(obj, attr, wire(f"{getattr(obj, '__name__', obj)}.{attr}"))
    monkeypatch.setenv("NDPMOE_BUILD", str(tmp_path / "build"))
    return ran


def _cli(argv: list[str], capsys) -> tuple[int, str, float]:
    from ndpmoe.host.cli import main

    t0 = time.perf_counter()
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    return rc, capsys.readouterr().err.strip(), time.perf_counter() - t0


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("args")
    (d / "a-file").write_text("x")
    (d / "a-folder").mkdir()
    (d / "latin1.txt").write_bytes(BOOK.encode("latin-1"))
    (d / "utf16.txt").write_bytes(BOOK.encode("utf-16"))
    (d / "binary.txt").write_bytes(bytes(range(256)) * 8)
    return d


@pytest.fixture(scope="module")
def top2_checkpoint(tmp_path_factory):
    """A tiny 3-layer Mixtral with top-2 routing, written offline by transformers."""
    import transformers

    folder = tmp_path_factory.mktemp("top2")
    cfg = transformers.MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=4, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(cfg).save_pretrained(folder)
    return folder


# (argv with {f} for the files folder and {ckpt} for the top-2 checkpoint, text the line must hold)
BAD_ARGUMENTS = [
    ("eval --bits 5", "--bits"), ("eval --base-bits 5", "5"), ("eval --hi-bits 5", "--hi-bits"),
    ("eval --rank -1", "-1"), ("eval --rank 4,x", "'x'"), ("eval --budgets -1", "-1"), ("eval --budgets nan", "nan"),
    ("eval --topn 0", "0"), ("eval --topn 9", "--topn 9"), ("eval --layers 0,30", "layer 30"),
    ("eval --eval-tokens 100", "--eval-tokens 100"), ("eval --quantizers rtn,fast", "'fast'"),
    ("eval --rank 4,65", "65"), ("eval --seq-len 9000", "--seq-len 9000"),
    ("eval --out {f}/a-file", "a-file"), ("eval --out {f}/a-file/sub", "a-file"),
    ("eval --out /proc/ndpmoe-no-such/out", "/proc/ndpmoe-no-such/out"),
    ("eval --text {f}/latin1.txt", "latin1.txt"), ("eval --text {f}/utf16.txt", "UTF-16"),
    ("eval --text {f}/binary.txt", "binary.txt"), ("eval --text {f}/missing.txt", "missing.txt"),
    ("eval --text {f}/latin1.txt --encoding nope", "nope"),
    ("eval --model {ckpt} --topn 3", "--topn 3"), ("eval --model {ckpt} --topn 1,2,4", "not 4"),
    ("eval --model {ckpt} --layers 0,7", "layer 7"), ("eval --model {ckpt} --layers 7", "layer 7"),
    ("eval --model {ckpt} --seq-len 128", "--seq-len 128"), ("eval --model {f}/a-file", "a-file"),
    ("bench --cache-gb inf", "inf"), ("bench --cache-gb 0", "--cache-gb"), ("bench --tokens 0", "--tokens"),
    ("bench --tokens 100000000", "100000000"), ("bench --json {f}/a-folder", "a-folder"),
    ("bench --trace {f}/binary.txt", "binary.txt"), ("bench --placement everywhere", "everywhere"),
    ("bench --factor-share 0.7", "0.7"), ("bench --bits 5", "--bits"), ("bench --batch 300", "--batch 300"),
    ("bench --model nosuch", "nosuch"), ("bench --rank 5000", "5000"),
    ("cosim --tokens 100000000", "100000000"), ("cosim --tokens 0", "--tokens"), ("cosim --layer 30", "layer 30"),
    ("cosim --topn 8", "--topn 8"), ("cosim --rank -1", "-1"), ("cosim --bits 5", "--bits"),
    ("cosim --json {f}/a-folder", "a-folder"), ("cosim --placement gpu", "gpu"),
    ("cosim --calibrate --calib-layers 3,40", "layer 40"),
    ("quant-bench --rows 0", "--rows"), ("quant-bench --bits 5", "--bits"),
    ("quant-bench --rows 64 --cols 64 --rank 65", "--rank 65"), ("quant-bench --cols 100", "--cols 100"),
    ("sim --count 0", "--count"), ("sim --bench --in 100", "--in 100"), ("sim --bench --bits 5", "--bits"),
    ("sim --bench --tokens 9", "--tokens"), ("sim --config nosuch", "nosuch"),
    ("rtl --out {f}/a-file", "a-file"), ("fpga-export --out {f}/a-file", "a-file"),
    ("synth --freq inf", "inf"), ("synth --json {f}/a-folder", "a-folder"), ("synth --speed 9", "9"),
    ("fpga-sweep --words-per-cycle 2", "2"), ("demo --out {f}/a-file", "a-file"),
]


@pytest.mark.parametrize("argv,names", BAD_ARGUMENTS, ids=[a for a, _ in BAD_ARGUMENTS])
def test_bad_argument_is_refused_first(tripwires, files, top2_checkpoint, capsys, argv, names):
    args = argv.format(f=files, ckpt=top2_checkpoint).split()
    rc, err, seconds = _cli(args, capsys)
    assert tripwires == [], f"`ndpmoe {argv}` reached {tripwires} before refusing"
    assert rc == 2, (argv, rc, err)
    assert len(err.splitlines()) == 1 and "error:" in err, err
    assert names.format(f=files) in err, err
    assert seconds < 20, f"`ndpmoe {argv}` took {seconds:.1f} s to refuse"


def test_internal_error_is_one_line_and_a_log(tmp_path, monkeypatch, capsys):
    """A command that fails unexpectedly: one line, the traceback in a log file it names."""
    from ndpmoe.host import cli

    (tmp_path / "faults_boom_cmd.py").write_text(
        "def add_arguments(p):\n    pass\n\ndef run(args):\n    return {}['missing']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.SUBCOMMANDS, "boom", ("faults_boom_cmd", "fails"))
    monkeypatch.setenv("NDPMOE_BUILD", str(tmp_path / "build"))
    rc, err, _ = _cli(["boom"], capsys)
    assert rc == 1 and len(err.splitlines()) == 1 and "internal error: KeyError" in err
    log = Path(err.split("traceback in ")[1].split(";")[0])
    assert log.is_file() and "Traceback" in log.read_text() and "faults_boom_cmd.py" in log.read_text()
    rc, err, _ = _cli(["--debug", "boom"], capsys)
    assert rc == 1 and "Traceback" in err


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    env = {**os.environ, "NDPMOE_BUILD": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ndpmoe.host.cli", "bench", "--model", "mixtral-8x7b",
                             "--trace", "synthetic", "--tokens", "8192"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    for line in proc.stdout:                     # the work has started
        if line.startswith("configuration"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    watchdog.cancel()
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0] and "complete" in lines[0], err
