"""The `bitalloc` command: info and eval on tiny local models, and clear errors on bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bitalloc.cli import main


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_info_json(tiny_llama_dir, capsys):
    assert main(["-q", "info", str(tiny_llama_dir), "--json"]) == 0
    info = _last_json(capsys.readouterr().out)
    names = [t["name"] for t in info["targets"]]
    assert len(names) == 14 and names[0] == "model.layers.0.self_attn.q_proj"
    assert info["target_params"] == sum(t["rows"] * t["cols"] for t in info["targets"])


def test_info_table(tiny_gpt2_dir, capsys):
    assert main(["-q", "info", str(tiny_gpt2_dir)]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.0.attn.c_attn" in out and "96x32" in out  # Conv1D shown as (out, in)


def test_eval_json_and_kl(tiny_llama_dir, tiny_text_file, capsys):
    code = main(["-q", "eval", str(tiny_llama_dir), "--data", str(tiny_text_file), "--seqlen", "32",
                 "--windows", "3", "--kl-to", str(tiny_llama_dir), "--json"])
    assert code == 0
    result = _last_json(capsys.readouterr().out)
    for key in ("perplexity", "tokens", "windows", "seqlen", "kl"):
        assert key in result
    assert result["windows"] == 3 and result["seqlen"] == 32 and result["tokens"] == 3 * 31
    assert math.isfinite(result["perplexity"]) and result["perplexity"] > 1
    assert abs(result["kl"]) < 1e-6  # a model against itself


def test_eval_without_kl_is_null(tiny_llama_dir, tiny_text_file, capsys):
    assert main(["-q", "eval", str(tiny_llama_dir), "--data", str(tiny_text_file), "--seqlen", "32",
                 "--windows", "1", "--json"]) == 0
    assert _last_json(capsys.readouterr().out)["kl"] is None


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_eval_of_several_models_prints_a_row_each_and_needs_a_label_each(tiny_llama_dir, tiny_text_file, capsys):
    argv = ["-q", "eval", str(tiny_llama_dir), str(tiny_llama_dir), "--data", str(tiny_text_file), "--seqlen", "32",
            "--windows", "1"]
    assert "1 --label for 2 models" in _error(argv + ["--label", "a"], capsys)
    assert main(argv + ["--label", "a", "--label", "b", "--json"]) == 0
    rows = _last_json(capsys.readouterr().out)
    assert [r["label"] for r in rows] == ["a", "b"] and rows[0]["perplexity"] == rows[1]["perplexity"]


def test_unknown_model(capsys):
    err = _error(["-q", "info", "no-such-org/no-such-model"], capsys)
    assert "no-such-org/no-such-model" in err and "local" in err


def test_missing_local_path(tmp_path, capsys):
    err = _error(["-q", "info", str(tmp_path / "missing-dir")], capsys)
    assert "missing-dir" in err


def test_empty_text(tiny_llama_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    err = _error(["-q", "eval", str(tiny_llama_dir), "--data", str(empty), "--seqlen", "16"], capsys)
    assert "empty" in err


def test_seqlen_longer_than_text(tiny_llama_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    err = _error(["-q", "eval", str(tiny_llama_dir), "--data", str(short), "--seqlen", "2048"], capsys)
    assert "--seqlen" in err


def test_nan_weights(tiny_builders, tiny_tokenizer, tmp_path, capsys):
    model = tiny_builders.llama(len(tiny_tokenizer))
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan-model")
    tiny_tokenizer.save_pretrained(tmp_path / "nan-model")
    err = _error(["-q", "info", str(tmp_path / "nan-model")], capsys)
    assert "model.layers.0.mlp.down_proj.weight" in err and "NaN" in err


def test_bad_numbers_rejected_by_argparse(tiny_llama_dir, capsys):
    with pytest.raises(SystemExit):
        main(["eval", str(tiny_llama_dir), "--seqlen", "0"])
    assert "positive integer" in capsys.readouterr().err


def test_invalid_config_name_in_space(tiny_llama_dir, tmp_path, capsys):
    bad = tmp_path / "space.json"
    bad.write_text(json.dumps(["nf4-g64-s8x256-r0", "nf5-g64"]))
    err = _error(["-q", "profile", "--model", str(tiny_llama_dir), "--no-fisher", "--no-act", "--no-kl", "--space", str(bad),
                  "--out", str(tmp_path / "p")], capsys)
    assert "invalid config name 'nf5-g64'" in err


def test_help_texts_name_one_default_each():
    """No option's help names two defaults (e.g. apply --model: the allocation's model, the built-in one)."""
    import argparse
    import re

    from bitalloc.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            text = action.help or ""
            assert len(re.findall(r"\(default\b|default:|\bdefault\)", text)) <= 1, (name, action.dest, text)


@pytest.mark.parametrize("argv, message", [
    (["profile", "--kl-levels", "0.01,-1"], "positive numbers"),
    (["profile", "--kl-levels", "a,b"], "comma-separated numbers"),
    (["profile", "--kl-windows", "0"], "positive integer"),
    (["solve", "p", "--budget", "3", "--refine", "0"], "positive integer"),
])
def test_objective_flags_are_checked_when_parsed(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_profile_refuses_an_unknown_calibration_part_before_loading(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse: a value outside the choices
        main(["-q", "profile", "--calib-part", "first", "--out", str(tmp_path / "p")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--calib-part" in err and "second-half" in err and not (tmp_path / "p").exists()
