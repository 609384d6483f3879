"""One overwrite rule for every command that writes: an existing output is refused without --force,
a path of the wrong kind always, with a message saying so; nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitalloc.cli import main
from synthetic import synthetic_table, write_synthetic_profile


@pytest.fixture(scope="module")
def prof(tmp_path_factory) -> Path:
    return write_synthetic_profile(tmp_path_factory.mktemp("prof") / "p", synthetic_table(n_layers=2))


def _commands(prof: Path, out: Path) -> dict[str, tuple[list[str], str]]:
    """command -> (argv writing to ``out``, kind of ``out``)."""
    return {
        "solve": (["solve", str(prof), "--budget", "4", "--out", str(out)], "file"),
        "sweep --out": (["sweep", str(prof), "--budgets", "3,4", "--out", str(out)], "file"),
        "sweep --allocs": (["sweep", str(prof), "--budgets", "3,4", "--allocs", str(out)], "dir"),
        "report": (["report", str(prof), "--out", str(out), "--budgets", "3,4"], "dir"),
        "merge": (["merge", str(prof), "--out", str(out)], "dir"),
        "apply": (["apply", "--uniform", "nf4-g16-s16-r0", "--out", str(out)], "dir"),
    }


COMMANDS = ["solve", "sweep --out", "sweep --allocs", "report", "merge", "apply"]


@pytest.mark.parametrize("command", COMMANDS)
def test_an_existing_output_is_refused_without_force(prof, tmp_path, capsys, command):
    out = tmp_path / "out"
    argv, kind = _commands(prof, out)[command]
    if kind == "file":
        out.write_text("keep me")
    else:
        out.mkdir()
        (out / "keep.txt").write_text("keep me")
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists" in err and "--force" in err
    kept = out if kind == "file" else out / "keep.txt"
    assert kept.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("command", COMMANDS)
def test_an_output_of_the_wrong_kind_is_refused_even_with_force(prof, tmp_path, capsys, command):
    out = tmp_path / "out"
    argv, kind = _commands(prof, out)[command]
    if kind == "file":
        out.mkdir()
    else:
        out.write_text("a file")
    assert main(["-q", *argv, "--force"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("is a directory" if kind == "file" else "is a file") in err


@pytest.mark.parametrize("command", ["solve", "sweep --out", "sweep --allocs"])
def test_force_replaces_an_existing_output(prof, tmp_path, command):
    out = tmp_path / "out"
    argv, kind = _commands(prof, out)[command]
    if kind == "file":
        out.write_text("old")
    else:
        out.mkdir()
        (out / "old.txt").write_text("old")
    assert main(["-q", *argv, "--force"]) == 0
    assert (out.read_text() != "old") if kind == "file" else any(out.glob("alloc-*.json"))
