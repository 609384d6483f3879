"""bitalloc.apply.evaluation: evaluating a model or an applied directory, and what is recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bitalloc.apply import (
    QuantizedLinear,
    apply_allocation,
    evaluate_model,
    evaluation_labels,
    load_model_or_applied,
    model_info,
)
from bitalloc.identity import BUILTIN_ALIAS


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def applied(tiny_llama_dir, tmp_path):
    return apply_allocation(uniform="nf3-g16-s16-r0", model=str(tiny_llama_dir), out=tmp_path / "nf3",
                            device="cpu", progress=False)


def test_labels_of_a_plain_model_and_of_an_applied_dir(tiny_llama_dir, applied):
    plain = evaluation_labels(str(tiny_llama_dir))
    assert plain["kind"] == "original" and plain["baseline"] is True and plain["source_model"] is None
    assert evaluation_labels(None)["label"] == BUILTIN_ALIAS
    labels = evaluation_labels(str(applied))
    assert labels["label"] == "nf3" and labels["kind"] == "uniform" and labels["config"] == "nf3-g16-s16-r0"
    assert labels["source_model"] == str(tiny_llama_dir) and labels["bits_per_param"] > 3


def test_applied_dir_loads_with_quantized_layers_and_a_plain_model_without(tiny_llama_dir, applied):
    model, tokenizer = load_model_or_applied(str(applied))
    assert tokenizer is not None and any(isinstance(m, QuantizedLinear) for m in model.modules())
    plain, _ = load_model_or_applied(str(tiny_llama_dir))
    assert not any(isinstance(m, QuantizedLinear) for m in plain.modules())
    info = model_info(str(applied))  # packed targets are targets too, counted at rows x cols
    assert info["packed_targets"] == 14 and info["total_params"] == model_info(str(tiny_llama_dir))["total_params"]
    assert len(model_info(str(tiny_llama_dir))["targets"]) == 14


def test_evaluate_model_takes_kl_to_the_source_and_appends(tiny_llama_dir, tiny_text_file, applied, tmp_path):
    evals = tmp_path / "evals.jsonl"
    kw = dict(data=str(tiny_text_file), seqlen=32, windows=2, device="cpu", append=evals)
    result = evaluate_model(str(applied), **kw)
    assert result["kl_to"] == str(tiny_llama_dir) and result["kl"] > 0
    assert result["model"] == str(applied) and "source_model" not in result
    without = evaluate_model(str(applied), kl=False, label="mine", **kw)
    assert without["kl"] is None and without["kl_to"] is None and without["label"] == "mine"
    assert without["perplexity"] == pytest.approx(result["perplexity"], rel=1e-6)
    original = evaluate_model(str(tiny_llama_dir), **kw)
    assert original["kl"] is None and original["kind"] == "original"
    lines = [json.loads(line) for line in evals.read_text().splitlines()]
    assert [line["label"] for line in lines] == ["nf3", "mine", original["label"]]
    assert lines[0] == json.loads(json.dumps(result))


def test_apply_refuses_an_applied_dir_as_its_model(applied, tmp_path):
    with pytest.raises(ValueError, match="`bitalloc apply` output"):
        apply_allocation(uniform="nf4-g16-s16-r0", model=str(applied), out=tmp_path / "again", device="cpu",
                         progress=False)


def test_applied_summary_is_the_headline_of_bitalloc_json(applied):
    from bitalloc.apply import applied_summary, read_info

    summary, info = applied_summary(applied), read_info(applied)
    assert summary["out"] == str(applied) and summary["targets"] == len(info["targets"]) == 14
    assert summary["bits_per_param"] == info["bits_per_param"] and summary["adapter"] is False


def test_the_model_loader_refuses_an_applied_dir_with_a_pointer(applied):
    from bitalloc.models import ModelNotFoundError, load_model

    with pytest.raises(ModelNotFoundError, match="bitalloc.load"):
        load_model(str(applied))


def test_an_applied_dir_without_bitalloc_json_is_refused_by_load_and_eval(applied, tmp_path):
    import shutil

    from bitalloc.apply import AppliedModelError, evaluate_model, load
    from bitalloc.models import IncompleteCheckpointError

    unfinished = Path(shutil.copytree(applied, tmp_path / "unfinished"))
    (unfinished / "bitalloc.json").unlink()
    with pytest.raises(AppliedModelError, match="bitalloc.json"):
        load(unfinished)
    with pytest.raises(IncompleteCheckpointError, match="bitalloc apply"):
        evaluate_model(str(unfinished), data="self:1", seqlen=16, windows=1, kl=False, device="cpu")


def test_evaluate_models_shares_one_pass_and_equals_one_at_a_time(tiny_llama_dir, tiny_text_file, applied, tmp_path):
    from bitalloc.apply import evaluate_models

    nf4 = apply_allocation(uniform="nf4-g16-s16-r0", model=str(tiny_llama_dir), out=tmp_path / "nf4", device="cpu",
                           progress=False)
    evals = tmp_path / "evals.jsonl"
    kw = dict(data=str(tiny_text_file), seqlen=32, windows=2, device="cpu")
    together = evaluate_models([str(tiny_llama_dir), str(applied), str(nf4)], labels=["original", None, "four"],
                               append=evals, **kw)
    assert [r["label"] for r in together] == ["original", "nf3", "four"]
    assert together[0]["kl"] == 0.0 and together[0]["kind"] == "original"  # scored from the reference's logits
    for spec, row in zip((applied, nf4), together[1:]):
        alone = evaluate_model(str(spec), **kw)
        assert row["perplexity"] == pytest.approx(alone["perplexity"], rel=1e-6)
        assert row["kl"] == pytest.approx(alone["kl"], rel=1e-5) and row["kl_to"] == str(tiny_llama_dir)
        assert row["bits_per_param"] == alone["bits_per_param"]
    assert together[1]["kl"] > together[2]["kl"]  # 3-bit codes lose more than 4-bit ones
    original = evaluate_model(str(tiny_llama_dir), **kw)
    assert together[0]["perplexity"] == pytest.approx(original["perplexity"], rel=1e-6)
    lines = [json.loads(line) for line in evals.read_text().splitlines()]
    assert [line["label"] for line in lines] == ["original", "nf3", "four"]


def test_evaluate_models_needs_one_label_per_model_and_checks_before_loading(applied, tmp_path):
    from bitalloc.apply import evaluate_models

    with pytest.raises(ValueError, match="one --label per model"):
        evaluate_models([str(applied), str(applied)], labels=["only-one"], data="self:1", seqlen=16)
    with pytest.raises(FileNotFoundError):
        evaluate_models([str(applied), str(tmp_path / "missing")], data="self:1", seqlen=16,
                        append=tmp_path / "evals.jsonl")
    assert not (tmp_path / "evals.jsonl").exists()
