"""Progress in the unit that moves: tokens for evaluation, matrices for profile, budgets for sweep; -q is quiet."""

from __future__ import annotations

import json
import importlib

import pytest

from bitalloc.cli import main


class _Spy:
    """A tqdm stand-in that records its unit and total and counts its updates."""

    def __init__(self, calls):
        self.calls = calls

    def __call__(self, iterable=None, **kwargs):
        record = {"unit": kwargs.get("unit"), "total": kwargs.get("total"), "done": 0,
                  "disable": kwargs.get("disable", False)}
        self.calls.append(record)
        return _Bar(iterable, record)


class _Bar:
    def __init__(self, iterable, record):
        self.iterable, self.record = iterable, record

    def __iter__(self):
        for item in self.iterable:
            self.record["done"] += 1
            yield item

    def update(self, n=1):
        self.record["done"] += n

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))


def test_eval_progress_is_in_tokens_and_quiet_with_q(tiny_llama_dir, tiny_text_file, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(importlib.import_module("bitalloc.models.evaluate"), "tqdm", _Spy(calls))
    argv = ["eval", str(tiny_llama_dir), "--data", str(tiny_text_file), "--seqlen", "16", "--windows", "3"]
    assert main(argv) == 0
    assert [(c["unit"], c["total"], c["done"], c["disable"]) for c in calls] == [("token", 48, 48, False)]
    calls.clear()
    assert main(["-q", *argv]) == 0
    assert all(c["disable"] for c in calls)


def test_eval_q_prints_no_bar(tiny_llama_dir, tiny_text_file, capsys):
    assert main(["-q", "eval", str(tiny_llama_dir), "--data", "self:2", "--seqlen", "16"]) == 0
    err = capsys.readouterr().err
    assert "token" not in err and "sampling" not in err


def test_profile_progress_is_in_matrices(tiny_llama_dir, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("bitalloc.profiles.runner.tqdm", _Spy(calls))
    space = tmp_path / "space.json"
    space.write_text(json.dumps(["nf4-g16-s16-r0", "nf3-g16-s16-r0"]))
    assert main(["profile", "--model", str(tiny_llama_dir), "--no-fisher", "--no-act", "--no-kl", "--space", str(space), "--ranks", "0",
                 "--jobs", "1", "--out", str(tmp_path / "p")]) == 0
    assert [(c["unit"], c["total"], c["done"]) for c in calls] == [("matrix", 14, 14)]


def test_sweep_progress_is_in_budgets(tiny_llama_dir, tmp_path, monkeypatch):
    space = tmp_path / "space.json"
    space.write_text(json.dumps(["nf4-g16-s16-r0", "nf3-g16-s16-r0", "nf2-g16-s16-r0"]))
    assert main(["-q", "profile", "--model", str(tiny_llama_dir), "--no-fisher", "--no-act", "--no-kl", "--space", str(space),
                 "--ranks", "0", "--out", str(tmp_path / "p")]) == 0
    calls = []
    monkeypatch.setattr(importlib.import_module("bitalloc.solvers.sweep"), "tqdm", _Spy(calls))
    assert main(["sweep", str(tmp_path / "p"), "--budgets", "3:4:0.25"]) == 0
    assert [(c["unit"], c["done"], c["disable"]) for c in calls] == [("budget", 5, False)]
    calls.clear()
    assert main(["-q", "sweep", str(tmp_path / "p"), "--budgets", "3:4:0.25"]) == 0
    assert all(c["disable"] for c in calls)
