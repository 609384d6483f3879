"""bench/quality.py: the plan of models on a tiny Llama's profile."""

from __future__ import annotations

import argparse
import json

import pytest
from bench_scripts import load_bench

SPACE = ["nf2-g16-s8x16-r0", "nf3-g16-s8x16-r0", "nf4-g16-s8x16-r0"]


@pytest.fixture(scope="module")
def bench():
    return load_bench("quality.py", "quality_bench")


@pytest.fixture(scope="module")
def tiny_profile(tiny_llama_dir, tmp_path_factory):
    """A plain (no calibration text) profile of the tiny Llama over three NF configs at rank 0."""
    from bitalloc.profiles import ProfileRequest, profile

    tmp = tmp_path_factory.mktemp("quality-profile")
    space = tmp / "space.json"
    space.write_text(json.dumps(SPACE))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BITALLOC_CACHE", str(tmp / "cache"))
        return profile(ProfileRequest(model=str(tiny_llama_dir), out=tmp / "profile", space=str(space), ranks="0",
                                      fisher=False, act=False, kl=False, progress=False))


def _args(only: str | None) -> argparse.Namespace:
    return argparse.Namespace(fixed_rank=0, baselines=[], variants=[("plain", "solver"), ("plain", "refine")],
                              budgets=[3.0, 3.5], only=only, refine_steps=1)


@pytest.mark.parametrize("only, refined", [(None, [3.0, 3.5]), ("plain-solver", []), (r"refine-3\.00", [3.0])])
def test_refinement_runs_only_where_only_selects(bench, tiny_profile, tmp_path, monkeypatch, only, refined):
    import bitalloc

    calls = []

    def fake_refined(args, profile_dir, path, budget, objective):
        calls.append(budget)
        return bitalloc.solve(profile_dir, budget, objective="plain")

    monkeypatch.setattr(bench, "_refined", fake_refined)
    entries = bench.plan(_args(only), tiny_profile, tmp_path)
    assert calls == refined
    by_label = {e["label"]: e for e in entries}
    for budget in (3.0, 3.5):
        assert "alloc" in by_label[f"bitalloc-plain-solver-{budget:.2f}"]  # solving alone runs no model
        entry = by_label[f"bitalloc-plain-refine-{budget:.2f}"]
        assert ("alloc" in entry) == (budget in refined)
        assert "infeasible" not in entry
