"""bitalloc.apply.summary and the honest figures of apply, eval and info for partial allocations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bitalloc
from bitalloc.apply import apply_allocation, evaluate_model, model_info
from bitalloc.apply.summary import applied_report, safetensors_index
from bitalloc.cli import main
from bitalloc.profiles import ProfileRequest, profile

FIRST_LAYER = r"layers\.0\."


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def partial(tiny_llama_dir, tmp_path_factory):
    """An allocation solved on a profile of the first layer only (7 of the tiny Llama's 14 targets), applied."""
    tmp = tmp_path_factory.mktemp("partial")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BITALLOC_CACHE", str(tmp / "cache"))
        space = tmp / "space.json"
        space.write_text(json.dumps(["nf2-g16-s8x16-r0", "nf3-g16-s8x16-r0", "nf4-g16-s16-r0"]))
        prof = profile(ProfileRequest(model=str(tiny_llama_dir), out=tmp / "profile", space=str(space), fisher=False,
                                      include=FIRST_LAYER, progress=False))
        alloc = bitalloc.solve(prof, 3.5).save(tmp / "alloc.json")
        out = apply_allocation(alloc, out=tmp / "q", device="cpu", progress=False)
    return out, tiny_llama_dir


def _bytes_under(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_apply_of_a_partial_allocation_reports_the_targets_it_leaves_dense_and_the_real_bytes(partial):
    out, model_dir = partial
    report = applied_report(out)
    assert report["targets"] == 7 and report["model_targets"] == 14
    assert len(report["untouched_targets"]) == 7
    assert all(name.startswith("model.layers.1.") for name in report["untouched_targets"])
    assert report["untouched_dtypes"] == ["F32"]
    index = safetensors_index(out / "model.safetensors")
    assert report["untouched_bytes"] == sum(index[f"{n}.weight"]["bytes"] for n in report["untouched_targets"])
    assert report["untouched_params"] == report["quantized_params"]  # the two layers have the same shapes
    assert report["total_bytes"] == _bytes_under(out)
    assert report["bytes"]["model.safetensors"] == (out / "model.safetensors").stat().st_size
    # every parameter of the source model is counted once, in one class
    assert report["total_params"] == model_info(str(model_dir))["total_params"]
    # the fp32 layer dominates: the whole model costs far more than the allocation's bits/param
    assert report["model_bits_per_param_on_disk"] > 4 * report["bits_per_param"]


def test_the_apply_command_prints_what_is_quantized_what_is_not_and_the_bytes(partial, tmp_path, capsys):
    out, model_dir = partial
    alloc = out.parent / "alloc.json"
    assert main(["-q", "apply", str(alloc), "--out", str(tmp_path / "q"), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "quantized: 7 of 14 targets" in text
    assert "not quantized: 7 targets outside the allocation stay as stored (F32" in text
    assert "on disk: " in text and "model.safetensors" in text and "bits per parameter over" in text
    assert main(["-q", "apply", str(alloc), "--out", str(tmp_path / "q2"), "--device", "cpu", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["total_bytes"] == _bytes_under(tmp_path / "q2") and len(summary["untouched_targets"]) == 7


def test_eval_counts_packed_targets_in_its_parameters(partial, tiny_text_file):
    out, model_dir = partial
    kw = dict(data=str(tiny_text_file), seqlen=32, windows=1, device="cpu", kl=False, progress=False)
    applied, original = evaluate_model(str(out), **kw), evaluate_model(str(model_dir), **kw)
    assert applied["params"] == original["params"] == model_info(str(model_dir))["total_params"]
    assert applied["packed_targets"] == 7 and applied["packed_params"] == applied_report(out)["quantized_params"]
    assert original["packed_params"] == 0


def test_info_include_counts_left_out_targets_apart_from_other_parameters(tiny_llama_dir, capsys):
    whole = model_info(str(tiny_llama_dir))
    part = model_info(str(tiny_llama_dir), include=FIRST_LAYER)
    assert part["n_targets"] == 7 and part["filtered_targets"] == 7
    assert part["other_params"] == whole["other_params"] and part["total_params"] == whole["total_params"]
    assert part["target_params"] + part["filtered_params"] + part["other_params"] == part["total_params"]
    assert main(["-q", "info", str(tiny_llama_dir), "--include", FIRST_LAYER]) == 0
    text = capsys.readouterr().out
    assert f"7 targets left out by --include/--exclude ({part['filtered_params']:,} parameters)" in text
    assert f"{whole['other_params']:,} other parameters" in text


def test_info_of_an_applied_dir_lists_packed_targets_with_their_configs(partial):
    out, model_dir = partial
    info = model_info(str(out))
    assert info["n_targets"] == 14 and info["packed_targets"] == 7 and info["filtered_targets"] == 0
    configs = {t["name"]: t.get("config") for t in info["targets"]}
    assert configs == {**{n: None for n in configs if "layers.1." in n},
                       **json.loads((out / "bitalloc.json").read_text())["targets"]}
    assert info["total_params"] == model_info(str(model_dir))["total_params"]
    only_packed = model_info(str(out), include=r"layers\.0\.")
    assert only_packed["n_targets"] == 7 and only_packed["packed_targets"] == 7
