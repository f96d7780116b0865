"""Expert store on disk: every MoE layer's packed low-bit experts, their compensators (fp16 for the
GPU, int8 for the NDP, and optionally packed low-bit factors both units read), optional
higher-precision copies and measured sensitivities, in one safetensors file plus a versioned JSON
manifest.

Layout of a store folder::

    manifest.json          format version, formats, shapes, ranks, factor bits, source, size and
                           SHA-256 of
    experts.safetensors    L{l}.E{e}.{w1|w3|w2}.{lo|hi|A16|B16|A8|B8|spectrum},
                           L{l}.E{e}.{w1|w3|w2}.{Bq|Atq|Aq|spectrum_q}{b} for each factor bit width b,
                           L{l}.exp [E, 3, 4] int32 scale_exp of (lo, hi, A8, B8),
                           L{l}.qexp [E, 3, len(factor_bits), 2] int32 scale_exp of (Bq, Atq),
                           L{l}.rank_gain [E, R + 1], L{l}.hi_gain [E]
    gain_tables.safetensors  (optional, added later) measured option gains per layer, the
                           decisions of the `gain-budget` policy (host/gain_tables.py); the
                           manifest names it with its size and SHA-256

Low-bit factors (model/factor_quant.py), b in factor_bits: Bq = B [R, in] and Atq = A^T [R, out],
packed rows best-first (a rank-r prefix is a byte prefix of each image: what the GPU fetches and
dequantizes, and B's rows are what the NDP multiplies), and Aq = A [out, roundup(R, 32)] with
A^T's codes transposed (what the NDP multiplies; factor_quant.ndp_a_image, scale_exp 0).

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
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ndpmoe.model.compensate import Int8LowRank, LowRank, quantize_int8_symmetric
from ndpmoe.model.contract import NdpConfig, QuantFormat
from ndpmoe.model.errors import CacheEntryError
from ndpmoe.model.factor_quant import FACTOR_BITS, QuantLowRank, factor_bits as precision_bits, fit_quantized, ndp_a_image
from ndpmoe.model.integrity import canonical_json, clean_stale_temps, temp_path
from ndpmoe.model.moe import MoEWeights, RouterConfig
from ndpmoe.model.moe_quant import MATRICES, QuantizedExpert, QuantizedMoE
from ndpmoe.model.qtensor import QuantizedMatrix

from .sensitivity import LayerSensitivity, measure_sensitivity
from .sizes import ExpertSizes

STORE_FORMAT_VERSION = 3              # 3: packed low-bit factors (factor_bits); 2: manifest self-hash
READABLE_VERSIONS = (2, 3)            # a version-2 store is a version-3 one without low-bit factors
STORE_KIND = "ndpmoe-expert-store"
MANIFEST = "manifest.json"
TENSORS = "experts.safetensors"
GAIN_TABLES = "gain_tables.safetensors"
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
    factor_bits: tuple[int, ...] = ()   # bit widths of the packed low-bit factors it holds
    gain_tables: dict | None = None     # {"file", "bytes", "sha256"} of its gain tables, if measured

    def to_json(self) -> dict:
        fields = {"kind": STORE_KIND, "format_version": self.version, "quant_format": _fmt_dict(self.fmt),
                  "hi_format": _fmt_dict(self.hi_fmt), "layers": self.layers, "experts": self.experts,
                  "hidden": self.hidden, "intermediate": self.intermediate, "rank": self.rank,
                  "source": self.source, "tensors_file": TENSORS, "tensors_bytes": self.tensors_bytes,
                  "content_sha256": self.content_sha256}
        if self.version >= 3:
            fields["factor_bits"] = list(self.factor_bits)
        if self.gain_tables is not None:
            fields["gain_tables"] = dict(self.gain_tables)
        return fields | {"manifest_sha256": _manifest_hash(fields)}

    @classmethod
    def from_json(cls, d: dict, where: Path) -> "StoreManifest":
        if not isinstance(d, dict) or d.get("kind") != STORE_KIND:
            raise StoreError(f"{where} is not an ndpmoe expert store manifest")
        version = d.get("format_version")
        if version not in READABLE_VERSIONS:
            raise StoreError(f"{where} has store format version {version!r}; this runtime reads versions "
                             f"{READABLE_VERSIONS}: rebuild the store")
        fields = {k: v for k, v in d.items() if k != "manifest_sha256"}
        if d.get("manifest_sha256") != _manifest_hash(fields):
            raise StoreError(f"{where} is corrupted: its fields do not match its manifest_sha256 (edited or "
                             f"damaged); rebuild the store")
        try:
            bits = tuple(int(b) for b in d["factor_bits"]) if version >= 3 else ()
            if len(set(bits)) != len(bits) or any(b not in FACTOR_BITS for b in bits):
                raise ValueError(f"factor_bits {bits} are not distinct widths from {FACTOR_BITS}")
            gains = d.get("gain_tables")
            if gains is not None:
                gains = {"file": str(gains["file"]), "bytes": int(gains["bytes"]), "sha256": str(gains["sha256"])}
                if gains["file"] != GAIN_TABLES:
                    raise ValueError(f"gain_tables names {gains['file']!r}, not {GAIN_TABLES!r}")
            return cls(version, _fmt_from(d["quant_format"]), _fmt_from(d["hi_format"]), int(d["layers"]),
                       int(d["experts"]), int(d["hidden"]), int(d["intermediate"]), int(d["rank"]),
                       str(d["source"]), int(d["tensors_bytes"]), str(d["content_sha256"]), bits, gains)
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


def check_factor_bits(factor_bits, rank: int) -> tuple[int, ...]:
    bits = tuple(factor_bits) if isinstance(factor_bits, (tuple, list)) else None
    if bits is None or len(set(bits)) != len(bits) or any(b not in FACTOR_BITS for b in bits):
        raise ValueError(f"factor_bits must be distinct bit widths from {FACTOR_BITS}, not {factor_bits!r}")
    if bits and not rank:
        raise ValueError(f"factor_bits {bits} need compensators, but the layers have rank 0")
    return bits


def _write_packed_factors(tensors: dict, layer: int, qm: QuantizedMoE, rank: int, factor_bits: tuple[int, ...],
                          grams: list[dict[str, torch.Tensor]] | None) -> torch.Tensor:
    """Fit and add one layer's low-bit factor images; returns their scale exponents [E, 3, nb, 2]."""
    if qm.float_weights is None:
        raise ValueError(f"layer {layer} has no float weights to fit low-bit factors against")
    exps = torch.zeros(qm.num_experts, len(MATRICES), len(factor_bits), 2, dtype=torch.int32)
    for e, ex in enumerate(qm.experts):
        for i, m in enumerate(MATRICES):
            err = getattr(qm.float_weights, m)[e].float() - ex.weight(m)
            h = torch.eye(err.shape[1], dtype=torch.float64) if grams is None else grams[e][m]
            key = f"L{layer}.E{e}.{m}"
            for j, b in enumerate(factor_bits):
                fq = fit_quantized(err, h, rank, b, group=qm.fmt.group_size, word_bits=qm.fmt.word_bits)
                tensors[f"{key}.Bq{b}"] = fq.B_q.to_image()
                tensors[f"{key}.Atq{b}"] = fq.At_q.to_image()
                tensors[f"{key}.Aq{b}"] = ndp_a_image(fq.At_q).to_image()
                tensors[f"{key}.spectrum_q{b}"] = fq.spectrum.float().contiguous()
                exps[e, i, j, 0], exps[e, i, j, 1] = fq.B_q.scale_exp, fq.At_q.scale_exp
    return exps


def write_store(path: str | os.PathLike, layers: list[QuantizedMoE], *, source: str,
                grams: list[list[dict[str, torch.Tensor]]] | None = None,
                sensitivity: list[LayerSensitivity] | None = None,
                factor_bits: tuple[int, ...] = ()) -> StoreManifest:
    """Write `layers` as a store folder at `path` (created if needed), atomically.

    Sensitivities are measured here unless given; pass each layer's calibration `grams` when the
    compensators were fitted activation-aware, so rank and hi-copy gains share one objective.
    `factor_bits`: also fit and store packed low-bit factors at these widths (FACTOR_BITS), each
    fitted against its own quantization on the grams (identity without: a Frobenius fit)."""
    if not isinstance(source, str) or not source:
        raise ValueError(f"source must name the checkpoint the store is built from, not {source!r}")
    rank, intermediate = _check_layers(layers)
    factor_bits = check_factor_bits(factor_bits, rank)
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
        if factor_bits:
            tensors[f"L{l}.qexp"] = _write_packed_factors(tensors, l, qm, rank, factor_bits,
                                                          None if grams is None else grams[l])
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
                                 tmp.stat().st_size, _sha256(tmp), factor_bits)
        _atomic_replace(tmp, folder / TENSORS)
        tmp_manifest.write_text(json.dumps(manifest.to_json(), indent=1) + "\n")
        _atomic_replace(tmp_manifest, folder / MANIFEST)
    finally:
        for t in (tmp, tmp_manifest):
            t.unlink(missing_ok=True)
    return manifest


def attach_gain_tables(store: "ExpertStore", tensors: dict, kind: str, meta: dict) -> "ExpertStore":
    """Add (or replace) a store's gain tables: the sealed file written atomically, then the
    manifest rewritten to name it with its size and SHA-256 (the commit point: an interruption
    before it leaves the store as it was, with its old tables or none). Returns the store reopened."""
    from ndpmoe.model.integrity import write_sealed

    folder = store.folder
    clean_stale_temps(folder)
    write_sealed(folder / GAIN_TABLES, tensors, kind, meta)
    path = folder / GAIN_TABLES
    manifest = replace(store.manifest, gain_tables={"file": GAIN_TABLES, "bytes": path.stat().st_size,
                                                    "sha256": _sha256(path)})
    tmp_manifest = temp_path(folder / MANIFEST)
    try:
        tmp_manifest.write_text(json.dumps(manifest.to_json(), indent=1) + "\n")
        _atomic_replace(tmp_manifest, folder / MANIFEST)
    finally:
        tmp_manifest.unlink(missing_ok=True)
    return ExpertStore(folder, manifest)


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

    @property
    def factor_precisions(self) -> tuple[str, ...]:
        """Compensator precisions the runtime can use from this store ('fp16' whenever rank > 0)."""
        if not self.rank:
            return ()
        return ("fp16",) + tuple(f"int{b}" for b in self.manifest.factor_bits)

    def sizes(self, ndp: NdpConfig | None = None, factor_precision: str = "fp16") -> ExpertSizes:
        m = self.manifest
        if factor_precision != "fp16":
            self._packed_bits(factor_precision)
        return ExpertSizes(m.hidden, m.intermediate, m.fmt, m.hi_fmt, m.rank, ndp, factor_precision)

    def _packed_bits(self, precision: str) -> int:
        bits = precision_bits(precision)
        if bits is None or bits not in self.manifest.factor_bits:
            raise ValueError(f"factor precision {precision!r} is not in store {self.folder.name}: it holds "
                             f"{self.factor_precisions or 'no compensators'}")
        return bits

    def _check(self, layer: int, expert: int, matrix: str) -> str:
        m = self.manifest
        if not 0 <= layer < m.layers or not 0 <= expert < m.experts or matrix not in MATRICES:
            raise ValueError(f"no (layer {layer}, expert {expert}, matrix {matrix!r}) in a store of "
                             f"{m.layers} layers x {m.experts} experts x {MATRICES}")
        return f"L{layer}.E{expert}.{matrix}"

    def tensor(self, key: str) -> torch.Tensor:
        return self._file.get_tensor(key)

    def scale_exp(self, layer: int, expert: int, matrix: str, slot: str) -> int:
        """The scale exponent of an image: slot lo, hi, A8, B8, or Bq{b}, Atq{b}, Aq{b} (always 0)."""
        if slot in _EXP_SLOTS:
            if layer not in self._exp:
                self._exp[layer] = self.tensor(f"L{layer}.exp")
            return int(self._exp[layer][expert, MATRICES.index(matrix), _EXP_SLOTS.index(slot)])
        for prefix, which in (("Bq", 0), ("Atq", 1), ("Aq", None)):
            if slot.startswith(prefix) and slot[len(prefix):].isdigit():
                bits = self._packed_bits(f"int{slot[len(prefix):]}")
                if which is None:
                    return 0
                key = ("q", layer)
                if key not in self._exp:
                    self._exp[key] = self.tensor(f"L{layer}.qexp")
                return int(self._exp[key][expert, MATRICES.index(matrix), self.manifest.factor_bits.index(bits), which])
        raise ValueError(f"unknown image slot {slot!r}; expected one of {_EXP_SLOTS} or Bq/Atq/Aq + factor bits")

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

    # -- packed low-bit factors -----------------------------------------------------------------
    def packed_factor_rows(self, layer: int, expert: int, matrix: str, precision: str, start: int, stop: int
                           ) -> tuple[QuantizedMatrix, QuantizedMatrix, int]:
        """Rank components [start, stop) of the low-bit factors as the GPU fetches them: rows of
        the B and A^T images (a byte range of each), and the bytes of those rows."""
        key = self._check(layer, expert, matrix)
        self._need_rank()
        bits = self._packed_bits(precision)
        if not 0 <= start < stop <= self.rank:
            raise ValueError(f"rank components [{start}, {stop}) are not inside the stored rank {self.rank}")
        fb, fa = self.sizes(factor_precision=precision).packed_factor_fmts(matrix)
        rows, n_in = self.sizes().shape(matrix)
        out, nbytes = [], 0
        for name, fmt, n in (("Bq", fb, n_in), ("Atq", fa, rows)):
            rb = fmt.row_bytes(n)
            part = self.tensor(f"{key}.{name}{bits}")[start * rb:stop * rb]
            nbytes += int(part.numel())
            out.append(QuantizedMatrix.from_image(part, fmt, stop - start, n,
                                                  self.scale_exp(layer, expert, matrix, f"{name}{bits}")))
        return out[0], out[1], nbytes

    def packed_factors(self, layer: int, expert: int, matrix: str, precision: str) -> QuantLowRank:
        """The whole stored low-bit compensator of a matrix, with its measured gains."""
        b, at, _ = self.packed_factor_rows(layer, expert, matrix, precision, 0, self.rank)
        bits = self._packed_bits(precision)
        return QuantLowRank(b, at, self.tensor(f"{self._check(layer, expert, matrix)}.spectrum_q{bits}"))

    def ndp_factor_images(self, layer: int, expert: int, matrix: str, precision: str
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Memory images of the (A, B) factors the NDP multiplies at `precision` (fp16: the int8 ones)."""
        if precision == "fp16":
            return self.factor_images(layer, expert, matrix)
        key = self._check(layer, expert, matrix)
        bits = self._packed_bits(precision)
        return self.tensor(f"{key}.Aq{bits}"), self.tensor(f"{key}.Bq{bits}")

    def gain_table_file(self, build_hint: str) -> Path:
        """The gain-table file the manifest names, checked against its size and SHA-256;
        StoreError (with `build_hint`: how to measure them) if there is none or it does not match."""
        named = self.manifest.gain_tables
        if named is None:
            raise StoreError(f"store {self.folder} has no gain tables; {build_hint}")
        path = self.folder / named["file"]
        if not path.is_file() or path.stat().st_size != named["bytes"] or _sha256(path) != named["sha256"]:
            raise StoreError(f"{path} is missing or is not the file {MANIFEST} names (size or SHA-256 differ); "
                             f"{build_hint}")
        return path

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

    if m.factor_bits and not m.rank:
        raise StoreError(f"{folder / MANIFEST} lists factor_bits {list(m.factor_bits)} with rank 0; rebuild the store")
    for l in range(m.layers):
        need(f"L{l}.exp", shape=(m.experts, len(MATRICES), len(_EXP_SLOTS)))
        if m.factor_bits:
            need(f"L{l}.qexp", shape=(m.experts, len(MATRICES), len(m.factor_bits), 2))
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
                for b in m.factor_bits:
                    qs = replace(sizes, factor_precision=f"int{b}")
                    fb, fa = qs.packed_factor_fmts(mat)
                    a_n, b_n = qs.ndp_factor_bytes(mat)
                    need(f"{key}.Bq{b}", numel=b_n)
                    need(f"{key}.Atq{b}", numel=m.rank * fa.row_bytes(rows))
                    need(f"{key}.Aq{b}", numel=a_n)
                    need(f"{key}.spectrum_q{b}", shape=(m.rank,))


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
