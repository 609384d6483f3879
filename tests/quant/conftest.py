"""Shared fixtures for the quant tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """Run on one intra-op thread: these tensors are tiny, and OpenMP worker threads on a
    busy machine make each small op stall for milliseconds."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
