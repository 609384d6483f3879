"""Shared helpers of the bitalloc.lowrank tests: seeded matrices and the LQ-LoRA reference."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from bitalloc.configs import QuantConfig

ROOT = Path(__file__).resolve().parents[2]


def reference_module():
    """bench/_lqlora_reference.py (the faithful LQ-LoRA loop), loaded by path."""
    spec = importlib.util.spec_from_file_location("_lqlora_reference", ROOT / "bench" / "_lqlora_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def weight(rows: int = 64, cols: int = 96, rank: int = 6, seed: int = 0) -> torch.Tensor:
    """A seeded weight-like matrix: a strong low-rank part plus Gaussian noise, scale ~0.02."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g) / rank**0.5
    return 0.02 * (low + 0.5 * torch.randn(rows, cols, generator=g))


def clipped(seed: int = 3) -> torch.Tensor:
    """A 96 x 128 matrix with outliers that coarse scales clip (the repair pass fires on it)."""
    W = weight(96, 128, rank=8, seed=seed)
    W.view(-1)[::37] *= 20
    return W


def sq(x: torch.Tensor) -> float:
    return float((x * x).sum(dtype=torch.float64))


def cfg(name: str) -> QuantConfig:
    return QuantConfig.from_name(name)
