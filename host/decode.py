"""Greedy decoding of a Hugging Face causal LM with its KV cache: the prompt in one forward pass
(prefill), then one token per pass. Whatever the model's MoE blocks are (the runtime, the
study's masked forward, the float reference) the loop is the same, so their tokens and logits
can be compared step by step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch


@dataclass(frozen=True)
class DecodeStep:
    index: int                 # 0: the prefill (the prompt), then one per decoded token
    tokens: int                # tokens this forward pass processed
    token: int                 # the greedy choice from this pass's last position
    logits: torch.Tensor       # [V] float32, the last position's logits
    seconds: float             # wall time of the forward pass


def context_length(model) -> int | None:
    """The model's context (max_position_embeddings), None when it does not say."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(n) if n else None


def check_lengths(prompt_tokens: int, max_new_tokens: int, context: int | None) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, not {max_new_tokens!r}")
    if prompt_tokens < 1:
        raise ValueError("the prompt is empty: it must hold at least one token")
    if context is not None and prompt_tokens + max_new_tokens > context:
        if prompt_tokens >= context:
            raise ValueError(f"the prompt is {prompt_tokens} tokens, longer than the model's context of {context} "
                             f"tokens (it must leave room for at least one new token)")
        raise ValueError(f"the prompt ({prompt_tokens} tokens) plus max_new_tokens ({max_new_tokens}) exceed the "
                         f"model's context of {context} tokens; ask for at most {context - prompt_tokens} new tokens")


@torch.no_grad()
def greedy_steps(model, prompt_ids: list[int], max_new_tokens: int, *,
                 before_step: Callable[[int, int], None] | None = None,
                 device: str | torch.device = "cpu", eos_id: int | None = None) -> Iterator[DecodeStep]:
    """Yield one DecodeStep per forward pass: max_new_tokens passes (fewer if `eos_id` is
    chosen; the EOS step is yielded). `before_step(index, tokens)` runs before each pass."""
    import time

    from transformers import DynamicCache

    check_lengths(len(prompt_ids), max_new_tokens, context_length(model))
    model.eval()
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    cache = DynamicCache(config=model.config)          # updated in place by every pass
    for index in range(max_new_tokens):
        if before_step is not None:
            before_step(index, ids.shape[1])
        t0 = time.perf_counter()
        out = model(input_ids=ids, cache=cache, use_cache=True)
        logits = out.logits[0, -1].float()
        token = int(logits.argmax())
        seconds = time.perf_counter() - t0
        yield DecodeStep(index, ids.shape[1], token, logits.cpu(), seconds)
        if eos_id is not None and token == eos_id:
            return
        ids = torch.tensor([[token]], dtype=torch.long, device=device)
