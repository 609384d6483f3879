"""Fixtures of the adapter tests: tiny seeded PEFT LoRA adapters of one tiny Llama."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapter_helpers import make_adapter


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory) -> list[Path]:
    """Two rank-8 adapters (one rsLoRA) of one tiny base model."""
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(root / "math", seed=1), make_adapter(root / "chat", seed=2, rslora=True, alpha=8)]


@pytest.fixture(autouse=True)
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
