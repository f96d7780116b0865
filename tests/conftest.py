"""Shared test fixtures."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")    # before torch loads OpenMP: see host/cli.py

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors on 2 shared cores: OpenMP hand-offs cost more than the work (10x seen), so
    modules of tiny ops run with one torch thread and restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
