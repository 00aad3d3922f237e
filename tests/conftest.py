"""Shared pytest set-up."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread per test module: on 2 cores (CI), OpenMP spin-waiting against the data-loader or
    other processes makes 2 threads several times slower than 1 for these small models."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
