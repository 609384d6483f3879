"""resolve_device: the one reading of --device."""

from __future__ import annotations

import pytest
import torch

from bitalloc.models import resolve_device


def test_auto_and_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_cuda_without_cuda_and_nonsense_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="invalid --device 'tpu9'"):
        resolve_device("tpu9")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda:0")
    assert str(resolve_device("auto")) == "cpu"
