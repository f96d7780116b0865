"""The planner as it was before it was made faster, kept plain as the reference the fast one
must equal decision for decision (tests/test_plan_reference.py): the LFU policy that pushes a heap
item on every access, placement weighed afresh for every layer, the budgeted policy's loops over
every (token, slot), and plan() as one pass that counts cache accesses as it goes."""
from __future__ import annotations

import heapq

from ndpmoe.host.cache import LfuEviction
from ndpmoe.host.perf_model import Usage
from ndpmoe.host.placement import Candidate
from ndpmoe.host.plan import ExpertTask, LayerPlan, LayerPlanner
from ndpmoe.host.policy import BudgetedPolicy, Restoration, _check_ids, _unit_hull


class EagerLfu(LfuEviction):
    def _bump(self, key):
        tick = self._tick = self._tick + 1
        count = self._count[key] = self._count.get(key, 0.0) + 1.0
        self._last[key] = tick
        if key in self._resident:
            heapq.heappush(self._heap, (count, tick, key))
        if tick % self.age_every == 0:
            self._count = {k: c / 2 for k, c in self._count.items() if c >= 0.5 or k in self._resident}
            self._heap = [(self._count[k], self._last[k], k) for k in self._resident]
            heapq.heapify(self._heap)

    touched = _bump

    def victim(self, protect, newcomer):
        skipped, found = [], None
        heap, resident, counts, lasts = self._heap, self._resident, self._count, self._last
        while heap:
            count, last, key = heap[0]
            if key not in resident or count != counts.get(key) or last != lasts.get(key, last):
                heapq.heappop(heap)
                continue
            if key in protect or key == newcomer:
                skipped.append(heapq.heappop(heap))
                continue
            found = key
            break
        for item in skipped:
            heapq.heappush(heap, item)
        return found


class PlainBudgeted(BudgetedPolicy):
    def decide(self, ids, weights, ctx):
        t, k = _check_ids(ids, weights)
        sens = ctx.sensitivity
        id_rows, w_rows = ids.tolist(), weights.tolist()
        p = self.weight_power
        value = {}
        for row_ids, row_w in zip(id_rows, w_rows):
            for e, w in zip(row_ids, row_w):
                value[e] = value.get(e, 0.0) + (w * w if p == 2.0 else w ** p)
        copies = self.allow_hi and ctx.hi_extra_bytes is not None
        state, walk, heap = {}, {}, []
        for e, v in value.items():
            r0 = ctx.cached_rank(e)
            hull, ranks = _unit_hull(sens, e, min(r0, ctx.stored_rank), ctx.stored_rank, ctx.rank_bytes,
                                     ctx.hi_price(e) if copies else None, self.rank_step)
            state[e] = hull[0][2]
            walk[e] = (hull, ranks, 0, v)
            if len(hull) > 1 and v > 0:
                heapq.heappush(heap, (-v * hull[1][3], e))
        left = float(self.budget_bytes) * t
        while heap:
            _, e = heapq.heappop(heap)
            hull, ranks, i, v = walk[e]
            cost = hull[i + 1][0] - hull[i][0]
            if cost <= left:
                left -= cost
                state[e] = hull[i + 1][2]
                walk[e] = (hull, ranks, i + 1, v)
                if i + 2 < len(hull):
                    heapq.heappush(heap, (-v * hull[i + 2][3], e))
            elif hull[i][2] >= 0:
                spent, here = hull[i][0], hull[i][1]
                best = None
                for c, g, r in ranks:
                    if spent < c <= spent + left and g > here and (best is None or g > best[1]):
                        best = (c, g, r)
                if best is not None:
                    left -= best[0] - spent
                    state[e] = best[2]
        ranks_out = tuple(tuple(state[e] if state[e] > 0 else 0 for e in row) for row in id_rows)
        his = tuple(tuple(state[e] == -1 for e in row) for row in id_rows)
        return Restoration(ranks_out, his)


class PlainPlanner(LayerPlanner):
    """One pass per layer; placement weighed afresh (Placer._place, never remembered)."""

    def plan(self, layer, ids, weights):
        restoration = self.policy.decide(ids, weights, self._context(layer))
        id_rows = ids.tolist()
        lo = self.weight_variant
        groups = {}
        for t, (row, ranks, his) in enumerate(zip(id_rows, restoration.ranks, restoration.hi)):
            for s, e in enumerate(row):
                key, r = ((e, "hi"), 0) if his[s] else ((e, lo), ranks[s] if lo != "fp16" else 0)
                g = groups.setdefault(key, ([], [], []))
                g[0].append(t)
                g[1].append(s)
                g[2].append(r)
        cache, fcache, cands = self.cache, self.factor_cache, []
        for (e, variant), (toks, _, ranks) in groups.items():
            rank = max(ranks)
            cached = cache.lookup((layer, e, variant))
            if rank:
                fcache.lookup((layer, e, "factors"), rank)
            cands.append(Candidate(e, variant, len(toks), rank, cached, fcache.cached_rank(layer, e) if rank else 0))
        out, usages, load, weighed = self.placer._place(cands)
        choices, usages, load = list(out), list(usages), (list(load) if self.prefetch or weighed else None)
        protect, evictions, tasks = None, [], []
        for (toks, slots, ranks), c, ch in zip(groups.values(), cands, choices):
            if ch.fetch_weights or ch.fetch_factor_ranks:
                if protect is None:
                    protect = self._protect(layer, cands, choices)
                if ch.fetch_weights:
                    evictions += cache.insert((layer, c.expert, c.variant), self.sizes.weight_bytes(c.variant),
                                              protect=protect)[1]
                if ch.fetch_factor_ranks:
                    evictions += fcache.insert((layer, c.expert, "factors"),
                                               c.comp_rank * self.sizes.fp16_bytes_per_rank,
                                               rank=c.comp_rank, protect=protect)[1]
            tasks.append(ExpertTask(c.expert, c.variant, tuple(toks), tuple(slots), tuple(ranks), ch.gemm_unit,
                                    ch.comp_unit if c.comp_rank else None, ch.fetch_weights, ch.fetch_factor_ranks))
        prefetches = ()
        if self.prefetch:
            prefetches, fill = self._prefetch(layer, cands, choices, load, protect, evictions)
            if fill is not None:
                usages.append(fill)
        return LayerPlan(layer, id_rows, weights, restoration, tuple(tasks), prefetches, tuple(evictions),
                         tuple(usages), self.placer.time_model)

    def _prefetch(self, layer, cands, choices, load, protect, evictions):
        idle = self.placer.time_model.link_bytes(max(load[:5]) - load[0])
        credit = self._credit = min(self._credit + idle, self._credit_cap)
        if credit < self._smallest_fetch:
            return (), None
        fill, out = Usage(), []
        for c, ch in sorted(zip(cands, choices), key=lambda p: -p[0].tokens):
            nbytes = self.sizes.weight_bytes(c.variant)
            if ch.gemm_unit != "ndp" or nbytes > credit:
                continue
            if protect is None:
                protect = self._protect(layer, cands, choices)
            admitted, ev = self.cache.insert((layer, c.expert, c.variant), nbytes, protect=protect)
            if admitted:
                credit -= nbytes
                fill.link["prefetch"] += nbytes
                evictions += ev
                out.append((layer, c.expert, c.variant))
        self._credit = credit
        return tuple(out), fill
