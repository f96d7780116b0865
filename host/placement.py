"""Where each expert task of a layer runs: its low-bit GEMM on the GPU (cached, or fetched over
the link) or on the NDP in place, and its compensation on the GPU (fp16 factors, fetched unless
cached) or on the NDP (int8 factors in place).

"auto" balances the layer's resources: tasks are taken largest first and each gets the option
that least raises the layer's modeled time (the longest of link, NDP, GPU, plus round-trip
latency: the performance model's TimeModel, the one the layer time is read from), the LPT rule
for parallel machines. Cached weights always run on the GPU (nothing is cheaper). The forced
modes exist for tests and co-simulation.
"""
from __future__ import annotations

from typing import NamedTuple

from .perf_model import ZERO_SECONDS, ResourceSeconds, TimeModel, Usage, task_usage
from .presets import SystemPreset
from .sizes import ExpertSizes

PLACEMENTS = ("auto", "all-gpu", "all-ndp", "ndp-gemm", "ndp-comp")
_PLACED_MAX = 1 << 16          # remembered candidate sequences (Placer.place); cleared when full


class Candidate(NamedTuple):
    """An expert task before placement. (NamedTuples here, not dataclasses: the planner makes and
    hashes thousands per second and the goal is < 50 us per token per layer.)"""
    expert: int
    variant: str
    tokens: int
    comp_rank: int
    weights_cached: bool
    cached_factor_rank: int         # of its factors, cached (the planner caps it at comp_rank)


class Choice(NamedTuple):
    gemm_unit: str
    comp_unit: str | None
    fetch_weights: bool
    fetch_factor_ranks: int


class Placer:
    def __init__(self, sizes: ExpertSizes, system: SystemPreset | None, mode: str = "auto"):
        if mode not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, not {mode!r}")
        has_ndp = system is not None and system.ndp is not None
        if mode != "all-gpu" and mode != "auto" and not has_ndp:
            raise ValueError(f"placement {mode!r} needs a system with an NDP unit")
        self.sizes, self.system, self.mode = sizes, system, mode
        self.time_model = TimeModel(system) if system is not None else None
        self._memo: dict[tuple, tuple[Usage, tuple[float, ...]]] = {}
        self._options: dict[tuple, list[Choice]] = {}
        self._placed: dict[tuple, tuple] = {}
        self._by_order: dict[tuple, tuple] = {}       # candidates in LPT order -> Placer._weigh_in_order
        self._kinds: dict[tuple, tuple] = {}          # candidate without its expert -> Placer._weighed
        self.ndp_variants = set()
        if has_ndp:
            for v in ("lo", "hi"):
                try:
                    sizes.ndp_steps(v, 1, True, 0)
                    self.ndp_variants.add(v)
                except ValueError:
                    pass
            self.ndp_comp = sizes.stored_rank > 0 and self._ndp_comp_fits()
        else:
            self.ndp_comp = False
        if mode in ("all-ndp", "ndp-gemm") and "lo" not in self.ndp_variants:
            raise ValueError(f"placement {mode!r}: the NDP configuration cannot run these experts")
        if mode in ("all-ndp", "ndp-comp") and sizes.stored_rank and not self.ndp_comp:
            raise ValueError(f"placement {mode!r}: the NDP configuration cannot run the int8 factors")

    def _ndp_comp_fits(self) -> bool:
        try:
            self.sizes.ndp_steps("lo", 1, False, self.sizes.stored_rank)
            return True
        except ValueError:
            return False

    def _entry(self, c: Candidate, ch: Choice) -> tuple[Usage, tuple[float, ...]]:
        key = (c.variant, c.tokens, c.comp_rank, ch)
        hit = self._memo.get(key)
        if hit is None:
            u = task_usage(self.sizes, self.system, c.variant, c.tokens, ch.gemm_unit, ch.comp_unit,
                           c.comp_rank, ch.fetch_weights, ch.fetch_factor_ranks)
            hit = self._memo[key] = (u, self._seconds(u))
        return hit

    def _seconds(self, u: Usage) -> tuple[float, ...]:
        """The time model's seconds per resource (to GPU, to memory, NDP compute, NDP memory, GPU,
        latency) and the busiest of the first five (the option's cost on its own, for ordering)."""
        r: ResourceSeconds = self.time_model.seconds(u) if self.time_model is not None else ZERO_SECONDS
        return (*r, r.busiest)

    def usage(self, c: Candidate, ch: Choice) -> Usage:
        return self._entry(c, ch)[0]

    def options(self, c: Candidate) -> list[Choice]:
        fetch_f = c.comp_rank - c.cached_factor_rank if c.comp_rank > c.cached_factor_rank else 0
        key = (c.variant, c.weights_cached, c.comp_rank, fetch_f)
        opts = self._options.get(key)
        if opts is None:
            mode = self.mode
            if mode == "auto":
                gemms = ["gpu"] if c.weights_cached or c.variant not in self.ndp_variants else ["gpu", "ndp"]
                comps = [None] if not c.comp_rank else (["gpu", "ndp"] if self.ndp_comp else ["gpu"])
            else:
                gemm_ndp = mode in ("all-ndp", "ndp-gemm") and c.variant in self.ndp_variants
                gemms = ["ndp" if gemm_ndp else "gpu"]
                comps = [None] if not c.comp_rank else ["ndp" if mode in ("all-ndp", "ndp-comp") else "gpu"]
            opts = self._options[key] = [Choice(g, k, g == "gpu" and not c.weights_cached,
                                                fetch_f if k == "gpu" else 0) for g in gemms for k in comps]
        return opts

    def place(self, cands: list[Candidate], with_load: bool = False, key: tuple | None = None
              ) -> tuple[list[Choice], list[Usage], list[float] | None]:
        """A choice and its usage per candidate (same order), and, when asked or when options
        had to be weighed, the layer's resource seconds (to GPU, to memory, NDP compute, NDP
        memory, GPU, latency).

        Placement reads only what a candidate is, not which expert: (variant, tokens, rank,
        cached weights, cached factor rank). Layers of a decode repeat the same few sequences of
        these, so each sequence is placed once and remembered (the same choices, in less time).
        `key`: that sequence, when the caller has built it already."""
        if key is None:
            key = tuple([c[1:] for c in cands])
        hit = self._placed.get(key)
        if hit is None:
            if len(self._placed) >= _PLACED_MAX:
                self._placed.clear()
            hit = self._placed[key] = self._place(cands, self._by_order)
        out, usages, load, weighed = hit
        return list(out), list(usages), (list(load) if with_load or weighed else None)

    def _weighed(self, c: Candidate) -> tuple[list[Choice], list[tuple[Usage, tuple[float, ...]]], float]:
        """A candidate's options, their (usage, seconds) and the cheapest one's busiest resource,
        once per kind of candidate (what placement reads of it)."""
        sig = c[1:]
        hit = self._kinds.get(sig)
        if hit is None:
            opts = self.options(c)
            entries = [self._entry(c, ch) for ch in opts]
            hit = self._kinds[sig] = (opts, entries, min(sec[6] for _, sec in entries))
        return hit

    def _place(self, cands: list[Candidate], by_order: dict | None = None) -> tuple[tuple, tuple, tuple, bool]:
        """(choices, usages, resource seconds, whether options were weighed): the LPT rule.

        Tasks are weighed in LPT order (largest first, ties in the given order), and what each gets
        depends only on the candidates in that order: `by_order` remembers the outcome per ordered
        sequence, which layers share more often than the sequence in slot order. (None: weigh.)"""
        weighed = [self._weighed(c) for c in cands]
        if all(len(w[0]) == 1 for w in weighed):
            out = [w[0][0] for w in weighed]
            entries = [w[1][0] for w in weighed]
            load = [sum(sec[r] for _, sec in entries) for r in range(5)]
            load.append(max((sec[5] for _, sec in entries), default=0.0))
            return tuple(out), tuple(u for u, _ in entries), tuple(load), False
        order = sorted(range(len(cands)), key=[-w[2] for w in weighed].__getitem__)
        if by_order is None:
            picks, load = self._weigh_in_order([weighed[i] for i in order])
        else:
            key = tuple([cands[i][1:] for i in order])
            hit = by_order.get(key)
            if hit is None:
                if len(by_order) >= _PLACED_MAX:
                    by_order.clear()
                hit = by_order[key] = self._weigh_in_order([weighed[i] for i in order])
            picks, load = hit
        out: list[Choice | None] = [None] * len(cands)
        usages: list[Usage | None] = [None] * len(cands)
        for i, (choice, u) in zip(order, picks):
            out[i], usages[i] = choice, u
        return tuple(out), tuple(usages), load, True

    @staticmethod
    def _weigh_in_order(weighed: list) -> tuple[list[tuple[Choice, Usage]], tuple[float, ...]]:
        """Each task in turn gets the option that least raises the layer's modeled time so far
        (then the least total seconds; then the first): (choice, usage) per task and the load."""
        picks = []
        l0 = l1 = l2 = l3 = l4 = lat = 0.0
        for opts, options, _ in weighed:
            best, best_key = 0, None
            for j, (_, s) in enumerate(options if len(options) > 1 else ()):    # one option: nothing to weigh
                a, b, c, d, g = l0 + s[0], l1 + s[1], l2 + s[2], l3 + s[3], l4 + s[4]
                key = (max(a, b, c, d, g) + (lat if lat > s[5] else s[5]), a + b + c + d + g)
                if best_key is None or key < best_key:
                    best, best_key = j, key
            u, s = options[best]
            l0, l1, l2, l3, l4 = l0 + s[0], l1 + s[1], l2 + s[2], l3 + s[3], l4 + s[4]
            lat = lat if lat > s[5] else s[5]
            picks.append((opts[best], u))
        return picks, (l0, l1, l2, l3, l4, lat)
