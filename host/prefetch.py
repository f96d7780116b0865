"""Next-layer expert prefetch: while layer l runs, guess layer l+1's experts and copy what its plan
will fetch to the device ahead of time.

The guess applies layer l+1's router to layer l's MoE input (the hidden state the runtime holds
when layer l's router has run): the training-free speculative expert loading of Eliseev & Mazur,
"Fast Inference of Mixture-of-Experts Language Models with Offloading" (arXiv:2312.17238, the
mixtral-offloading design: the next layer's gating function on an earlier layer's hidden state);
HOBBIT's layer-level prefetch (arXiv:2411.01433) guesses from the current hidden state as well,
while Pre-gated MoE (Hwang et al., ISCA 2024) trains a gate for it, which a runtime over a given
checkpoint cannot. The residual stream changes little from one layer to the next, so the next
router on this layer's input mostly picks the experts it will pick on its own.

The guessed ids go through the planner's own `decide` (a random policy decides on a fork of its
draws, so its own draws are not consumed) against the cache as layer l+1 will see it: the prefetch stages
exactly the weights and factor ranks that plan would fetch, by the executor's own loading code.

Prefetch only moves bytes earlier. Staged data sits in a buffer of its own (per layer at most its
top-k experts with their factors, `budget_bytes`; the running layer's and the next one's are alive
together, so up to twice that in device memory beside the cache), invisible to the
planner and the cache: plans, cache contents and counters, placement and therefore every logit
are exactly those of a run without prefetch (tests/test_prefetch.py). When layer l+1's plan fetches
an expert that was staged, the executor takes the staged tensors instead of reading the store and
uploading; what was staged and not taken by the end of layer l+1 is wasted link traffic.
Putting guesses into the cache itself would change what later layers hit and, on GPU-NDP or with
a cache-aware policy, what the planner decides (a cached expert runs on the GPU): not the same run.

On CUDA the copies run on a side stream from pinned host memory (non_blocking) and each staged
entry records an event; the layer that takes it makes the compute stream wait on that event. On
the CPU the same code moves tensors synchronously, no stream. (The CUDA path has not run on
hardware.)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ndpmoe.model.moe import route as route_tokens

PREFETCH_MODES = ("auto", "on", "off")


def prefetch_enabled(mode: str, device: str) -> bool:
    """auto: on where the copies can overlap compute (CUDA); on the CPU staging is the same host
    work done earlier, plus the wrong guesses' (measured: README)."""
    if mode not in PREFETCH_MODES:
        raise ValueError(f"prefetch must be one of {PREFETCH_MODES}, not {mode!r}")
    return mode == "on" or (mode == "auto" and torch.device(device).type == "cuda")


def staging_budget(sizes, top_k: int, variant: str = "lo") -> int:
    """Device bytes of the staging buffer: what one decode token's layer can fetch, top-k experts
    (`variant`, or their higher-precision copies when larger) with factors at the stored rank."""
    largest = max(sizes.weight_bytes(v) for v in (variant, "hi") if v != "hi" or sizes.hi_fmt is not None)
    return top_k * (largest + sizes.stored_rank * sizes.gpu_rank_bytes)


class SideStreamCopier:
    """Host -> device copies that do not hold up compute: on CUDA pinned, non_blocking, on a side
    stream, with an event the consumer waits on; on the CPU a plain (synchronous) move."""

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def copy(self, host: dict[str, torch.Tensor]):
        """{name: host tensor} -> ({name: device tensor}, event or None, pinned sources or None)."""
        if self.stream is None:
            return {k: v.to(self.device) for k, v in host.items()}, None, None
        pinned = {k: v.pin_memory() for k, v in host.items()}
        with torch.cuda.stream(self.stream):
            dev = {k: v.to(self.device, non_blocking=True) for k, v in pinned.items()}
            event = torch.cuda.Event()
            event.record(self.stream)
        return dev, event, pinned

    def ready(self, dev: dict[str, torch.Tensor], event) -> None:
        """Make the current (compute) stream wait for the copies before it uses `dev`."""
        if event is None:
            return
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(event)
        for t in dev.values():
            t.record_stream(compute)          # allocated on the side stream, now used on compute


@dataclass
class _Staged:
    tensors: dict[str, torch.Tensor]        # on the device
    nbytes: int                             # link bytes of the staged range
    event: object = None
    pinned: dict | None = None              # host sources, held until taken or dropped (torch's pinned
                                            # allocator also keeps a block until its copy has run)
    have: int = 0                           # factors: the cached rank the increment starts at
    rank: int = 0                           # factors: the rank it reaches


@dataclass
class PrefetchStats:
    predictions: int = 0                    # layers guessed
    selected: int = 0                       # distinct experts the guessed layers then selected
    predicted_selected: int = 0             # of those, guessed
    staged_bytes: int = 0
    used_bytes: int = 0
    wasted_bytes: int = 0                   # staged and not taken by the layer it was staged for
    guess_s: float = 0.0                    # host time of the guesses (router, policy copy, decide)

    def accuracy(self) -> float | None:
        return self.predicted_selected / self.selected if self.selected else None

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d.update(accuracy=self.accuracy())
        return d


@dataclass
class _Guess:
    layer: int
    experts: frozenset[int]
    weights: dict = field(default_factory=dict)     # (layer, expert, variant) -> _Staged
    factors: dict = field(default_factory=dict)     # (layer, expert, "factors") -> _Staged


class NextLayerPrefetcher:
    """Guesses a layer's experts from the previous layer's input and stages its plan's fetches.

    loader: the executor (its `load_weights` / `load_factors` give the exact tensors and bytes a
    fetch moves). planner: the runtime's LayerPlanner. budget_bytes: the staging buffer.
    Per layer, in the runtime's order: `begin` (its router has run), `stage` (guess the next
    layer), the layer executes (`take_*`), `end`."""

    def __init__(self, planner, loader, device, budget_bytes: int):
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
            raise ValueError(f"budget_bytes must be a non-negative integer, not {budget_bytes!r}")
        self.planner, self.loader, self.budget_bytes = planner, loader, budget_bytes
        self.copier = SideStreamCopier(device)
        self.stats = PrefetchStats()
        self._current: _Guess | None = None       # staged for the layer now running
        self._next: _Guess | None = None          # staged for the layer after it

    def begin(self, layer: int, ids: torch.Tensor) -> None:
        """Layer `layer` routed to `ids` [T, K]: its guess (if any) becomes current and is scored."""
        self.end()
        g, self._next = self._next, None
        if g is not None and g.layer != layer:      # guessed for a layer that did not come next
            self._settle(g)
            g = None
        if g is not None:
            chosen = set(ids.unique().tolist())
            self.stats.selected += len(chosen)
            self.stats.predicted_selected += len(chosen & g.experts)
        self._current = g

    def stage(self, layer: int, x: torch.Tensor, router: torch.Tensor, cfg) -> None:
        """Guess layer `layer` (the next) from x [T, D], the running layer's MoE input on the host,
        with `layer`'s router and config; stage what its plan would fetch, within the budget."""
        if self._next is not None:
            self._settle(self._next)
        t0 = time.perf_counter()
        ids, wts = route_tokens(x, router, cfg)
        policy = self.planner.policy
        fork = getattr(policy, "fork", None)        # a policy with draws decides the guess on a copy
        d = self.planner.decide(layer, ids, wts, policy=fork() if fork is not None else policy)
        self.stats.guess_s += time.perf_counter() - t0
        guess = _Guess(layer, frozenset(ids.unique().tolist()))
        sizes, budget = self.planner.sizes, self.budget_bytes
        for task in sorted(d.tasks, key=lambda t: -len(t.tokens)):      # most tokens first
            if task.fetch_weights and sizes.weight_bytes(task.variant) <= budget:
                host, nbytes = self.loader.load_weights(layer, task.expert, task.variant)
                budget -= nbytes
                guess.weights[(layer, task.expert, task.variant)] = self._put(host, nbytes)
            if task.fetch_factor_ranks and task.fetch_factor_ranks * sizes.gpu_rank_bytes <= budget:
                have = task.comp_rank - task.fetch_factor_ranks
                host, nbytes = self.loader.load_factors(layer, task.expert, have, task.comp_rank)
                budget -= nbytes
                guess.factors[(layer, task.expert, "factors")] = self._put(host, nbytes, have, task.comp_rank)
        self._next = guess
        self.stats.predictions += 1

    def _put(self, host: dict, nbytes: int, have: int = 0, rank: int = 0) -> _Staged:
        dev, event, pinned = self.copier.copy(host)
        self.stats.staged_bytes += nbytes
        return _Staged(dev, nbytes, event, pinned, have, rank)

    def take_weights(self, layer: int, expert: int, variant: str):
        """A weight fetch of the running layer: (staged device tensors, bytes), or None (fetch on
        demand)."""
        g = self._current
        if g is None or g.layer != layer:
            return None
        s = g.weights.pop((layer, expert, variant), None)
        if s is None:
            return None
        self.copier.ready(s.tensors, s.event)
        self.stats.used_bytes += s.nbytes
        return s.tensors, s.nbytes

    def take_factors(self, layer: int, expert: int, have: int, rank: int):
        """A factor fetch of ranks [have, rank): the staged increments sliced to exactly that range
        and their bytes, or None when nothing staged covers it (fetch on demand)."""
        g = self._current
        if g is None or g.layer != layer:
            return None
        key = (layer, expert, "factors")
        s = g.factors.get(key)
        if s is None or s.have != have or s.rank < rank:
            return None
        del g.factors[key]
        self.copier.ready(s.tensors, s.event)
        n = rank - have
        if n == s.rank - s.have:
            out = s.tensors
        else:                                # contiguous, as a fetch of exactly [have, rank) would be
            out = {k: (t[:, :n] if k.endswith(".A") else t[:n]).contiguous() for k, t in s.tensors.items()}
        used = s.nbytes * n // (s.rank - s.have)           # bytes are linear in rank (host/store.py)
        self.stats.used_bytes += used
        self.stats.wasted_bytes += s.nbytes - used
        return out, used

    def end(self) -> None:
        """The running layer has executed: what was staged for it and not taken is wasted."""
        g, self._current = self._current, None
        if g is not None:
            self._settle(g)

    def _settle(self, g: _Guess) -> None:
        for s in list(g.weights.values()) + list(g.factors.values()):
            self.stats.wasted_bytes += s.nbytes
