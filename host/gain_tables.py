"""Measured gain tables kept with an expert store: what the `gain-budget` policy decides by.

For every store layer, expert e and option o (host/budget_policy.py: nothing, a rank-r prefix of
the compensator at each factor precision the store holds, the store's higher-precision copy):
gain[e, o], the measured drop of the expert's output squared error on calibration rows routed to
it, and cost[o], the bytes the option moves beyond the low-bit expert (exact, from the store's
sizes); plus the router-weight exponent fitted on the same rows. Measured by the accuracy
study's own code (budget_study.measure_tables) on the store's own bytes: its low-bit experts, its
fp16 and packed low-bit factors and its copies, as the runtime runs them.

Saved as one sealed file in the store folder (store.attach_gain_tables: written atomically, then
named by the manifest with its size and SHA-256). Its metadata holds a key of the store it was
measured on (content SHA-256, formats, rank, factor bits, shapes) and of the code that measured
it: tables of another store, or measured by other code, are refused when read, never used.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ndpmoe.model.integrity import code_digest, read_sealed
from ndpmoe.model.errors import CacheEntryError
from ndpmoe.model.moe_quant import MATRICES, QuantizedExpert, QuantizedMoE

from .budget_policy import COPY_BITS, Option, OptionTable, option_list
from .budget_study import measure_tables, option_costs
from .sizes import ExpertSizes
from .store import ExpertStore, StoreError, attach_gain_tables

KIND = "ndpmoe-gain-tables"
_CODE = ("host/budget_study.py", "host/budget_policy.py", "host/gain_tables.py", "model/moe_quant.py",
         "model/moe.py", "model/factor_quant.py")
BUILD_HINT = ("measure them once with `ndpmoe generate --policy gain-budget:BYTES` and this store's settings (it "
              "adds them to the store: about 4 s per MoE layer), or ndpmoe.host.gain_tables.add_gain_tables")


def store_key(store: ExpertStore) -> dict:
    """What tables measured on `store` are valid for: its content and format, and this code."""
    m = store.manifest
    return {"store_sha256": m.content_sha256, "quant_format": str(m.fmt), "hi_format": str(m.hi_fmt),
            "rank": m.rank, "factor_bits": list(m.factor_bits), "layers": m.layers, "experts": m.experts,
            "hidden": m.hidden, "intermediate": m.intermediate, "code": code_digest(_CODE)}


@dataclass(frozen=True, eq=False)
class GainTables:
    """Every layer's measured gains over the store's options (module text)."""
    options: tuple[Option, ...]
    cost: tuple[float, ...]                  # bytes beyond the low-bit expert, per option
    gain: dict[int, torch.Tensor]            # store layer -> [E, O]
    weight_power: float                      # the fitted exponent of the router weight
    fit: dict                                # budget_study.weight_exponent's report
    seconds: float = 0.0

    def columns(self, precision: str, hi_bits: int | None) -> list[int]:
        """The options a run executes: nothing, ranks at its factor precision, its copy."""
        have = sorted({o.precision for o in self.options if o.kind == "factors"})
        if precision not in have:
            raise ValueError(f"the gain tables hold factor precisions {have}, not {precision!r}")
        return [i for i, o in enumerate(self.options)
                if o.kind == "none" or (o.kind == "factors" and o.precision == precision)
                or (o.kind == "copy" and o.bits == hi_bits)]

    def table(self, layer: int, precision: str, hi_bits: int | None) -> OptionTable:
        """Layer `layer`'s OptionTable over the options a run at `precision` with copies at
        `hi_bits` (None: none) executes."""
        if layer not in self.gain:
            raise ValueError(f"no gain table for store layer {layer} (tables cover {sorted(self.gain)})")
        cols = self.columns(precision, hi_bits)
        g = self.gain[layer][:, cols]
        cost = torch.tensor([self.cost[i] for i in cols], dtype=torch.float64).expand(g.shape[0], -1).clone()
        return OptionTable(tuple(self.options[i] for i in cols), cost, g)


def store_options(store: ExpertStore) -> tuple[tuple[Option, ...], list[int]]:
    """Every option the store can serve, and its bytes: rank prefixes 1..R at each of its factor
    precisions, and its higher-precision copy (when its width is one the policy knows)."""
    m = store.manifest
    copy_bits = (m.hi_fmt.bits,) if m.hi_fmt is not None and m.hi_fmt.bits in COPY_BITS else ()
    options = option_list(store.factor_precisions, m.rank, copy_bits)
    sizes = ExpertSizes(m.hidden, m.intermediate, m.fmt, None, m.rank)
    copy_sizes = {b: ExpertSizes(m.hidden, m.intermediate, m.hi_fmt, None, 0) for b in copy_bits}
    return options, option_costs(options, sizes, copy_sizes)


def store_blocks(store: ExpertStore, layer: int, weights, cfg):
    """One store layer as budget_study.measure_layer runs it: (low-bit block, {precision: block
    with those factors}, {bits: block of copies}), every tensor from the store's bytes (fp16
    factors as the GPU fetches them, packed ones dequantized)."""
    qm = store.quantized_moe(layer, weights, cfg)
    factors = {}
    for p in store.factor_precisions:
        if p == "fp16":
            factors[p] = qm
            continue
        experts = [QuantizedExpert(ex.q, {mat: store.packed_factors(layer, e, mat, p).lowrank() for mat in MATRICES},
                                   ex._deq) for e, ex in enumerate(qm.experts)]
        factors[p] = QuantizedMoE(qm.fmt, experts, qm.router, qm.cfg, qm.float_weights)
    copies = {}
    if qm.hi_experts is not None and store.hi_fmt.bits in COPY_BITS:
        copies[store.hi_fmt.bits] = QuantizedMoE(store.hi_fmt, qm.hi_experts, qm.router, qm.cfg, qm.float_weights)
    return qm, factors, copies


def measure_gain_tables(store: ExpertStore, blocks: dict, inputs: dict[int, torch.Tensor], *,
                        log=print) -> GainTables:
    """Measure every store layer's table. blocks: {store layer: (MoEWeights, RouterConfig)} of
    the model; inputs: {store layer: calibration rows [N, D]} (the float model's block inputs)."""
    if sorted(inputs) != list(range(store.manifest.layers)) or set(blocks) != set(inputs):
        raise ValueError(f"gain tables need calibration rows and weights for every store layer "
                         f"0..{store.manifest.layers - 1}, got rows for {sorted(inputs)}, weights for {sorted(blocks)}")
    if not store.rank and store.hi_fmt is None:
        raise ValueError(f"store {store.folder} has neither compensators nor copies: there is nothing to choose")
    t0 = time.time()
    options, costs = store_options(store)
    n = len(inputs)
    log(f"measuring gain tables: {len(options)} options x {store.manifest.experts} experts x {n} layers "
        f"on {inputs[0].shape[0]} calibration rows per layer")

    def progress(i, layer, seconds):
        if i == 0 or (i + 1) % 5 == 0 or i + 1 == n:
            log(f"  layer {i + 1}/{n}: {seconds:.1f} s ({time.time() - t0:.0f} s in all)")

    tables, fit = measure_tables(lambda l: store_blocks(store, l, *blocks[l]), options, costs, inputs, progress)
    log(f"  router weight: reduction ~ w^{fit['p']} x gain; {time.time() - t0:.0f} s")
    return GainTables(options, tuple(float(c) for c in costs), {l: t.gain for l, t in tables.items()},
                      float(fit["p"]), fit, time.time() - t0)


def add_gain_tables(store: ExpertStore, blocks: dict, inputs: dict[int, torch.Tensor], *,
                    log=print) -> tuple[ExpertStore, GainTables]:
    """Measure the tables and add them to the store (atomically). Returns the reopened store."""
    tables = measure_gain_tables(store, blocks, inputs, log=log)
    tensors = {f"L{l}.gain": g.double().contiguous() for l, g in tables.gain.items()}
    tensors["cost"] = torch.tensor(tables.cost, dtype=torch.float64)
    meta = {"key": store_key(store), "options": [o.label for o in tables.options],
            "weight_power": tables.weight_power, "fit": tables.fit, "seconds": round(tables.seconds, 1),
            "calib_rows": int(inputs[0].shape[0])}
    return attach_gain_tables(store, tensors, KIND, meta), tables


def load_gain_tables(store: ExpertStore) -> GainTables:
    """The store's gain tables, checked: named by its manifest, intact, and measured on this very
    store by this code. StoreError (saying how to build them) otherwise."""
    path = store.gain_table_file(BUILD_HINT)
    try:
        tensors, meta = read_sealed(path, KIND)
    except CacheEntryError as exc:
        raise StoreError(f"{exc}; {BUILD_HINT}") from None
    want = store_key(store)
    got = meta.get("key", {})
    if got != want:
        diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        raise StoreError(f"{path} was measured for another store or by other code ({', '.join(diff)} differ: "
                         + "; ".join(f"{k} {got.get(k)!r} there, {want.get(k)!r} here" for k in diff[:3])
                         + f"): stale; {BUILD_HINT}")
    options, costs = store_options(store)
    if meta.get("options") != [o.label for o in options] or tensors["cost"].tolist() != [float(c) for c in costs]:
        raise StoreError(f"{path} lists options {meta.get('options')} with costs {tensors['cost'].tolist()}, "
                         f"this store serves {[o.label for o in options]}: stale; {BUILD_HINT}")
    shape = (store.manifest.experts, len(options))
    gain = {l: tensors.get(f"L{l}.gain") for l in range(store.manifest.layers)}
    bad = [l for l, g in gain.items() if g is None or tuple(g.shape) != shape]
    if bad:
        raise StoreError(f"{path} has no [{shape[0]}, {shape[1]}] gain table for layers {bad}: stale; {BUILD_HINT}")
    return GainTables(options, tuple(costs), gain, float(meta["weight_power"]), meta["fit"], float(meta["seconds"]))


def ensure_gain_tables(store: ExpertStore, make_study, blocks: dict, model_layers: list[int], *,
                       log=print) -> ExpertStore:
    """The store with valid gain tables: as it is if it holds them, else with them measured on
    the calibration rows of `make_study()` (generate_store.store_study) and added.
    model_layers[i]: the model layer of store layer i (the study's rows are keyed by model layer)."""
    try:
        load_gain_tables(store)
        return store
    except StoreError as exc:
        reason = "none yet" if store.manifest.gain_tables is None else str(exc).split(";")[0]
    log(f"the store's gain tables: {reason}")
    study = make_study()
    inputs = {i: study.calib_inputs[l] for i, l in enumerate(model_layers)}
    return add_gain_tables(store, blocks, inputs, log=log)[0]
