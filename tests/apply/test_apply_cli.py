"""`bitalloc apply` and `bitalloc eval DIR` from the command line."""

from __future__ import annotations

import json

import pytest

from bitalloc.cli import main


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_apply_uniform_then_eval_dir(tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    out = tmp_path / "nf4"
    assert main(["-q", "apply", "--uniform", "nf4-g16-s16-r4", "--model", str(tiny_llama_dir),
                 "--out", str(out), "--json"]) == 0
    summary = _last_json(capsys)
    assert summary["targets"] == 14 and summary["adapter"] is True
    assert summary["bits_per_param"] == pytest.approx(summary["bits_per_param_on_disk"], abs=0.01)

    evals = tmp_path / "evals.jsonl"
    argv = ["-q", "eval", str(out), "--data", str(tiny_text_file), "--seqlen", "32", "--windows", "2",
            "--json", "--append", str(evals)]
    assert main(argv) == 0
    result = _last_json(capsys)
    assert result["kind"] == "uniform" and result["baseline"] is True
    assert result["bits_per_param"] == pytest.approx(summary["bits_per_param"])
    assert result["kl"] is not None and result["kl"] > 0  # KL to the source model by default
    assert result["kl_to"] == str(tiny_llama_dir)
    assert main(["-q", "eval", str(tiny_llama_dir), "--data", str(tiny_text_file), "--seqlen", "32",
                 "--windows", "2", "--append", str(evals)]) == 0
    lines = [json.loads(line) for line in evals.read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["uniform", "original"]
    assert lines[1]["bits_per_param"] is None and lines[1]["perplexity"] < lines[0]["perplexity"] * 1.5


def test_apply_errors_are_clear(tiny_llama_dir, tmp_path, capsys):
    assert main(["apply", "--out", str(tmp_path / "x")]) == 2
    assert "--uniform" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("keep me")
    assert main(["apply", "--uniform", "nf4-g16-s16-r0", "--model", str(tiny_llama_dir),
                 "--out", str(tmp_path / "busy")]) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "busy" / "file").read_text() == "keep me"
    assert main(["apply", str(tmp_path / "missing.json"), "--out", str(tmp_path / "y")]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "busy"), "--seqlen", "32"]) == 2


def test_eval_append_to_an_unwritable_path_fails_before_evaluating(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluated although the --append file cannot be written")

    monkeypatch.setattr("bitalloc.apply.evaluation.evaluate_many", no_evaluation)
    folder = tmp_path / "a-directory"
    folder.mkdir()
    assert main(["eval", str(tiny_llama_dir), "--data", "self:2", "--seqlen", "32", "--append", str(folder)]) == 2
    assert "a-directory" in capsys.readouterr().err


def test_eval_dir_on_self_text_samples_the_source_model_once(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    """Without any text, `eval DIR --data self:N` scores every model on the source model's samples."""
    from bitalloc.models import self_text

    out = tmp_path / "nf3"
    assert main(["-q", "apply", "--uniform", "nf3-g16-s16-r0", "--model", str(tiny_llama_dir), "--out", str(out)]) == 0
    capsys.readouterr()
    sampled = []
    real = self_text.sample_sequences
    from bitalloc.apply import QuantizedLinear

    def quantized_model(m) -> bool:
        return any(isinstance(mod, QuantizedLinear) for mod in m.modules())

    monkeypatch.setattr(self_text, "sample_sequences",
                        lambda m, *a, **kw: sampled.append(quantized_model(m)) or real(m, *a, **kw))
    base = ["--data", "self:3", "--seqlen", "24", "--json"]
    assert main(["-q", "eval", str(out), "--no-kl", *base]) == 0
    quantized = _last_json(capsys)
    assert main(["-q", "eval", str(tiny_llama_dir), *base]) == 0
    original = _last_json(capsys)
    assert main(["-q", "eval", str(out), *base]) == 0  # with KL: the reference is the source model
    with_kl = _last_json(capsys)
    assert sampled == [False]  # once, from the source model (not the quantized one); then from the cache
    assert quantized["data"] == original["data"] == "self:3" and quantized["tokens"] == original["tokens"] == 3 * 23
    assert with_kl["perplexity"] == pytest.approx(quantized["perplexity"], rel=1e-6) and with_kl["kl"] > 0


def _refuse_model_loads(monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("loaded a model although the arguments were wrong")

    monkeypatch.setattr("bitalloc.apply.writer.load_model", no_load)


@pytest.mark.parametrize("typo, near", [("nf4-g64-s8x265-r0", "nf4-g64-s8x256-r0"),
                                        ("nf4-g46-s8x256-r0", "nf4-g64-s8x256-r0")])
def test_apply_uniform_typo_is_refused_before_the_model_loads(typo, near, tmp_path, capsys, monkeypatch):
    _refuse_model_loads(monkeypatch)
    assert main(["apply", "--uniform", typo, "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert typo in err and near in err and "--allow-unusual-config" in err
    assert not (tmp_path / "q").exists()


def test_apply_uniform_unusual_but_valid_config_runs_when_allowed(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "odd"
    argv = ["-q", "apply", "--uniform", "nf4-g24-s16-r0", "--model", str(tiny_llama_dir), "--out", str(out)]
    assert main(argv) == 2
    assert main(argv + ["--allow-unusual-config", "--json"]) == 0
    assert _last_json(capsys)["targets"] == 14


def test_apply_uniform_block_longer_than_a_row_is_refused(tiny_llama_dir, tmp_path, capsys):
    assert main(["-q", "apply", "--uniform", "nf4-g128-s16-r0", "--model", str(tiny_llama_dir),
                 "--out", str(tmp_path / "q")]) == 2
    assert "block 128" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_interrupted_eval_append_leaves_no_empty_file(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("bitalloc.apply.evaluation.evaluate_many", interrupted)
    evals = tmp_path / "evals.jsonl"
    assert main(["eval", str(tiny_llama_dir), "--data", "self:2", "--seqlen", "16", "--append", str(evals)]) == 130
    assert not evals.exists()
    assert main(["eval", str(tiny_llama_dir), "--data", "self:2", "--seqlen", "16", "--append",
                 str(tmp_path / "no-dir" / "e.jsonl")]) == 2
    assert "no-dir" in capsys.readouterr().err


def test_eval_refuses_a_changed_byte_unless_no_verify(tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    out = tmp_path / "nf4"
    assert main(["-q", "apply", "--uniform", "nf4-g16-s16-r0", "--model", str(tiny_llama_dir), "--out", str(out)]) == 0
    weights = out / "model.safetensors"  # same size, one bit of tensor data flipped: only the digest tells
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    argv = ["-q", "eval", str(out), "--data", str(tiny_text_file), "--seqlen", "32", "--windows", "1", "--no-kl"]
    capsys.readouterr()
    assert main(argv) == 2
    assert "model.safetensors does not match the SHA-256" in capsys.readouterr().err
    assert main(argv + ["--no-verify", "--json"]) == 0
    assert _last_json(capsys)["perplexity"] > 0


def test_a_second_apply_on_the_same_out_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(
        tiny_llama_dir, tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "q"
    holder = subprocess.Popen(  # another process writing the same output: it holds .q.lock
        [sys.executable, "-c", "import sys, time; from bitalloc.atomic import output_lock\n"
         f"with output_lock({str(out)!r}):\n    print('holding', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        assert holder.stdout.readline().strip() == "holding"
        argv = ["-q", "apply", "--uniform", "nf4-g16-s16-r0", "--model", str(tiny_llama_dir), "--out", str(out)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"is being written by process {holder.pid}" in err and not out.exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # killed: its lock file stays behind
        holder.wait()
    assert (tmp_path / ".q.lock").exists()
    assert main(argv) == 0 and (out / "bitalloc.json").is_file()
    assert not (tmp_path / ".q.lock").exists()
