"""Tests for bitalloc.models.fisher_cache: cache keys and the cached Fisher estimate (tiny models, CPU)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import bitalloc.models.fisher_cache as fisher_mod
from bitalloc.models.fisher import estimate_fisher
from bitalloc.models.fisher_cache import (
    fisher_cache_key,
    fisher_cache_paths,
    load_fisher,
    load_or_estimate_fisher,
    save_fisher,
)
from bitalloc.models.targets import find_targets, target_weight
from tests.conftest import build_tiny_llama

VOCAB = 128


@pytest.fixture
def llama():
    return build_tiny_llama(VOCAB, seed=0)


@pytest.fixture
def tokens():
    return torch.randint(0, VOCAB, (5, 12), generator=torch.Generator().manual_seed(0))


def test_cache_key_is_short_stable_and_sensitive():
    base = dict(model_id="m", model_hash="abc", data="wikitext2", samples=16, seqlen=256, mode="exact", seed=0)
    key = fisher_cache_key(**base)
    assert key == fisher_cache_key(**base) and len(key) == 16
    for field, value in [("samples", 32), ("seqlen", 128), ("mode", "batched"), ("seed", 1), ("data", "c4"),
                         ("model_hash", "abd"), ("model_id", "n")]:
        assert fisher_cache_key(**{**base, field: value}) != key, field
    assert fisher_cache_key(**base, batch_size=8) == key  # batch size does not change exact estimates
    assert fisher_cache_key(**{**base, "mode": "persample"}) == key  # persample computes the exact values
    batched = {**base, "mode": "batched"}
    assert fisher_cache_key(**batched, batch_size=2) != fisher_cache_key(**batched, batch_size=4)
    with pytest.raises(ValueError):
        fisher_cache_key(**{**base, "samples": 0})



# --------------------------------------------------------------------------- cache


def key_fields(**changes):
    fields = dict(model_id="tiny", model_hash="h0", data="random", samples=3, seqlen=12, mode="exact", seed=0)
    fields.update(changes)
    return fields


class Counter:
    """Counts calls of estimate_fisher and tokens_fn."""

    def __init__(self, monkeypatch, tokens):
        self.estimates = 0
        self.token_calls = 0
        self.tokens = tokens
        real = fisher_mod.estimate_fisher

        def counted(*args, **kwargs):
            self.estimates += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(fisher_mod, "estimate_fisher", counted)

    def tokens_fn(self):
        self.token_calls += 1
        return self.tokens


def test_cache_round_trip_and_reuse(llama, tokens, tmp_path, monkeypatch):
    counter = Counter(monkeypatch, tokens[:3])
    targets = find_targets(llama)
    first = load_or_estimate_fisher(
        llama, counter.tokens_fn, targets, cache_dir=tmp_path, key_fields=key_fields(), progress=False
    )
    assert (counter.estimates, counter.token_calls) == (1, 1)
    second = load_or_estimate_fisher(
        llama, counter.tokens_fn, targets, cache_dir=tmp_path, key_fields=key_fields(), progress=False
    )
    assert (counter.estimates, counter.token_calls) == (1, 1)  # not recomputed, tokens not built
    for name in first:
        assert torch.equal(first[name], second[name])
        assert second[name].dtype == torch.float32

    exact = estimate_fisher(llama, tokens[:3], targets, progress=False)
    for name, value in exact.items():  # bf16 storage: relative error at most 2^-9 per element
        assert bool(((second[name] - value).abs() <= value.abs() * 2.0**-8).all()), name

    path, sidecar = fisher_cache_paths(tmp_path, fisher_cache_key(**key_fields()))
    info = json.loads(sidecar.read_text())
    assert info["key_fields"]["samples"] == 3 and info["dtype"] == "bfloat16"
    assert info["targets"][targets[0][0]] == list(target_weight(targets[0][1]).shape)
    assert not list(tmp_path.glob("*.tmp"))

    # a subset of the cached targets is served from the cache
    subset = load_or_estimate_fisher(
        llama, counter.tokens_fn, targets[:2], cache_dir=tmp_path, key_fields=key_fields(), progress=False
    )
    assert list(subset) == [n for n, _ in targets[:2]] and counter.estimates == 1


def test_changed_key_recomputes(llama, tokens, tmp_path, monkeypatch):
    counter = Counter(monkeypatch, tokens[:3])
    kwargs = dict(cache_dir=tmp_path, progress=False)
    load_or_estimate_fisher(llama, counter.tokens_fn, key_fields=key_fields(), **kwargs)
    load_or_estimate_fisher(llama, counter.tokens_fn, key_fields=key_fields(seed=1), **kwargs)
    load_or_estimate_fisher(llama, counter.tokens_fn, key_fields=key_fields(model_hash="h1"), **kwargs)
    assert counter.estimates == 3
    assert len(list(tmp_path.glob("fisher-*.safetensors"))) == 3
    load_or_estimate_fisher(llama, counter.tokens_fn, key_fields=key_fields(seed=1), **kwargs)
    load_or_estimate_fisher(llama, counter.tokens_fn, key_fields=key_fields(mode="persample"), **kwargs)
    assert counter.estimates == 3  # persample reuses the exact estimate
    load_or_estimate_fisher(llama, counter.tokens_fn, key_fields=key_fields(mode="batched"), **kwargs)
    assert counter.estimates == 4


@pytest.mark.parametrize("damage", ["truncate", "flip", "sidecar", "delete"])
def test_damaged_cache_is_recomputed_with_a_warning(llama, tokens, tmp_path, monkeypatch, caplog, damage):
    counter = Counter(monkeypatch, tokens[:3])
    kwargs = dict(cache_dir=tmp_path, key_fields=key_fields(), progress=False)
    first = load_or_estimate_fisher(llama, counter.tokens_fn, **kwargs)
    path, sidecar = fisher_cache_paths(tmp_path, fisher_cache_key(**key_fields()))
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    elif damage == "sidecar":
        sidecar.write_text("{not json")
    else:
        path.unlink()
    with caplog.at_level(logging.WARNING, logger="bitalloc.models.fisher"):
        again = load_or_estimate_fisher(llama, counter.tokens_fn, **kwargs)
    assert counter.estimates == 2
    assert any("recomputing" in r.getMessage() for r in caplog.records)
    for name in first:
        assert torch.equal(first[name], again[name])
    assert load_fisher(path)[1]["key"] == fisher_cache_key(**key_fields())  # repaired


def test_unwritable_cache_warns_and_returns(llama, tokens, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="bitalloc.models.fisher"):
        est = load_or_estimate_fisher(
            llama, lambda: tokens[:2], cache_dir=blocker / "sub", key_fields=key_fields(samples=2), progress=False
        )
    assert est and any("could not write" in r.getMessage() for r in caplog.records)


def test_no_cache_dir_and_bad_key_fields(llama, tokens):
    est = load_or_estimate_fisher(
        llama, lambda: tokens[:2], cache_dir=None, key_fields=key_fields(samples=2), progress=False
    )
    assert est
    with pytest.raises(ValueError, match="key_fields"):
        load_or_estimate_fisher(llama, lambda: tokens, cache_dir=None, key_fields={"mode": "exact"}, progress=False)


def test_bf16_storage_keeps_tiny_values(tmp_path):
    values = torch.logspace(-30, 2, 1000, dtype=torch.float32).reshape(40, 25)
    save_fisher({"w": values}, tmp_path / "f.safetensors", {"note": "x"})
    loaded, info = load_fisher(tmp_path / "f.safetensors")
    assert info["note"] == "x"
    rel = ((loaded["w"] - values).abs() / values).max()
    assert rel <= 2.0**-8  # no underflow: float16 would flush everything below 6e-8 to zero
    assert bool((loaded["w"] > 0).all())
