"""GPU expert cache with a capacity in bytes, hit/miss counters and a swappable eviction policy.

Entries are keyed (layer, expert, kind): kind "lo" (low-bit expert), "hi" (higher-precision copy),
"fp16" (plain fp16 expert, the baseline) or "factors" (fp16 compensation factors, cached apart
from the weights; an entry remembers its rank, and any lower rank is a prefix of it).

Policies:
- "lru": least recently used, the mixtral-offloading design. A decode step visits the layers in a
  cycle, so with a cache smaller than the working set LRU evicts exactly the layer visited next.
- "lfu": least frequently used with history (counts survive eviction) and aging (all counts halve
  every `age_every` accesses), ties broken by recency, and TinyLFU-style admission: a newcomer
  that was used less often than the entry it would evict is not admitted (it runs from a
  transient buffer). Without that admission rule a one-off expert evicts a popular one and the
  cyclic layer order makes LFU thrash like LRU.
"""
from __future__ import annotations

import heapq
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

CacheKey = tuple[int, int, str]
KINDS = ("lo", "hi", "fp16", "factors")


class LruEviction:
    name = "lru"

    def __init__(self):
        self._order: OrderedDict[CacheKey, None] = OrderedDict()

    def touched(self, key: CacheKey) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def touched_all(self, keys: list[CacheKey]) -> None:
        order = self._order
        for key in keys:
            if key in order:
                order.move_to_end(key)

    def inserted(self, key: CacheKey) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def removed(self, key: CacheKey) -> None:
        self._order.pop(key, None)

    def admit(self, key: CacheKey, victim: CacheKey) -> bool:
        return True

    def victim(self, protect: frozenset, newcomer: CacheKey) -> CacheKey | None:
        for key in self._order:
            if key not in protect and key != newcomer:
                return key
        return None


class LfuEviction:
    name = "lfu"

    def __init__(self, age_every: int = 4096):
        if isinstance(age_every, bool) or not isinstance(age_every, int) or age_every < 1:
            raise ValueError(f"age_every must be a positive integer, not {age_every!r}")
        self.age_every = age_every
        self._count: dict[CacheKey, float] = {}       # every key ever seen (history)
        self._last: dict[CacheKey, int] = {}
        self._resident: set[CacheKey] = set()
        self._heap: list[tuple[float, int, CacheKey]] = []
        self._tick = 0

    def _bump(self, key: CacheKey) -> None:
        # No heap push here: a resident key's heap item is a lower bound of its (count, tick)
        # (both only grow between agings) and victim() refreshes the items it finds stale, so the
        # victim is the same as with an item pushed on every access, at a fraction of the work.
        tick = self._tick = self._tick + 1
        counts = self._count
        count = counts.get(key)
        self._last[key] = tick
        if count is None:
            counts[key] = 1.0
            if key in self._resident:          # resident uncounted: victim() had dropped its item
                heapq.heappush(self._heap, (1.0, tick, key))
        else:
            counts[key] = count + 1.0
        if tick % self.age_every == 0:
            self._count = {k: c / 2 for k, c in counts.items() if c >= 0.5 or k in self._resident}
            self._heap = [(self._count[k], self._last[k], k) for k in self._resident]
            heapq.heapify(self._heap)

    touched = _bump

    def touched_all(self, keys: list[CacheKey]) -> None:
        """`touched` for each key in order (the planner's per-layer accesses, in one call; a
        subclass that changes `touched` changes this too)."""
        counts, lasts, resident, every = self._count, self._last, self._resident, self.age_every
        tick = self._tick
        for key in keys:
            tick += 1
            count = counts.get(key)
            lasts[key] = tick
            if count is None:
                counts[key] = 1.0
                if key in resident:
                    heapq.heappush(self._heap, (1.0, tick, key))
            else:
                counts[key] = count + 1.0
            if tick % every == 0:
                self._count = {k: c / 2 for k, c in counts.items() if c >= 0.5 or k in resident}
                self._heap = [(self._count[k], lasts[k], k) for k in resident]
                heapq.heapify(self._heap)
                counts = self._count
        self._tick = tick

    def inserted(self, key: CacheKey) -> None:
        self._resident.add(key)
        heapq.heappush(self._heap, (self._count.get(key, 0.0), self._last.get(key, self._tick), key))

    def removed(self, key: CacheKey) -> None:
        self._resident.discard(key)            # its heap items go stale and are skipped

    def admit(self, key: CacheKey, victim: CacheKey) -> bool:
        return self._count.get(key, 0.0) >= self._count.get(victim, 0.0)

    def victim(self, protect: frozenset, newcomer: CacheKey) -> CacheKey | None:
        """The resident key with the least (count, last access), neither protected nor the newcomer.
        (A resident key that was never accessed has no count and is never chosen.)"""
        skipped, found = [], None
        heap, resident, counts, lasts = self._heap, self._resident, self._count, self._last
        while heap:
            count, last, key = heap[0]
            if key not in resident:
                heapq.heappop(heap)             # evicted
                continue
            now = counts.get(key)
            if now is None:
                heapq.heappop(heap)
                continue
            if count != now or last != lasts.get(key, last):
                heapq.heapreplace(heap, (now, lasts.get(key, last), key))    # accessed since: refresh
                continue
            if key in protect or key == newcomer:
                skipped.append(heapq.heappop(heap))
                continue
            found = key
            break
        for item in skipped:
            heapq.heappush(heap, item)
        return found


EVICTIONS = {"lru": LruEviction, "lfu": LfuEviction}


def make_eviction(name: str):
    try:
        return EVICTIONS[name]()
    except KeyError:
        raise ValueError(f"unknown cache policy {name!r}; expected one of {sorted(EVICTIONS)}") from None


@dataclass
class CacheStats:
    hits: Counter = field(default_factory=Counter)          # per kind
    misses: Counter = field(default_factory=Counter)
    evictions: Counter = field(default_factory=Counter)
    inserted_bytes: Counter = field(default_factory=Counter)

    def hit_rate(self, kind: str) -> float:
        total = self.hits[kind] + self.misses[kind]
        return self.hits[kind] / total if total else 0.0

    def to_json(self) -> dict:
        return {name: dict(getattr(self, name)) for name in ("hits", "misses", "evictions", "inserted_bytes")}


class ExpertCache:
    """Byte-capacity cache of expert data on the GPU (bookkeeping only; backends hold tensors)."""

    def __init__(self, capacity_bytes: int, eviction: str | LruEviction | LfuEviction = "lru",
                 min_entry_bytes: int = 0):
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be a non-negative integer, not {capacity_bytes!r}")
        if capacity_bytes < min_entry_bytes:
            raise ValueError(f"cache capacity {capacity_bytes} bytes is smaller than one expert "
                             f"({min_entry_bytes} bytes)")
        self.capacity_bytes = capacity_bytes
        self.eviction = make_eviction(eviction) if isinstance(eviction, str) else eviction
        self.used_bytes = 0
        self.stats = CacheStats()
        self._entries: dict[CacheKey, tuple[int, int]] = {}     # key -> (bytes, rank)

    def __contains__(self, key: CacheKey) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> dict[CacheKey, tuple[int, int]]:
        """key -> (bytes, rank) of what is resident: read it, never write it (insert/evict do)."""
        return self._entries

    def keys(self) -> list[CacheKey]:
        return list(self._entries)

    def cached_rank(self, layer: int, expert: int) -> int:
        """Rank of the factors cached for an expert (0 if none)."""
        entry = self._entries.get((layer, expert, "factors"))
        return entry[1] if entry is not None else 0

    def holds(self, layer: int, kind: str, expert: int) -> bool:
        """Uncounted: is (layer, expert, kind) resident? (Argument order for functools.partial.)"""
        return (layer, expert, kind) in self._entries

    def lookup(self, key: CacheKey, rank: int = 0) -> bool:
        """Counted access: a hit if resident (for factors: at `rank` or more)."""
        entry = self._entries.get(key)
        hit = entry is not None and entry[1] >= rank
        (self.stats.hits if hit else self.stats.misses)[key[2]] += 1
        self.eviction.touched(key)
        return hit

    def lookup_all(self, keys: list[CacheKey], ranks: list[int]) -> None:
        """Counted accesses of each key in order, as `lookup(key, rank)` one by one (results unused:
        the planner has read the entries already; this counts hits and recency)."""
        entries, hits, misses = self._entries, [], []
        for key, rank in zip(keys, ranks):
            entry = entries.get(key)
            (hits if entry is not None and entry[1] >= rank else misses).append(key[2])
        if hits:
            self.stats.hits.update(hits)
        if misses:
            self.stats.misses.update(misses)
        touched_all = getattr(self.eviction, "touched_all", None)
        if touched_all is not None:
            touched_all(keys)
        else:
            for key in keys:
                self.eviction.touched(key)

    def insert(self, key: CacheKey, nbytes: int, rank: int = 0,
               protect: frozenset = frozenset()) -> tuple[bool, list[CacheKey]]:
        """Make `key` resident with `nbytes` (growing an entry of the same key), evicting others
        but never those in `protect`, if the policy admits it. Returns (admitted, evicted keys).
        When it cannot be admitted after some evictions (only protected entries left, or the
        policy refuses it against a later victim), those evictions stand: they were not in use."""
        kind = key[2]
        if kind not in KINDS:
            raise ValueError(f"cache entry kind must be one of {KINDS}, not {kind!r}")
        entries = self._entries
        old = entries.get(key)
        size = nbytes if old is None or nbytes > old[0] else old[0]
        need = size - (old[0] if old is not None else 0)
        evicted: list[CacheKey] = []
        if size > self.capacity_bytes:
            return False, evicted
        if self.used_bytes + need > self.capacity_bytes:
            eviction = self.eviction
            while self.used_bytes + need > self.capacity_bytes:
                victim = eviction.victim(protect, key)
                if victim is None or not eviction.admit(key, victim):
                    return False, evicted
                self._remove(victim)
                self.stats.evictions[victim[2]] += 1
                evicted.append(victim)
        if old is None:
            self.eviction.inserted(key)
        entries[key] = (size, rank if old is None or rank > old[1] else old[1])
        self.used_bytes += need
        self.stats.inserted_bytes[kind] += need
        return True, evicted

    def _remove(self, key: CacheKey) -> None:
        self.used_bytes -= self._entries.pop(key)[0]
        self.eviction.removed(key)

    def evict(self, key: CacheKey) -> None:
        if key in self._entries:
            self._remove(key)
