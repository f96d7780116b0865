"""Perplexity of a (possibly modified) causal LM on token windows, and the hidden states that enter
each MLP / MoE block (what activation-aware quantization calibrates on).

Measured on 2 CPU cores at seq_len 512: SmolLM2-135M dense ~2 ms per token when the cores are idle
(the 49k-word LM head is a fifth of it), so EVAL_TOKENS = 4096 costs ~8.5 s; the default MoE model
16-25 s with one thread while other jobs share the cores. On busy cores set torch.set_num_threads(1):
two threads fighting for two cores were 3x slower than one.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

EVAL_TOKENS = 4096      # default evaluation length: 8.5 s dense, 16-25 s MoE on 2 cores (see above)
SEQ_LEN = 512           # context per window


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (`model.model.layers`)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TypeError(f"expected a Hugging Face causal LM with .model.layers, got {type(model).__name__}")
    return layers


@torch.no_grad()
def window_nll(model, ids: torch.Tensor, per_token: bool = False):
    """Summed next-token negative log-likelihood of windows ids [B, L] and the number of predictions;
    with `per_token`, also each prediction's NLL [B, L-1] (float64) from the same forward pass."""
    hidden = model.model(input_ids=ids).last_hidden_state            # [B, L, D]
    logits = model.lm_head(hidden[:, :-1]).float()                   # [B, L-1, V]
    flat, target = logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    # One log-softmax over the [L-1, V] logits gives both the sum and the per-token NLLs (each
    # was ~3% of a study pass on 2 cores); summed in float64, so both calls return the same sum.
    tokens = F.cross_entropy(flat, target, reduction="none").double()
    if not per_token:
        return tokens.sum().item(), ids[:, 1:].numel()
    return tokens.sum().item(), ids[:, 1:].numel(), tokens.reshape(ids.shape[0], -1)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, progress: bool = True, desc: str = "perplexity",
               token_nll: list | None = None) -> float:
    """exp(mean next-token NLL) over all windows [N, L], one window per forward pass. Pass a list as
    `token_nll` to get each window's per-prediction NLL appended to it (for paired statistics); the
    perplexity is the same number either way."""
    if windows.dim() != 2 or windows.dtype != torch.long:
        raise ValueError(f"windows must be a 2-D long tensor [N, L], got {tuple(windows.shape)} {windows.dtype}")
    model.eval()
    total, count = 0.0, 0
    for row in tqdm(windows, desc=desc, unit="win", disable=not progress, leave=False):
        if token_nll is None:
            nll, n = window_nll(model, row[None])
        else:
            nll, n, tokens = window_nll(model, row[None], per_token=True)
            token_nll.append(tokens[0])
        total += nll
        count += n
    return math.exp(total / count)


def perplexity_of(token_nll: list[torch.Tensor]) -> float:
    """perplexity()'s value from the per-window NLLs it appends to `token_nll`, summed as it sums them."""
    total, count = 0.0, 0
    for tokens in token_nll:
        total += tokens.sum().item()
        count += tokens.numel()
    return math.exp(total / count)


@torch.no_grad()
def collect_mlp_inputs(model, windows: torch.Tensor, max_rows: int | None = 4096, seed: int = 0,
                       layers: list[int] | None = None, progress: bool = True,
                       token_nll: list | None = None) -> dict[int, torch.Tensor]:
    """Hidden states entering each layer's MLP / MoE block: {layer: [N, D] float32}.

    Runs the model as it is (so after some blocks were replaced, later layers see their effect).
    With max_rows, N = min(max_rows, all tokens) rows are kept, drawn without replacement with a
    fixed seed (the same token positions for every layer). Pass a list as `token_nll` to get, from
    the same forward passes, each window's per-prediction NLLs as perplexity() appends them
    (perplexity_of gives its value): the model's perplexity pass need not run again.
    """
    blocks = decoder_layers(model)
    layers = list(range(len(blocks))) if layers is None else list(layers)
    for i in layers:
        if not 0 <= i < len(blocks):
            raise ValueError(f"layer {i} out of range: the model has {len(blocks)} layers")
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in layers}

    def hook(i):
        def fn(_module, args):
            seen[i].append(args[0].detach().reshape(-1, args[0].shape[-1]).float())
        return fn

    handles = [blocks[i].mlp.register_forward_pre_hook(hook(i)) for i in layers]
    try:
        model.eval()
        for row in tqdm(windows, desc="collect MLP inputs", unit="win", disable=not progress, leave=False):
            if token_nll is None:
                model.model(input_ids=row[None])
            else:
                token_nll.append(window_nll(model, row[None], per_token=True)[2][0])
    finally:
        for h in handles:
            h.remove()
    out = {i: torch.cat(v) for i, v in seen.items()}
    rows = next(iter(out.values())).shape[0] if out else 0
    if max_rows is not None and max_rows < rows:
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(rows, generator=gen)[:max_rows].sort().values
        out = {i: v[pick] for i, v in out.items()}
    return out
