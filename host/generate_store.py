"""The whole-model expert store `ndpmoe generate` reads: every MoE layer's low-bit experts,
compensators, higher-precision copies and measured sensitivities, quantized by the accuracy
study's own code (host/study.py: `Study.variant`, with its content-keyed cache of quantized
experts), so the runtime serves the model the study measured.

Built once and kept under `build_root("generate", "stores")`, in a folder named by a key of
everything it depends on: the model's weights (MoE blocks in full, the rest sampled, as the
study's fingerprint does), the calibration tokens, the quantization settings and the code that
quantizes and writes it. A second run with the same key opens the store without a calibration
pass. The folder is written under a temporary name and renamed when complete, so an interrupted
build (Ctrl-C) leaves no store that could be opened, half-written or otherwise.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ndpmoe.model.contract import QuantFormat
from ndpmoe.model.integrity import code_digest
from ndpmoe.model.paths import build_root

from .sizes import ExpertSizes
from .store import ExpertStore, StoreError, check_factor_bits, open_store, write_store

# What a store's bytes depend on besides the model and the settings (an edit re-keys every store).
_CODE = ("model/quantize.py", "model/compensate.py", "model/factor_quant.py", "model/moe_quant.py", "model/qtensor.py",
         "model/packing.py", "model/contract.py", "host/study.py", "host/study_cache.py",
         "host/sensitivity.py", "host/store.py", "host/generate_store.py")


@dataclass(frozen=True)
class StoreSettings:
    """How every expert is stored, and the calibration the quantizer and fits see (the defaults
    are `ndpmoe eval`'s: 4096 calibration tokens in windows of 512)."""
    bits: int = 3
    rank: int = 16                      # stored compensator rank (policies use prefixes)
    hi_bits: int = 8                    # higher-precision copies (0: none)
    group: int = 64
    word_bits: int = 128                # the NDP port the images are packed for
    quantizer: str = "optimized"
    fit: str = "aware"
    calib_tokens: int = 4096
    calib_rows: int = 4096
    seq_len: int = 512
    factor_bits: tuple[int, ...] = ()   # packed low-bit factors stored besides the fp16 / int8 ones

    def __post_init__(self):
        for name in ("bits", "group", "word_bits", "calib_tokens", "calib_rows", "seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, not {v!r}")
        for name in ("rank", "hi_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, not {v!r}")
        QuantFormat(self.bits, self.group, self.word_bits)           # a clear error for a bad format
        object.__setattr__(self, "factor_bits", check_factor_bits(self.factor_bits, self.rank))
        if self.hi_bits:
            QuantFormat(self.hi_bits, self.group, self.word_bits)
            if self.hi_bits <= self.bits:
                raise ValueError(f"hi_bits ({self.hi_bits}) must be above bits ({self.bits}), or 0 for no copies")

    @property
    def fmt(self) -> QuantFormat:
        return QuantFormat(self.bits, self.group, self.word_bits)

    @property
    def hi_fmt(self) -> QuantFormat | None:
        return QuantFormat(self.hi_bits, self.group, self.word_bits) if self.hi_bits else None

    def variant(self):
        from .study import Variant

        return Variant(self.bits, self.quantizer, self.fit if self.rank else "aware", self.rank,
                       self.hi_bits or None, None, self.group, self.word_bits)

    def sizes(self, hidden: int, intermediate: int, ndp=None, factor_precision: str = "fp16") -> ExpertSizes:
        """The sizes a store of these settings will have (known before it is built)."""
        return ExpertSizes(hidden, intermediate, self.fmt, self.hi_fmt, self.rank, ndp, factor_precision)


@dataclass
class ModelStore:
    """An opened whole-model store and which store layer holds which model layer."""
    store: ExpertStore
    layer_index: dict[int, int]          # model layer -> store layer
    built: bool                          # built by this call (False: reused)
    seconds: float
    key: str = ""                        # store_key: the model, calibration, settings and code it holds


def _code_hash() -> str:
    return code_digest(_CODE)


def calibration_windows(dm, s: StoreSettings) -> torch.Tensor:
    from ndpmoe.model.text import token_windows, tokenize

    return token_windows(tokenize(dm.text.calib, dm.tokenizer), s.seq_len, s.calib_tokens)


def store_key(dm, layers: list[int], s: StoreSettings, calib: torch.Tensor) -> str:
    from .study_cache import model_fingerprint, tensor_hash

    h = hashlib.sha256()
    tensor_hash(h, calib)
    fingerprint = model_fingerprint(dm.model, {l: dm.blocks[l] for l in layers}, f"{h.hexdigest()}|{s.calib_rows}")
    text = f"{fingerprint}|{layers}|{sorted(asdict(s).items())}|{_code_hash()}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def store_folder(key: str, s: StoreSettings) -> Path:
    return build_root("generate", "stores") / f"{s.variant().label}-{key}"


def model_store(dm, s: StoreSettings, *, layers: list[int] | None = None, name: str = "model",
                progress: bool = False, log=print, study=None, gain_tables: bool = False) -> ModelStore:
    """The store of `dm`'s MoE layers under settings `s`: opened (and verified) if built before,
    else built with the study's quantization and written atomically (`study`: a `store_study`
    of the same model, settings and layers, to reuse its calibration pass). `gain_tables`: also
    make sure it holds valid gain tables (host/gain_tables.py), measuring and adding them once."""
    import time

    t0 = time.perf_counter()
    layers = sorted(dm.blocks) if layers is None else sorted(layers)
    missing = [l for l in layers if l not in dm.blocks]
    if missing or not layers:
        raise ValueError(f"layers {missing or layers} are not MoE layers of the model ({sorted(dm.blocks)})")
    calib = calibration_windows(dm, s)
    key = store_key(dm, layers, s, calib)
    folder = store_folder(key, s)
    source = f"{name}: MoE layers {layers}, {s.variant().label}, store key {key}"
    index = {l: i for i, l in enumerate(layers)}
    try:
        ms = ModelStore(open_store(folder, expect_source=source), index, False, time.perf_counter() - t0, key)
    except StoreError:
        log(f"building the expert store of {len(layers)} MoE layers ({s.variant().label}) in {folder}")
        if gain_tables and study is None:
            study = store_study(dm, s, layers, calib, progress=progress)      # one calibration pass for both
        build_store(dm, s, layers, calib, folder, source, progress=progress, log=log, study=study)
        ms = ModelStore(open_store(folder, expect_source=source), index, True, time.perf_counter() - t0, key)
    if gain_tables:
        from .gain_tables import ensure_gain_tables

        ms.store = ensure_gain_tables(ms.store, lambda: study or store_study(dm, s, layers, calib, progress=progress),
                                      {index[l]: dm.blocks[l] for l in layers}, layers, log=log)
        ms.seconds = time.perf_counter() - t0
    return ms


def store_study(dm, s: StoreSettings, layers: list[int], calib: torch.Tensor | None = None, *,
                progress: bool = False):
    """The accuracy study a store of `s` is quantized by: `.variant(s.variant())` is its content."""
    from ndpmoe.model.text import token_windows, tokenize

    from .study import Study

    calib = calibration_windows(dm, s) if calib is None else calib
    # The study also measures layer errors on held-out inputs: one short window is enough here.
    eval_windows = token_windows(tokenize(dm.text.eval, dm.tokenizer), 64, 64)
    study = Study(dm, eval_windows, calib, calib_rows=s.calib_rows, progress=progress, quant_layers=layers,
                  block_rows=64)
    study.cache_calib = calib             # what build_store checks a given study against
    return study


def build_store(dm, s: StoreSettings, layers: list[int], calib: torch.Tensor, folder: Path, source: str, *,
                progress: bool = False, log=print, study=None) -> None:
    """Quantize with the study (its cache reused where the study ran the same settings) and write
    the store under a temporary folder, renamed into place only when complete."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if study is None:
            study = store_study(dm, s, layers, calib, progress=progress)
            log(f"  calibration pass: {study.calib_seconds:.0f} s")
        elif study.layers != layers or not torch.equal(study.cache_calib, calib):
            raise ValueError("the study given was not made by store_study for these layers and settings")
        quantized = study.variant(s.variant())
        log(f"  {len(layers)} layers quantized and compensated (study cache: {study.cache.hits} parts reused, "
            f"{study.cache.misses} computed)")
        write_store(tmp, [quantized[l] for l in layers], source=source, grams=[study.grams[l] for l in layers],
                    factor_bits=s.factor_bits)
        log(f"  written: {sum(f.stat().st_size for f in tmp.iterdir()) / 1e6:.1f} MB")
        if folder.exists():
            shutil.rmtree(folder)          # a stale or corrupted store of the same key
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_temporaries(folder: Path) -> None:
    """Temporary folders of builds whose process is gone (killed, not interrupted)."""
    for old in folder.parent.glob(f".{folder.name}.tmp-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
