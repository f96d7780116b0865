"""Next-layer expert prefetch (host/prefetch.py) on the reduced default model of test_generate.py
(two MoE layers through the runtime: layer 0 guesses layer 1).

- Prefetch only moves bytes earlier: with it on, every logit is bit-identical to the run without
  it, and so are the plans' bytes, the cache's contents and counters; some fetches were staged,
  so the path was taken.
- Its accounting adds up: staged = used + wasted; fetches on demand = fetches - staged ones.
- A random policy's draws are not consumed by the guess.
- On CUDA (marked gpu, skipped without one) the side-stream copies give the same tensors and the
  same tokens.
"""
from dataclasses import replace

import pytest
import torch

from ndpmoe.host.generate import GenerateOptions, ModelSpec, generate, load_model
from ndpmoe.host.generate_report import format_report
from ndpmoe.host.generate_store import model_store, store_study
from ndpmoe.host.backends import TorchGpuBackend
from ndpmoe.host.cache import ExpertCache
from ndpmoe.host.execute import LayerExecutor
from ndpmoe.host.prefetch import NextLayerPrefetcher, SideStreamCopier, _Guess, prefetch_enabled

SPEC = ModelSpec("default", (0, 1), moefy_calib_tokens=1024)      # as tests/test_generate.py
BASE = GenerateOptions(prompt="The Python language reference says that", max_new_tokens=4, model=SPEC,
                       calib_tokens=1024, ndp="none", placement="all-gpu", cache_mb=0.3, stop_at_eos=False,
                       verify_plans=True)


@pytest.fixture(scope="module")
def dm():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    dm = load_model(SPEC)
    study = store_study(dm, BASE.store_settings(), [0, 1])
    for opts in (BASE, replace(BASE, ndp="golden")):
        model_store(dm, opts.store_settings(), layers=[0, 1], name=SPEC.describe(), study=study, log=lambda m: None)
    yield dm
    torch.set_num_threads(before)


def _pair(dm, opts):
    off = generate(replace(opts, prefetch="off"), dm, keep_logits=True, log=lambda m: None)
    on = generate(replace(opts, prefetch="on"), dm, keep_logits=True, log=lambda m: None)
    return off, on


def _same_run(off, on):
    assert on.tokens == off.tokens
    assert all(torch.equal(a, b) for a, b in zip(on.logits, off.logits))       # bit-identical
    assert on.cache == off.cache                                               # contents, hits, evictions
    for a, b in zip(on.steps, off.steps):
        assert a.link_planned == b.link_planned and a.link_executed == b.link_executed
        assert a.link_planned == a.link_executed and a.unplanned_uploads == 0
        assert a.fetches == b.fetches and b.staged_fetches == 0


@pytest.mark.parametrize("policy, ndp, placement", [("top-2", "none", "all-gpu"), ("hobbit", "none", "all-gpu"),
                                                     ("budgeted:150000", "golden", "auto")])
def test_prefetch_moves_bytes_earlier_and_changes_nothing_else(dm, policy, ndp, placement):
    off, on = _pair(dm, replace(BASE, policy=policy, ndp=ndp, placement=placement))
    _same_run(off, on)
    assert off.extra["prefetch"] is None
    p = on.extra["prefetch"]
    passes = len(on.steps)
    assert p["predictions"] == passes                       # layer 0 guesses layer 1 in every pass
    assert 0 < p["predicted_selected"] <= p["selected"]
    staged = sum(s.staged_fetches for s in on.steps)
    assert staged > 0, "nothing was staged: the prefetch path did not run"
    assert p["staged_bytes"] == p["used_bytes"] + p["wasted_bytes"] and p["used_bytes"] > 0
    assert sum(s.demand_fetches for s in on.steps) == sum(s.fetches for s in off.steps) - staged
    assert sum(s.prefetch["staged_bytes"] for s in on.steps) == p["staged_bytes"]
    report = format_report(on)
    assert "next-layer prefetch: on" in report and f"{staged} of " in report
    assert "next-layer prefetch: off" in format_report(off)


def test_random_policy_draws_are_not_consumed_by_the_guess(dm):
    off, on = _pair(dm, replace(BASE, policy="random-2"))
    _same_run(off, on)


def test_staged_factors_cut_to_a_lower_rank_equal_a_fetch_of_that_rank(dm):
    """A guess that staged more factor ranks than its layer then asks for hands over exactly the
    tensors and bytes of a fetch of the lower rank; the rest counts as wasted."""
    ms = model_store(dm, BASE.store_settings(), layers=[0, 1], name=SPEC.describe(), log=lambda m: None)
    ex = LayerExecutor(ms.store, TorchGpuBackend("cpu"), ExpertCache(1 << 20))
    rank = ms.store.manifest.rank
    staged, staged_bytes = ex.load_factors(1, 3, 0, rank)
    pf = NextLayerPrefetcher(None, ex, "cpu", 1 << 20)
    pf._current = _Guess(1, frozenset({3}), factors={(1, 3, "factors"): pf._put(staged, staged_bytes, 0, rank)})
    assert pf.take_factors(1, 3, 2, rank // 2) is None                 # another starting rank: not covered
    got, nbytes = pf.take_factors(1, 3, 0, rank // 2)
    want, want_bytes = ex.load_factors(1, 3, 0, rank // 2)
    assert nbytes == want_bytes and got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) and got[k].is_contiguous() for k in want)
    assert pf.stats.used_bytes + pf.stats.wasted_bytes == pf.stats.staged_bytes == staged_bytes


def test_prefetch_mode_checked_and_resolved():
    with pytest.raises(ValueError, match=r"prefetch must be one of \('auto', 'on', 'off'\), not 'yes'"):
        generate(replace(BASE, prefetch="yes"))               # fails before any model loads
    assert prefetch_enabled("auto", "cuda") and not prefetch_enabled("auto", "cpu")
    assert prefetch_enabled("on", "cpu") and not prefetch_enabled("off", "cuda")


def test_cpu_copier_is_a_plain_synchronous_move():
    c = SideStreamCopier("cpu")
    x = {"w": torch.randn(3, 4, generator=torch.Generator().manual_seed(0))}
    dev, event, pinned = c.copy(x)
    assert c.stream is None and event is None and pinned is None and torch.equal(dev["w"], x["w"])
    c.ready(dev, event)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_side_stream_prefetch(dm):
    c = SideStreamCopier("cuda")
    x = {"a": torch.randn(256, 64, generator=torch.Generator().manual_seed(1)), "b": torch.arange(7.0)}
    dev, event, pinned = c.copy(x)
    assert event is not None and all(p.is_pinned() for p in pinned.values())
    c.ready(dev, event)
    assert all(torch.equal(dev[k].cpu(), x[k]) for k in x)
    off, on = _pair(dm, replace(BASE, policy="top-2", device="cuda"))
    assert on.tokens == off.tokens and all(torch.equal(a, b) for a, b in zip(on.logits, off.logits))
    assert sum(s.staged_fetches for s in on.steps) > 0
