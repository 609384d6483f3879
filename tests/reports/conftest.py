"""Small synthetic profiles, sweeps, allocations and evals files for the report tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from synthetic import synthetic_table, write_synthetic_profile

import bitalloc
from report_helpers import eval_lines

EVALS = [
    {"label": "original", "model": "smollm2-135m", "bits_per_param": None, "perplexity": 14.0, "kl": None,
     "baseline": True, "kind": "original"},
    {"label": "uniform nf3", "model": "out/nf3", "bits_per_param": 3.13, "perplexity": 19.5, "kl": 0.21,
     "baseline": True, "kind": "uniform"},
    {"label": "uniform nf4", "model": "out/nf4", "bits_per_param": 4.13, "perplexity": 15.2, "kl": 0.06,
     "baseline": True, "kind": "uniform"},
    {"label": "bitalloc 3.5", "model": "out/a35", "bits_per_param": 3.49, "perplexity": 16.25, "kl": 0.1,
     "baseline": False, "kind": "bitalloc", "budget": 3.5, "objective": "fisher", "extra_key": "ignored"},
]


@pytest.fixture(scope="session")
def report_inputs(tmp_path_factory) -> dict:
    """A Fisher profile (3 layers), a plain sweep CSV of it, two allocations and an evals file."""
    root = tmp_path_factory.mktemp("report-inputs")
    prof = write_synthetic_profile(root / "prof", synthetic_table(n_layers=3, seed=1))
    pareto, _, _ = bitalloc.sweep(prof, "2.5:5:0.5", objective="plain")
    sweep = root / "pareto.csv"
    pareto.to_csv(sweep, index=False)
    a35 = bitalloc.solve(prof, 3.5, objective="fisher").save(root / "alloc-3.5.json")
    a45 = bitalloc.solve(prof, 4.5, objective="plain").save(root / "alloc-4.5.json")
    evals = root / "evals.jsonl"
    evals.write_text(eval_lines(*EVALS))
    return {"root": root, "profile": prof, "sweep": sweep, "allocs": [a35, a45], "evals": evals}


@pytest.fixture(scope="session")
def plain_profile(tmp_path_factory) -> Path:
    """A profile without Fisher errors (2 layers)."""
    root = tmp_path_factory.mktemp("plain-profile")
    return write_synthetic_profile(root / "prof", synthetic_table(n_layers=2, seed=2, fisher=False))


@pytest.fixture(scope="session")
def other_profile(tmp_path_factory) -> Path:
    """Another model's profile: same names and shapes, errors 10x larger, another model hash."""
    root = tmp_path_factory.mktemp("other-profile")
    table = synthetic_table(n_layers=3, seed=1)
    table["error"] *= 10
    table["error_fisher"] *= 10
    return write_synthetic_profile(root / "prof", table, model="other-model")
