"""The `bitalloc report` command: the contract paths, and errors as one clear line."""

from __future__ import annotations

import re

from bitalloc.cli import main


def test_cli_report_contract(report_inputs, tmp_path, capsys):
    """`bitalloc report PROFILE --sweep CSV --alloc JSON --out DIR` writes DIR/report.md with relative PNG links."""
    out = tmp_path / "report"
    i = report_inputs
    code = main(["-q", "report", str(i["profile"]), "--sweep", str(i["sweep"]), "--alloc", str(i["allocs"][0]),
                 "--out", str(out), "--objectives", "plain"])
    assert code == 0
    assert f"report written to {out / 'report.md'}" in capsys.readouterr().out
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (out / "report.md").read_text())
    assert sorted(links) == ["allocation-alloc-3.5.png", "pareto.png", "sensitivity.png"]
    assert all((out / link).is_file() for link in links)
    assert "fisher objective" not in (out / "report.md").read_text()  # --objectives plain


def test_cli_report_several_allocs_and_evals(report_inputs, tmp_path):
    out = tmp_path / "report"
    i = report_inputs
    argv = ["-q", "report", str(i["profile"]), "--evals", str(i["evals"]), "--alloc", *map(str, i["allocs"]),
            "--out", str(out), "--budgets", "3,4"]
    assert main(argv) == 0
    assert {p.name for p in out.glob("allocation-*.png")} == {"allocation-alloc-3.5.png", "allocation-alloc-4.5.png"}


def test_cli_report_errors(report_inputs, plain_profile, tmp_path, capsys):
    empty = tmp_path / "evals.jsonl"
    empty.write_text("")
    assert main(["-q", "report", str(report_inputs["profile"]), "--evals", str(empty), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bitalloc report: error:") and "is empty" in err
    assert main(["-q", "report", str(plain_profile), "--objectives", "fisher", "--out", str(tmp_path / "r")]) == 2
    assert "no 'error_fisher' values" in capsys.readouterr().err
    assert main(["-q", "report", str(tmp_path / "no-profile"), "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
