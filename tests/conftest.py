"""Shared pytest set-up.

Without a GPU the Triton kernels run through Triton's CPU interpreter: TRITON_INTERPRET=1 must be
set before any kernel module is imported (they load lazily, at first use), so it is set here, for
the whole session. Model tests with fused_kernels="auto" then exercise the kernels too.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread per test module: on 2 cores (CI), OpenMP spin-waiting against the data-loader or
    other processes makes 2 threads several times slower than 1 for these small models."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
