"""Expert store on disk: every MoE layer's packed low-bit experts, their compensators (fp16 for the
GPU, int8 for the NDP), optional higher-precision copies and measured sensitivities, in one
safetensors file plus a versioned JSON manifest.

Layout of a store folder::

    manifest.json          format version, formats, shapes, ranks, source, size and SHA-256 of
    experts.safetensors    L{l}.E{e}.{w1|w3|w2}.{lo|hi|A16|B16|A8|B8|spectrum},
                           L{l}.exp [E, 3, 4] int32 scale_exp of (lo, hi, A8, B8),
                           L{l}.rank_gain [E, R + 1], L{l}.hi_gain [E]

Writes are atomic (temporary file, fsync, rename) and the manifest is renamed last: it is the
commit point, and it carries the hash of the tensors it describes and a hash of its own fields, so
a crash between the two renames, a truncated or edited tensor file, an edited manifest field, a
manifest whose format, rank or shapes disagree with the tensors, a store of another format version
or one built from another checkpoint is refused when opened, never silently used. Temporary files
of a failed write are removed, those of a killed writer on the next write or open.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ndpmoe.model.compensate import Int8LowRank, LowRank, quantize_int8_symmetric
from ndpmoe.model.contract import NdpConfig, QuantFormat
from ndpmoe.model.errors import CacheEntryError
from ndpmoe.model.integrity import canonical_json, clean_stale_temps, temp_path
from ndpmoe.model.moe import MoEWeights, RouterConfig
from ndpmoe.model.moe_quant import MATRICES, QuantizedExpert, QuantizedMoE
from ndpmoe.model.qtensor import QuantizedMatrix

from .sensitivity import LayerSensitivity, measure_sensitivity
from .sizes import ExpertSizes

STORE_FORMAT_VERSION = 2              # 2: the manifest carries a hash of its own fields
STORE_KIND = "ndpmoe-expert-store"
MANIFEST = "manifest.json"
TENSORS = "experts.safetensors"
_EXP_SLOTS = ("lo", "hi", "A8", "B8")


class StoreError(CacheEntryError):
    """A store that must not be used: missing, truncated, corrupted, stale or of another version."""


def _fmt_dict(fmt: QuantFormat | None) -> dict | None:
    return None if fmt is None else {"bits": fmt.bits, "group_size": fmt.group_size, "word_bits": fmt.word_bits}


def _fmt_from(d: dict | None) -> QuantFormat | None:
    return None if d is None else QuantFormat(d["bits"], d["group_size"], d["word_bits"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _manifest_hash(fields: dict) -> str:
    return hashlib.sha256(canonical_json(fields)).hexdigest()


@dataclass(frozen=True)
class StoreManifest:
    version: int
    fmt: QuantFormat
    hi_fmt: QuantFormat | None
    layers: int
    experts: int
    hidden: int
    intermediate: int
    rank: int                       # stored rank of every compensator (0: none)
    source: str                     # the checkpoint it was built from (path, name, fingerprint)
    tensors_bytes: int
    content_sha256: str

    def to_json(self) -> dict:
        fields = {"kind": STORE_KIND, "format_version": self.version, "quant_format": _fmt_dict(self.fmt),
                  "hi_format": _fmt_dict(self.hi_fmt), "layers": self.layers, "experts": self.experts,
                  "hidden": self.hidden, "intermediate": self.intermediate, "rank": self.rank,
                  "source": self.source, "tensors_file": TENSORS, "tensors_bytes": self.tensors_bytes,
                  "content_sha256": self.content_sha256}
        return fields | {"manifest_sha256": _manifest_hash(fields)}

    @classmethod
    def from_json(cls, d: dict, where: Path) -> "StoreManifest":
        if not isinstance(d, dict) or d.get("kind") != STORE_KIND:
            raise StoreError(f"{where} is not an ndpmoe expert store manifest")
        version = d.get("format_version")
        if version != STORE_FORMAT_VERSION:
            raise StoreError(f"{where} has store format version {version!r}; this runtime reads version "
                             f"{STORE_FORMAT_VERSION}: rebuild the store")
        fields = {k: v for k, v in d.items() if k != "manifest_sha256"}
        if d.get("manifest_sha256") != _manifest_hash(fields):
            raise StoreError(f"{where} is corrupted: its fields do not match its manifest_sha256 (edited or "
                             f"damaged); rebuild the store")
        try:
            return cls(version, _fmt_from(d["quant_format"]), _fmt_from(d["hi_format"]), int(d["layers"]),
                       int(d["experts"]), int(d["hidden"]), int(d["intermediate"]), int(d["rank"]),
                       str(d["source"]), int(d["tensors_bytes"]), str(d["content_sha256"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{where} is missing or has a bad field: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def _check_layers(layers: list[QuantizedMoE]) -> tuple[int, int]:
    if not layers:
        raise ValueError("a store needs at least one layer")
    first = layers[0]
    e0, x0 = first.num_experts, first.experts[0]
    shape = (x0.q["w1"].rows, x0.q["w1"].in_features)
    ranks = {ex.stored_rank(m) for qm in layers for ex in qm.experts for m in MATRICES}
    if len(ranks) != 1:
        raise ValueError(f"every compensator of a store must have the same rank, found ranks {sorted(ranks)}")
    for l, qm in enumerate(layers):
        if qm.fmt != first.fmt or qm.num_experts != e0:
            raise ValueError(f"layer {l} has format {qm.fmt} with {qm.num_experts} experts, layer 0 "
                             f"{first.fmt} with {e0}: a store holds one format and expert count")
        if (qm.hi_experts is None) != (first.hi_experts is None):
            raise ValueError(f"layer {l} {'lacks' if qm.hi_experts is None else 'has'} higher-precision "
                             f"copies but layer 0 does not agree")
        for e, ex in enumerate(qm.experts):
            if (ex.q["w1"].rows, ex.q["w1"].in_features) != shape:
                raise ValueError(f"layer {l} expert {e} w1 has shape {ex.q['w1'].shape}, expected {shape}")
    return ranks.pop(), shape[0]


def write_store(path: str | os.PathLike, layers: list[QuantizedMoE], *, source: str,
                grams: list[list[dict[str, torch.Tensor]]] | None = None,
                sensitivity: list[LayerSensitivity] | None = None) -> StoreManifest:
    """Write `layers` as a store folder at `path` (created if needed), atomically.

    Sensitivities are measured here unless given; pass each layer's calibration `grams` when the
    compensators were fitted activation-aware, so rank and hi-copy gains share one objective."""
    if not isinstance(source, str) or not source:
        raise ValueError(f"source must name the checkpoint the store is built from, not {source!r}")
    rank, intermediate = _check_layers(layers)
    fmt, hi_fmt = layers[0].fmt, layers[0].hi_experts[0].q["w1"].fmt if layers[0].hi_experts else None
    if sensitivity is None:
        sensitivity = [measure_sensitivity(qm, None if grams is None else grams[l],
                                           source="measured at store build" + (" (Frobenius)" if grams is None else ""))
                       for l, qm in enumerate(layers)]
    tensors: dict[str, torch.Tensor] = {}
    for l, qm in enumerate(layers):
        exps = torch.zeros(qm.num_experts, len(MATRICES), len(_EXP_SLOTS), dtype=torch.int32)
        for e, ex in enumerate(qm.experts):
            for i, m in enumerate(MATRICES):
                key = f"L{l}.E{e}.{m}"
                tensors[f"{key}.lo"] = ex.q[m].to_image()
                exps[e, i, 0] = ex.q[m].scale_exp
                if qm.hi_experts is not None:
                    hq = qm.hi_experts[e].q[m]
                    tensors[f"{key}.hi"] = hq.to_image()
                    exps[e, i, 1] = hq.scale_exp
                if rank:
                    f = ex.comp[m]
                    tensors[f"{key}.A16"] = f.A.half().contiguous()
                    tensors[f"{key}.B16"] = f.B.half().contiguous()
                    tensors[f"{key}.spectrum"] = f.spectrum.float().contiguous()
                    i8 = Int8LowRank.from_lowrank(f, fmt.word_bits)
                    tensors[f"{key}.A8"] = i8.A_q.to_image()
                    tensors[f"{key}.B8"] = i8.B_q.to_image()
                    exps[e, i, 2], exps[e, i, 3] = i8.A_q.scale_exp, i8.B_q.scale_exp
        tensors[f"L{l}.exp"] = exps
        tensors[f"L{l}.rank_gain"] = sensitivity[l].rank_gain.double().contiguous()
        tensors[f"L{l}.hi_gain"] = sensitivity[l].hi_gain.double().contiguous()
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(folder)
    tmp, tmp_manifest = temp_path(folder / TENSORS), temp_path(folder / MANIFEST)
    try:
        # one header entry: the same tensors give the same bytes (and SHA-256) on every write
        save_file(tensors, str(tmp), metadata={"ndpmoe": json.dumps({"kind": STORE_KIND,
                                                                      "format_version": STORE_FORMAT_VERSION})})
        manifest = StoreManifest(STORE_FORMAT_VERSION, fmt, hi_fmt, len(layers), layers[0].num_experts,
                                 layers[0].experts[0].q["w1"].in_features, intermediate, rank, source,
                                 tmp.stat().st_size, _sha256(tmp))
        _atomic_replace(tmp, folder / TENSORS)
        tmp_manifest.write_text(json.dumps(manifest.to_json(), indent=1) + "\n")
        _atomic_replace(tmp_manifest, folder / MANIFEST)
    finally:
        for t in (tmp, tmp_manifest):
            t.unlink(missing_ok=True)
    return manifest


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
class ExpertStore:
    """An opened, verified store. Tensors are read lazily, one at a time."""

    def __init__(self, folder: Path, manifest: StoreManifest):
        self.folder = folder
        self.manifest = manifest
        self._file = safe_open(str(folder / TENSORS), framework="pt")
        self._exp: dict[int, torch.Tensor] = {}

    @property
    def fmt(self) -> QuantFormat:
        return self.manifest.fmt

    @property
    def hi_fmt(self) -> QuantFormat | None:
        return self.manifest.hi_fmt

    @property
    def rank(self) -> int:
        return self.manifest.rank

    def sizes(self, ndp: NdpConfig | None = None) -> ExpertSizes:
        m = self.manifest
        return ExpertSizes(m.hidden, m.intermediate, m.fmt, m.hi_fmt, m.rank, ndp)

    def _check(self, layer: int, expert: int, matrix: str) -> str:
        m = self.manifest
        if not 0 <= layer < m.layers or not 0 <= expert < m.experts or matrix not in MATRICES:
            raise ValueError(f"no (layer {layer}, expert {expert}, matrix {matrix!r}) in a store of "
                             f"{m.layers} layers x {m.experts} experts x {MATRICES}")
        return f"L{layer}.E{expert}.{matrix}"

    def tensor(self, key: str) -> torch.Tensor:
        return self._file.get_tensor(key)

    def scale_exp(self, layer: int, expert: int, matrix: str, slot: str) -> int:
        if layer not in self._exp:
            self._exp[layer] = self.tensor(f"L{layer}.exp")
        return int(self._exp[layer][expert, MATRICES.index(matrix), _EXP_SLOTS.index(slot)])

    def image(self, layer: int, expert: int, matrix: str, variant: str = "lo") -> torch.Tensor:
        """The packed memory image (uint8) of a low-bit or higher-precision matrix."""
        key = self._check(layer, expert, matrix)
        if variant not in ("lo", "hi") or (variant == "hi" and self.hi_fmt is None):
            raise ValueError(f"variant must be 'lo'{' or hi' if self.hi_fmt else ''}, not {variant!r}")
        return self.tensor(f"{key}.{variant}")

    def matrix(self, layer: int, expert: int, matrix: str, variant: str = "lo") -> QuantizedMatrix:
        fmt = self.fmt if variant == "lo" else self.hi_fmt
        rows, n_in = self.sizes().shape(matrix)
        return QuantizedMatrix.from_image(self.image(layer, expert, matrix, variant), fmt, rows, n_in,
                                          self.scale_exp(layer, expert, matrix, variant))

    def _need_rank(self) -> None:
        if not self.rank:
            raise ValueError(f"store {self.folder} holds no compensators (rank 0)")

    def factors_fp16(self, layer: int, expert: int, matrix: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [out, R], B [R, in]) fp16, as the GPU path fetches them (a prefix is a lower rank)."""
        key = self._check(layer, expert, matrix)
        self._need_rank()
        return self.tensor(f"{key}.A16"), self.tensor(f"{key}.B16")

    def lowrank(self, layer: int, expert: int, matrix: str) -> LowRank:
        a, b = self.factors_fp16(layer, expert, matrix)
        return LowRank(a.float(), b.float(), self.tensor(f"{self._check(layer, expert, matrix)}.spectrum"))

    def factor_images(self, layer: int, expert: int, matrix: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Memory images of the int8 (A, B) factors the NDP runs."""
        key = self._check(layer, expert, matrix)
        self._need_rank()
        return self.tensor(f"{key}.A8"), self.tensor(f"{key}.B8")

    def factors_int8(self, layer: int, expert: int, matrix: str) -> Int8LowRank:
        a_img, b_img = self.factor_images(layer, expert, matrix)
        sizes = self.sizes()
        fa, fb = sizes.int8_factor_fmts(matrix)
        rows, n_in = sizes.shape(matrix)
        a = QuantizedMatrix.from_image(a_img, QuantFormat(8, fa.group_size, self.fmt.word_bits), rows,
                                       sizes.padded_rank, self.scale_exp(layer, expert, matrix, "A8"))
        b = QuantizedMatrix.from_image(b_img, QuantFormat(8, fb.group_size, self.fmt.word_bits), self.rank,
                                       n_in, self.scale_exp(layer, expert, matrix, "B8"))
        return Int8LowRank(a, b, self.rank)

    def sensitivity(self, layer: int) -> LayerSensitivity:
        return LayerSensitivity(self.tensor(f"L{layer}.rank_gain"), self.tensor(f"L{layer}.hi_gain"),
                                f"measured, from store {self.folder.name}")

    def quantized_moe(self, layer: int, weights: MoEWeights, cfg: RouterConfig) -> QuantizedMoE:
        """Golden layer 2 rebuilt from the stored bytes (fp16 factors), for reference runs."""
        experts, his = [], []
        for e in range(self.manifest.experts):
            q = {m: self.matrix(layer, e, m) for m in MATRICES}
            comp = {m: self.lowrank(layer, e, m) for m in MATRICES} if self.rank else {}
            experts.append(QuantizedExpert(q, comp))
            if self.hi_fmt is not None:
                his.append(QuantizedExpert({m: self.matrix(layer, e, m, "hi") for m in MATRICES}))
        return QuantizedMoE(self.fmt, experts, weights.router, cfg, weights, his or None)


def _check_tensors(folder: Path, m: StoreManifest) -> None:
    """The manifest's format, rank and shapes agree with the tensors in the file (header only)."""
    path = folder / TENSORS
    try:
        sizes = ExpertSizes(m.hidden, m.intermediate, m.fmt, m.hi_fmt, m.rank)
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:          # noqa: BLE001 - any failure to read it means: do not use it
        raise StoreError(f"{path} does not agree with {folder / MANIFEST} ({exc}); rebuild the store") from None

    def need(key: str, numel: int | None = None, shape: tuple | None = None) -> None:
        got = shapes.get(key)
        if got is None:
            raise StoreError(f"{path} has no tensor {key!r} that {MANIFEST} implies; rebuild the store")
        n = math.prod(got)
        if (numel is not None and n != numel) or (shape is not None and got != shape):
            want = shape if shape is not None else f"{numel} elements"
            raise StoreError(f"{path}: tensor {key!r} has shape {list(got)}, {MANIFEST} ({m.fmt}, rank {m.rank}, "
                             f"D {m.hidden}, I {m.intermediate}) implies {want}; rebuild the store")

    for l in range(m.layers):
        need(f"L{l}.exp", shape=(m.experts, len(MATRICES), len(_EXP_SLOTS)))
        need(f"L{l}.rank_gain", shape=(m.experts, m.rank + 1))
        need(f"L{l}.hi_gain", shape=(m.experts,))
        for e in range(m.experts):
            for mat in MATRICES:
                key = f"L{l}.E{e}.{mat}"
                rows, n_in = sizes.shape(mat)
                need(f"{key}.lo", numel=sizes.matrix_bytes("lo", mat))
                if m.hi_fmt is not None:
                    need(f"{key}.hi", numel=sizes.matrix_bytes("hi", mat))
                if m.rank:
                    need(f"{key}.A16", shape=(rows, m.rank))
                    need(f"{key}.B16", shape=(m.rank, n_in))
                    a8, b8 = sizes.int8_factor_bytes(mat)
                    need(f"{key}.A8", numel=a8)
                    need(f"{key}.B8", numel=b8)


def open_store(path: str | os.PathLike, *, expect_source: str | None = None,
               expect_fmt: QuantFormat | None = None, expect_rank: int | None = None,
               expect_shape: tuple[int, int, int] | None = None, verify: bool = True) -> ExpertStore:
    """Open and verify a store; refuse (StoreError) anything that is not exactly what was written,
    or not what the caller expects: `expect_shape` is (experts, hidden, intermediate)."""
    folder = Path(path)
    manifest_path, tensors_path = folder / MANIFEST, folder / TENSORS
    clean_stale_temps(folder)
    if not manifest_path.is_file():
        raise StoreError(f"no expert store at {folder}: {MANIFEST} is missing")
    try:
        raw = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"{manifest_path} is corrupted (not valid JSON: {exc})") from None
    manifest = StoreManifest.from_json(raw, manifest_path)
    if not tensors_path.is_file():
        raise StoreError(f"{tensors_path} is missing")
    size = tensors_path.stat().st_size
    if size != manifest.tensors_bytes:
        raise StoreError(f"{tensors_path} has {size} bytes, the manifest says {manifest.tensors_bytes}: "
                         f"truncated or replaced; rebuild the store")
    if verify:
        digest = _sha256(tensors_path)
        if digest != manifest.content_sha256:
            raise StoreError(f"{tensors_path} has SHA-256 {digest[:16]}..., the manifest says "
                             f"{manifest.content_sha256[:16]}...: corrupted; rebuild the store")
    _check_tensors(folder, manifest)
    if expect_source is not None and manifest.source != expect_source:
        raise StoreError(f"store {folder} was built from {manifest.source!r}, not {expect_source!r}: "
                         f"stale; rebuild the store")
    if expect_fmt is not None and manifest.fmt != expect_fmt:
        raise StoreError(f"store {folder} holds {manifest.fmt} experts, not {expect_fmt}")
    if expect_rank is not None and manifest.rank != expect_rank:
        raise StoreError(f"store {folder} holds rank-{manifest.rank} compensators, not rank {expect_rank}")
    got_shape = (manifest.experts, manifest.hidden, manifest.intermediate)
    if expect_shape is not None and got_shape != tuple(expect_shape):
        raise StoreError(f"store {folder} holds (experts, hidden, intermediate) {got_shape}, not {tuple(expect_shape)}")
    return ExpertStore(folder, manifest)
