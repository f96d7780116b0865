"""GPU expert cache: counters on scripted access sequences, both eviction policies, factor ranks."""
import pytest

from ndpmoe.host.cache import ExpertCache, LfuEviction


def _run(cache, sequence, nbytes=10):
    """Access each (layer, expert) of `sequence`; insert on a miss. Returns the hit pattern."""
    out = []
    for layer, expert in sequence:
        key = (layer, expert, "lo")
        hit = cache.lookup(key)
        if not hit:
            cache.insert(key, nbytes)
        out.append(hit)
    return out


def test_lru_scripted_sequence():
    cache = ExpertCache(30, "lru")                       # three 10-byte experts fit
    seq = [(0, 1), (0, 2), (0, 3), (0, 1), (0, 4), (0, 2), (0, 1), (0, 3)]
    # 1 2 3 miss; 1 hit; 4 miss evicts 2 (LRU); 2 miss evicts 3; 1 hit; 3 miss evicts 4.
    assert _run(cache, seq) == [False, False, False, True, False, False, True, False]
    s = cache.stats
    assert (s.hits["lo"], s.misses["lo"], s.evictions["lo"]) == (2, 6, 3)
    assert s.inserted_bytes["lo"] == 60 and cache.used_bytes == 30
    assert sorted(cache.keys()) == [(0, 1, "lo"), (0, 2, "lo"), (0, 3, "lo")]


def test_lfu_keeps_the_popular_expert_where_lru_thrashes():
    """Layers visited in a cycle with one popular expert per layer: a cache of three holds all
    popular ones under LFU; LRU always evicts the layer visited next."""
    seq = []
    for step in range(20):
        for layer in range(3):
            seq += [(layer, 0), (layer, 1 + step % 5)]
    lru, lfu = ExpertCache(30, "lru"), ExpertCache(30, "lfu")
    _run(lru, seq), _run(lfu, seq)
    assert lru.stats.hits["lo"] == 0
    # Step 0 fills the cache with what came last; in step 1 each popular expert (count 2) is
    # admitted over a one-off (count 1); from step 2 on every popular access hits.
    assert lfu.stats.hits["lo"] == 3 * 18


def test_lfu_scripted_sequence():
    cache = ExpertCache(20, LfuEviction())
    seq = [(0, 1), (0, 1), (0, 2), (0, 3), (0, 3), (0, 2), (0, 1)]
    # 1 miss, 1 hit (count 2); 2 miss; 3 miss evicts 2 (count 1 < 2; 3's count 1 >= 1 admits it);
    # 3 hit; 2 misses with count 2 (history kept): victim among {1, 3} ties at 2, the older use (1)
    # goes. Then 1 misses with count 3 and evicts the least recent of {3, 2}: 3.
    assert _run(cache, seq) == [False, True, False, False, True, False, False]
    assert sorted(cache.keys()) == [(0, 1, "lo"), (0, 2, "lo")]
    assert cache.stats.evictions["lo"] == 3


def test_lfu_refuses_a_one_off_newcomer():
    cache = ExpertCache(10, "lfu")
    _run(cache, [(0, 1), (0, 1), (0, 1)])
    assert not cache.lookup((0, 2, "lo"))
    assert cache.insert((0, 2, "lo"), 10) == (False, [])     # count 1 < 3: runs from a transient buffer
    assert cache.keys() == [(0, 1, "lo")]


def test_factor_ranks_are_prefixes():
    cache = ExpertCache(1000)
    key = (0, 4, "factors")
    assert not cache.lookup(key, 8)
    cache.insert(key, 80, rank=8)
    assert cache.cached_rank(0, 4) == 8
    assert cache.lookup(key, 4) and cache.lookup(key, 8)
    assert not cache.lookup(key, 16)                       # a higher rank is a miss ...
    cache.insert(key, 160, rank=16)                        # ... fetched as an increment
    assert cache.used_bytes == 160 and cache.stats.inserted_bytes["factors"] == 160
    assert (cache.stats.hits["factors"], cache.stats.misses["factors"]) == (2, 2)


def test_protected_entries_are_never_evicted():
    cache = ExpertCache(20)
    cache.insert((0, 1, "lo"), 10)
    cache.insert((0, 2, "lo"), 10)
    admitted, evicted = cache.insert((0, 3, "lo"), 10, protect=frozenset({(0, 1, "lo")}))
    assert admitted and evicted == [(0, 2, "lo")]
    admitted, evicted = cache.insert((0, 4, "lo"), 15, protect=frozenset({(0, 1, "lo")}))
    # It would need the protected bytes: refused; the unprotected entry went on the way.
    assert not admitted and evicted == [(0, 3, "lo")] and cache.keys() == [(0, 1, "lo")]
    assert cache.insert((0, 5, "lo"), 25) == (False, [])         # larger than the whole cache


def test_bad_capacity_and_policy():
    with pytest.raises(ValueError, match="smaller than one expert"):
        ExpertCache(100, min_entry_bytes=101)
    with pytest.raises(ValueError, match="unknown cache policy 'fifo'"):
        ExpertCache(100, "fifo")
    with pytest.raises(ValueError, match="non-negative integer, not -1"):
        ExpertCache(-1)
