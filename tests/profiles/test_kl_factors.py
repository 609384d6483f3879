"""error_kl in the profile: factors measured once, kept for a rerun, and ordering allocations like measured KL."""

from __future__ import annotations

import json

import pytest
import torch

from bitalloc.configs import QuantConfig
from bitalloc.lowrank import decompose
from bitalloc.models import find_targets, load_model, target_weight
from bitalloc.models.kl_probe import KLProbe
from bitalloc.models.text import calibration_tokens
from bitalloc.profiles import ProfileRequest, load_profile, profile
from bitalloc.profiles.kl_factors import KL_FACTORS_FILE

SPACE = ["nf2-g16-s16-r0", "nf8-g16-s16-r0"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def kl_profile(tiny_llama_dir, tiny_text_file, tmp_path):
    space = tmp_path / "space.json"
    space.write_text(json.dumps(SPACE))
    request = ProfileRequest(model=str(tiny_llama_dir), out=tmp_path / "p", space=str(space), progress=False,
                             fisher=False, calib=str(tiny_text_file), samples=3, seqlen=24, kl_windows=3)
    return request, profile(request)


def test_error_kl_is_the_measured_factor_times_error_act(kl_profile, monkeypatch):
    request, out = kl_profile
    df, meta = load_profile(out)
    assert df["error_kl"].notna().all() and (df["error_kl"] > 0).all()
    assert meta["kl"]["basis"] == "act" and meta["kl"]["windows"] == 3
    kept = json.loads((out / KL_FACTORS_FILE).read_text())
    assert kept["basis"] == "act" and kept["probes"] == 14 * len(request.kl_levels)
    for name, entry in kept["factors"].items():
        rows = df[df["matrix"] == name]
        assert (rows["error_kl"] / rows["error_act"]).to_numpy() == pytest.approx(entry["factor"], rel=1e-12)
    # a rerun reuses the factors: no probe runs
    import bitalloc.profiles.kl_factors as kl_factors

    def no_probes(*args, **kwargs):
        raise AssertionError("the factors were measured again")

    monkeypatch.setattr(kl_factors, "fit_kl_factors", no_probes)
    again, _ = load_profile(profile(request))
    assert (again["error_kl"] == df["error_kl"]).all()


def _reconstruction(W: torch.Tensor, config: str) -> torch.Tensor:
    return decompose(W, QuantConfig.from_name(config)).reconstruct()


def test_error_kl_orders_allocations_like_measured_kl_where_plain_error_misleads(kl_profile, tiny_llama_dir,
                                                                                  tiny_text_file):
    _, out = kl_profile
    df, _ = load_profile(out)
    low = df[df["config"] == SPACE[0]].set_index("matrix")
    # two allocations: everything at NF8 but one matrix at NF2, a (plain error says better) or b
    pairs = [(a, b) for a in low.index for b in low.index
             if low.loc[a, "error"] < low.loc[b, "error"] and low.loc[a, "error_kl"] > low.loc[b, "error_kl"]]
    assert pairs, "the tiny model has no pair of matrices where plain error and error_kl disagree"
    a, b = max(pairs, key=lambda p: low.loc[p[0], "error_kl"] / low.loc[p[1], "error_kl"])
    model, tokenizer = load_model(str(tiny_llama_dir))
    targets = find_targets(model)
    weights = {n: target_weight(m).detach().float() for n, m in targets}
    high = {n: _reconstruction(W, SPACE[1]) for n, W in weights.items()}
    # measured on windows the factors were not fitted on
    windows = calibration_tokens(str(tiny_text_file), model, tokenizer, 24, 9, seed=0)[3:]
    probe = KLProbe(model, windows, targets)
    kl_a = probe.kl({**high, a: _reconstruction(weights[a], SPACE[0])})
    kl_b = probe.kl({**high, b: _reconstruction(weights[b], SPACE[0])})
    table = df.set_index(["matrix", "config"])

    def total(column: str, worse: str) -> float:
        return sum(table.loc[(m, SPACE[0] if m == worse else SPACE[1]), column] for m in low.index)

    assert total("error", a) < total("error", b)  # plain error prefers a
    assert kl_a > kl_b  # measured: b is better
    assert total("error_kl", a) > total("error_kl", b)  # error_kl orders them as measured


def test_shards_merge_their_kl_factors(kl_profile, tmp_path, monkeypatch):
    import dataclasses

    from bitalloc.profiles import merge_profiles

    request, whole = kl_profile
    shards = [profile(dataclasses.replace(request, out=tmp_path / f"s{i}", shard=f"{i}/2")) for i in (1, 2)]
    merged = merge_profiles(shards, tmp_path / "merged")
    factors = json.loads((merged / KL_FACTORS_FILE).read_text())
    full = json.loads((whole / KL_FACTORS_FILE).read_text())
    assert factors["basis"] == full["basis"] and factors["settings"] == full["settings"]
    assert sorted(factors["factors"]) == sorted(full["factors"])  # every matrix, from the shard that measured it
    assert factors["probes"] == full["probes"]
    for name, entry in full["factors"].items():
        assert factors["factors"][name]["factor"] == pytest.approx(entry["factor"], rel=1e-4)
    # shards measured with other settings are not joined: nothing a rerun could wrongly reuse
    other = json.loads((shards[1] / KL_FACTORS_FILE).read_text())
    (shards[1] / KL_FACTORS_FILE).write_text(json.dumps({**other, "basis": "plain"}))
    assert not (merge_profiles(shards, tmp_path / "mixed") / KL_FACTORS_FILE).exists()
