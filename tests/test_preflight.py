"""Fail fast: argument and file checks answer before any heavy import or model load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bitalloc import preflight
from bitalloc.cli import main
from bitalloc.preflight import TextSourceError, check_model_spec, check_text_source

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_local_text(tmp_path, monkeypatch):
    """No local WikiText-2, offline, an empty datasets cache."""
    monkeypatch.setattr(preflight, "find_data_file", lambda name: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))


def _refuse_loads(monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded although the arguments were wrong")

    for target in ("bitalloc.apply.evaluation.load_model_or_applied", "bitalloc.profiles.runner.load_model",
                   "bitalloc.apply.writer.load_model"):
        monkeypatch.setattr(target, no_load)


def test_offline_wikitext2_says_how_to_run_offline(no_local_text):
    with pytest.raises(TextSourceError) as info:
        check_text_source("wikitext2")
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message and "--data self:N" in message and "--data PATH" in message
    assert "$BITALLOC_DATA" in message and preflight.WIKITEXT2_FILE in message


def test_offline_wikitext2_in_the_datasets_cache_passes(no_local_text, tmp_path):
    (tmp_path / "hf" / "datasets" / "wikitext").mkdir(parents=True)
    check_text_source("wikitext2")
    with pytest.raises(TextSourceError, match="c4"):
        check_text_source("c4")


def test_unreachable_hub_fails_within_the_probe(no_local_text, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(preflight, "is_offline", lambda: False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    preflight.forget_probe_results()
    try:
        with pytest.raises(TextSourceError, match="cannot be reached.*--calib self:N"):
            check_text_source("wikitext2", flag="--calib")
    finally:
        preflight.forget_probe_results()


def test_text_source_forms(tmp_path):
    check_text_source(None)
    check_text_source("self:4")
    with pytest.raises(TextSourceError, match="at least one"):
        check_text_source("self:0")
    text = tmp_path / "t.txt"
    text.write_text("words")
    check_text_source(str(text))
    with pytest.raises(FileNotFoundError, match="tetx.txt"):
        check_text_source(str(tmp_path / "tetx.txt"))
    with pytest.raises(TextSourceError, match="not a file"):
        check_text_source(str(tmp_path))
    with pytest.raises(TextSourceError, match="unknown text source"):
        check_text_source("wikitxt2")


def test_model_specs(tmp_path):
    for ok in (None, "smollm2-135m", "HuggingFaceTB/SmolLM2-135M", str(tmp_path)):
        check_model_spec(ok)
    for bad in (str(tmp_path / "no-such-dir"), "./typo", "model.gguf", "a/b/c"):
        with pytest.raises(FileNotFoundError):
            check_model_spec(bad)


def test_eval_offline_default_data_fails_before_the_model_loads(no_local_text, monkeypatch, capsys):
    _refuse_loads(monkeypatch)
    assert main(["eval", "--windows", "2"]) == 2
    err = capsys.readouterr().err
    assert "--data self:N" in err and "BITALLOC_DATA" in err


def test_library_eval_checks_the_text_before_loading(no_local_text, monkeypatch):
    from bitalloc.apply import evaluate_model

    _refuse_loads(monkeypatch)
    with pytest.raises(TextSourceError, match="self:N"):
        evaluate_model(None, data="wikitext2")
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        evaluate_model("./no-such-model", data="self:2")


def test_profile_with_a_mistyped_calibration_file_fails_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from bitalloc.profiles import ProfileRequest, profile

    _refuse_loads(monkeypatch)
    missing = str(tmp_path / "calib.txt")
    assert main(["profile", "--calib", missing, "--out", str(tmp_path / "p")]) == 2
    assert "calib.txt" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="calib.txt"):
        profile(ProfileRequest(calib=missing, out=tmp_path / "p", progress=False))


def test_apply_with_a_busy_output_fails_before_the_model_loads(tmp_path, monkeypatch, capsys):
    _refuse_loads(monkeypatch)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep").write_text("keep me")
    assert main(["apply", "--uniform", "nf4-g64-s8x256-r0", "--out", str(busy)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["apply", str(tmp_path / "alloc.json"), "--out", str(tmp_path / "new")]) == 2
    assert "alloc.json" in capsys.readouterr().err
    assert main(["apply", "--uniform", "nf4-g64-s8x256-r0", "--model", "./no-such-model",
                 "--out", str(tmp_path / "new")]) == 2
    assert "no-such-model" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["eval", "--windows", "2"],
    ["eval", "./no-such-model", "--data", "self:2"],
    ["profile", "--calib", "no/such/calib.txt"],
    ["apply", "--uniform", "nf4-g46-s8x256-r0", "--out", "q"],
    ["info", "./no-such-model"],
])
def test_refusals_import_no_heavy_module(argv, tmp_path):
    """The checks run before torch is imported: a refusal costs a fraction of the model load."""
    script = textwrap.dedent(f"""
        import json, sys
        from bitalloc import preflight
        from bitalloc.cli import main
        preflight.find_data_file = lambda name: None  # no local WikiText-2, as in a fresh clone
        code = main({argv!r})
        print(json.dumps({{"code": code, "torch": "torch" in sys.modules}}))
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"), BITALLOC_DATA=str(tmp_path / "data"))
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"code": 2, "torch": False}, done.stderr
