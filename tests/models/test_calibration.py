"""bitalloc.models.calibration: the Calibration settings (JSON form, validation, defaults) and their cache files."""

from __future__ import annotations

import dataclasses

import pytest

from bitalloc.models import Calibration
from bitalloc.models.fisher import default_fisher_settings
from bitalloc.models.fisher_cache import fisher_cache_key, fisher_cache_paths


def test_json_form_keeps_the_meta_keys_and_reads_back():
    cal = Calibration(source="wikitext2", samples=16, seqlen=256, mode="persample", batch_size=4)
    data = cal.to_dict()
    assert data == {"source": "wikitext2", "samples": 16, "seqlen": 256, "mode": "persample", "batch_size": 4,
                    "part": "second-half"}
    assert Calibration.from_dict(data) == cal
    legacy = {k: v for k, v in data.items() if k != "part"}  # settings without a part spread over the whole text
    assert Calibration.from_dict(legacy).part == "whole" and Calibration.from_dict(legacy).to_dict() == legacy
    old = {"source": "self:16", "samples": 16, "seqlen": 256, "mode": "exact"}  # written without batch_size
    assert Calibration.from_dict(old).batch_size is None and Calibration.from_dict(old).to_dict() == old


def test_it_is_frozen_and_checked():
    cal = Calibration(source="c4", samples=2, seqlen=8, mode="exact")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cal.samples = 3
    for bad, message in [(dict(samples=0), "samples"), (dict(seqlen=True), "seqlen"), (dict(mode="fast"), "mode"),
                         (dict(source=""), "source"), (dict(batch_size=0), "batch_size"), (dict(part="first"), "part")]:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(cal, **bad)
    with pytest.raises(ValueError, match="lack samples"):
        Calibration.from_dict({"source": "c4", "seqlen": 8, "mode": "exact"})


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_defaults_per_device(device):
    defaults = default_fisher_settings(device)
    cal = Calibration.for_device(device)
    assert (cal.samples, cal.seqlen, cal.mode, cal.batch_size) == (
        defaults["samples"], defaults["seqlen"], defaults["mode"], defaults["batch_size"])
    assert cal.source == f"self:{defaults['samples']}"
    given = Calibration.for_device(device, source="data.txt", samples=3, seqlen=9, mode="exact")
    assert (given.source, given.samples, given.seqlen, given.mode) == ("data.txt", 3, 9, "exact")


def test_cache_files_follow_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path))
    cal = Calibration(source="c4", samples=2, seqlen=8, mode="batched", batch_size=2)
    tensors, sidecar = cal.cache_files(model_id="m", model_hash="h", seed=0)
    key = fisher_cache_key("m", "h", "c4#second-half", 2, 8, "batched", 0, batch_size=2)
    assert tensors == tmp_path / "fisher" / f"fisher-{key}.safetensors" and sidecar == tensors.with_suffix(".json")
    assert cal.cache_files(model_id="m", model_hash="h", seed=1) != (tensors, sidecar)
    whole = dataclasses.replace(cal, part="whole")  # other windows, another estimate; the key of settings without a part
    assert whole.cache_files(model_id="m", model_hash="h", seed=0) == fisher_cache_paths(
        tmp_path / "fisher", fisher_cache_key("m", "h", "c4", 2, 8, "batched", 0, batch_size=2))
    wider = dataclasses.replace(cal, batch_size=4)
    assert wider.cache_files(model_id="m", model_hash="h", seed=0) != (tensors, sidecar)  # batched: batch counts


def test_text_sampled_from_the_model_has_no_part():
    sampled = Calibration(source="self:4", samples=4, seqlen=8, mode="exact")
    assert sampled.part == "whole" and "part" not in sampled.to_dict()
