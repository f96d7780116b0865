"""Torch's thread count for work made of many small operations.

Quantizing and fitting the default model's experts (64 x 576 matrices) is thousands of small
tensor operations; with two OpenMP threads each one pays a fork and a join, and when another job
holds a core the two threads wait on each other at every join. One layer's activation-aware int3
quantization took 21.4 CPU-seconds with two threads and 0.52 with one on the 2-core machine under
load (`python` on host/study_parts.quantized_part, layer 7); large matrices (a real checkpoint's
experts) keep every thread, where the work per operation pays for the hand-off.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

# Elements of one matrix below which its operations are too small to share between threads.
SMALL_MATRIX_ELEMENTS = 1 << 20


def threads_for(matrix_elements: int) -> int:
    """The thread count for work on matrices of this size: 1 for small ones, else torch's own."""
    return 1 if matrix_elements < SMALL_MATRIX_ELEMENTS else torch.get_num_threads()


@contextmanager
def torch_threads(n: int | None):
    """Run the block with `n` torch threads (None: unchanged) and restore the count after it."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
