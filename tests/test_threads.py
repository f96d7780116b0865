"""Torch's thread count for small-operation work: set for the block, restored after it (also
when the block raises); small matrices get one thread, large ones keep torch's count."""
import pytest
import torch

from ndpmoe.model.threads import SMALL_MATRIX_ELEMENTS, threads_for, torch_threads


def test_thread_count_is_set_for_the_block_and_restored():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="inside"):
        with torch_threads(1):
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def test_small_matrices_get_one_thread():
    assert threads_for(64 * 576) == 1                       # the default model's experts
    assert threads_for(SMALL_MATRIX_ELEMENTS) == torch.get_num_threads()
    assert threads_for(14336 * 4096) == torch.get_num_threads()   # Mixtral's
