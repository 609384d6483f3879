"""bench/objective_fidelity.py on a tiny seeded Llama: its pieces and a quick end-to-end run."""

from __future__ import annotations

import copy
import csv
import json
import random

import pytest
import torch

from bench_scripts import load_bench

SPACE = ["nf2-g16-s8x16-r0", "nf3-g16-s8x16-r0", "nf3-g32-s4x16-r0", "nf4-g16-s8x16-r0", "nf4-g16-s16-r0"]


def _load(name: str, file: str):
    return load_bench(file, name)


@pytest.fixture(scope="module")
def lib():
    return _load("_fidelity_lib", "_fidelity_lib.py")


@pytest.fixture(scope="module")
def bench():
    return _load("objective_fidelity", "objective_fidelity.py")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_profile(tiny_llama_dir, tiny_text_file, tmp_path_factory):
    """A Fisher profile of the tiny Llama, calibrated on 4 x 32 tokens of the tiny text file."""
    from bitalloc.profiles import ProfileRequest, profile

    tmp = tmp_path_factory.mktemp("fidelity-profile")
    space = tmp / "space.json"
    space.write_text(json.dumps(SPACE))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BITALLOC_CACHE", str(tmp / "cache"))
        return profile(ProfileRequest(model=str(tiny_llama_dir), out=tmp / "profile", space=str(space),
                                      calib=str(tiny_text_file), samples=4, seqlen=32, ranks="0", progress=False))


def test_spearman_known_cases(lib):
    assert lib.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / 95 ** 0.5)  # ties: average ranks
    assert lib.spearman([1, 2, 3, 4], [10, 100, 1000, 1e4]) == pytest.approx(1.0)
    assert lib.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert lib.spearman([1, 2], [1, 2]) is None and lib.spearman([1, 2, 3], [5, 5, 5]) is None
    assert lib.spearman([1, 2, float("nan"), 3, 4], [1, 3, 0, 2, 4]) == pytest.approx(0.8)
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = random.Random(3)
    x = [rng.randint(0, 6) for _ in range(40)]
    y = [v + rng.randint(-3, 3) for v in x]
    assert lib.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-12)


def test_disjoint_windows_avoid_calibration(lib):
    ids = torch.arange(1000)
    spans = lib.calibration_spans({"source": "wikitext2", "samples": 4, "seqlen": 100}, "WikiText2", 1000)
    assert spans == [(0, 100), (200, 300), (500, 600), (700, 800)]
    windows, starts = lib.disjoint_windows(ids, 50, 6, spans)
    assert windows.shape == (6, 50) and len(set(starts)) == 6
    for s in starts:
        assert all(s + 50 <= a or s >= b for a, b in spans)
        assert torch.equal(windows[starts.index(s)], ids[s : s + 50])
    assert lib.calibration_spans({"source": "self:16", "samples": 16, "seqlen": 256}, "wikitext2", 1000) == []
    with pytest.raises(ValueError, match="avoid the calibration text"):
        lib.disjoint_windows(ids, 100, 7, spans)


def test_score_matches_the_library(lib, tiny_llama):
    from bitalloc.models.evaluate import kl_divergence, perplexity

    model, tok = tiny_llama
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    windows = torch.randint(1, len(tok), (3, 40), generator=torch.Generator().manual_seed(1))
    got = lib.score(other, windows, lib.reference_logprobs(model, windows))
    assert got["kl"] == pytest.approx(kl_divergence(other, model, windows, progress=False), rel=1e-5)
    assert got["perplexity"] == pytest.approx(perplexity(other, windows, progress=False)["perplexity"], rel=1e-5)
    assert got["kl"] > 0
    assert lib.score(model, windows, lib.reference_logprobs(model, windows))["kl"] == pytest.approx(0, abs=1e-6)


def test_perturb_moves_along_ladders_near_budget(lib, tiny_profile):
    import bitalloc
    from bitalloc.profiles import load_profile

    df, meta = load_profile(tiny_profile)
    table = lib.lookup(df)
    ladders = lib.move_ladders(df, ["error", "error_fisher"])
    alloc = bitalloc.solve((df, meta), 3.6, objective="error_fisher")
    bits = lib.totals(table, alloc.assignments, [])["bits_per_param"]
    new = lib.perturb(alloc.assignments, ladders, table, random.Random(0), moves=4, target_bits=bits, tolerance=0.3)
    changed = [m for m in new if new[m] != alloc.assignments[m]]
    assert 1 <= len(changed) <= 4
    for m in changed:
        ladder = ladders[m]
        assert new[m] in ladder
        if alloc.assignments[m] in ladder:
            assert abs(ladder.index(new[m]) - ladder.index(alloc.assignments[m])) == 1
    assert abs(lib.totals(table, new, [])["bits_per_param"] - bits) <= 0.3
    t = lib.totals(table, alloc.assignments, ["error_fisher"])
    assert t["error_fisher"] == pytest.approx(alloc.objective, rel=1e-9)


def test_quick_run(bench, tiny_profile, tiny_llama_dir, tiny_text_file, tmp_path):
    out = tmp_path / "report"
    argv = ["--model", str(tiny_llama_dir), "--profile", str(tiny_profile), "--data", str(tiny_text_file),
            "--budgets", "3.0,3.6,4.2", "--perturb", "2", "--moves", "1,2", "--tolerance", "0.3",
            "--perturb-below", "4.2", "--refine-budgets", "", "--range", "2.9,3.7", "--windows", "2", "--seqlen", "32",
            "--uniform", "nf4-g16-s8x16-r0", "--quality-out", str(tmp_path / "quality"), "--work", str(tmp_path / "work"), "--out", str(out)]
    assert bench.main(argv) == 0
    with (out / "measurements.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 6 + 4 - 1  # two objectives x (three budgets + two perturbations), two may coincide
    assert {r["source"] for r in rows} == {"sweep", "perturbed", "uniform"}
    for r in rows:
        assert float(r["kl"]) > 0 and float(r["perplexity"]) > 1 and r["mode"] == "substituted"
        if r["source"] != "uniform":
            assert float(r["pred_fisher"]) > 0 and float(r["pred_plain"]) > 0
    measured = [json.loads(line) for line in (tmp_path / "work" / "measured.jsonl").read_text().splitlines()]
    check = next(m for m in measured if m["key"].startswith("verify|"))
    assert check["max_abs_difference"] == 0.0  # substitution gives the weights `bitalloc apply` writes
    assert check["kl_applied"] == pytest.approx(check["kl_substituted"], rel=1e-5)
    corr = {c["objective"]: c for c in json.loads((out / "correlations.json").read_text())}
    assert set(corr) == {"plain", "fisher", "act", "kl"}
    assert corr["fisher"]["available"] and -1 <= corr["fisher"]["overall"] <= 1
    text = (out / "results.md").read_text()
    assert "Spearman" in text and (out / "fidelity.png").stat().st_size > 0
    for name in ("act", "kl"):
        assert corr[name]["available"] or f"`{name}` (error_{name}): not available" in text
    quality = (tmp_path / "quality" / "results.md").read_text()
    assert "| budget |" in quality and "uniform-nf4-g16-s8x16-r0" in quality and "solve time" in quality
    # a rerun reads every measurement from the cache
    assert bench.main(argv) == 0
    assert "0 allocations applied and scored in this run" in (out / "results.md").read_text()
