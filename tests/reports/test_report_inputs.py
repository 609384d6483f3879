"""Bad input to `bitalloc.report`: clear errors, raised before any figure is drawn."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from report_helpers import eval_lines

import bitalloc
from bitalloc.reports import load_evals
from bitalloc.reports.data import check_sweep, profile_info, read_sweep


def _no_output(out):
    return not out.exists() or not any(out.iterdir())


# ----- sweeps ------------------------------------------------------------------------------
def test_sweep_records_its_profile(report_inputs):
    table = pd.read_csv(report_inputs["sweep"])
    meta = json.loads((report_inputs["profile"] / "meta.json").read_text())
    assert set(table["model_hash"]) == {meta["model_hash"]}
    assert set(table["profile_sha256"]) == {meta["table"]["sha256"]}


def test_sweep_from_another_profile_is_refused(report_inputs, other_profile, tmp_path):
    out = tmp_path / "r"
    with pytest.raises(ValueError, match="made from another profile: its model hash"):
        bitalloc.report(other_profile, sweep=report_inputs["sweep"], out=out)
    assert _no_output(out)


def test_sweep_with_the_same_model_but_another_table_is_refused(report_inputs, tmp_path):
    table = pd.read_csv(report_inputs["sweep"])
    table["profile_sha256"] = "0" * 64
    path = tmp_path / "p.csv"
    table.to_csv(path, index=False)
    with pytest.raises(ValueError, match="profile table sha256"):
        bitalloc.report(report_inputs["profile"], sweep=path, out=tmp_path / "r")


def test_old_sweep_without_provenance_is_checked_against_the_bound(report_inputs, other_profile, tmp_path):
    """A sweep CSV written before the provenance columns: its points must not beat the profile's bound."""
    table = pd.read_csv(report_inputs["sweep"]).drop(columns=["model_hash", "profile_sha256"])
    path = tmp_path / "old.csv"
    table.to_csv(path, index=False)
    check_sweep(read_sweep(path), profile_info(report_inputs["profile"]), str(path))  # its own profile: fine
    # the other profile's errors are 10x larger: the sweep's points lie below its lower bound
    with pytest.raises(ValueError, match="below the profile's lower bound"):
        bitalloc.report(other_profile, sweep=path, out=tmp_path / "r")


def test_old_sweep_outside_the_profile_range_is_refused(report_inputs, tmp_path):
    table = pd.read_csv(report_inputs["sweep"]).drop(columns=["model_hash", "profile_sha256"])
    table.loc[table["kind"] == "ilp", "bits_per_param"] += 20
    path = tmp_path / "shifted.csv"
    table.to_csv(path, index=False)
    with pytest.raises(ValueError, match="outside the profile's range"):
        bitalloc.report(report_inputs["profile"], sweep=path, out=tmp_path / "r")


@pytest.mark.parametrize("content, message", [("", "is empty"), ("a,b\n1,2\n", "missing columns")])
def test_unreadable_sweep(report_inputs, tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        bitalloc.report(report_inputs["profile"], sweep=path, out=tmp_path / "r")


def test_missing_sweep_file(report_inputs, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bitalloc.report(report_inputs["profile"], sweep=tmp_path / "nope.csv", out=tmp_path / "r")


# ----- Fisher ------------------------------------------------------------------------------
def test_fisher_curve_asked_of_a_profile_without_fisher(plain_profile, tmp_path):
    out = tmp_path / "r"
    with pytest.raises(ValueError, match="objective 'fisher' asked for.*no 'error_fisher' values"):
        bitalloc.report(plain_profile, objectives=["plain", "fisher"], out=out)
    assert _no_output(out)


def test_fisher_sweep_on_a_profile_without_fisher(report_inputs, plain_profile, tmp_path):
    fisher_sweep, _, _ = bitalloc.sweep(report_inputs["profile"], [3.0, 4.0], objective="fisher")
    fisher_sweep = fisher_sweep.drop(columns=["model_hash", "profile_sha256"])  # skip the hash check
    path = tmp_path / "fisher.csv"
    fisher_sweep.to_csv(path, index=False)
    with pytest.raises(ValueError, match="holds fisher errors, but profile"):
        bitalloc.report(plain_profile, sweep=path, out=tmp_path / "r")


def test_unknown_objective(report_inputs, tmp_path):
    with pytest.raises(ValueError, match="unknown objective 'activation'"):
        bitalloc.report(report_inputs["profile"], objectives="plain,activation", out=tmp_path / "r")


# ----- evals -------------------------------------------------------------------------------
def test_load_evals_is_lenient_about_extra_keys_and_fills_defaults(report_inputs):
    evals = load_evals(report_inputs["evals"])
    assert list(evals["label"]) == ["original", "uniform nf3", "uniform nf4", "bitalloc 3.5"]
    assert evals["bits_per_param"].isna().tolist() == [True, False, False, False]
    assert evals["baseline"].tolist() == [True, True, True, False]
    assert "extra_key" not in evals.columns


def test_load_evals_defaults_kind_and_baseline(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text(eval_lines({"label": "orig", "bits_per_param": None, "perplexity": 10},
                               {"label": "q", "bits_per_param": 3.0, "perplexity": 12, "kind": "uniform"},
                               {"label": "b", "bits_per_param": 3.0, "perplexity": 11}) + "\n\n")
    evals = load_evals(path)
    assert evals["kind"].tolist() == ["original", "uniform", "bitalloc"]
    assert evals["baseline"].tolist() == [True, True, False]


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ("\n  \n", "is empty"),
        ('{"label": "a", "bits_per_param": 3, "perplexity": 9}\n{"label": "b", "perplexity": 9}\n',
         r"line 2: missing key\(s\) \['bits_per_param'\]"),
        ('{"label": "a", "bits_per_param": 3, "perplexity": 9}\nnot json\n', "line 2: not valid JSON"),
        ('[1, 2]\n', "line 1: expected a JSON object"),
        ('{"label": "a", "bits_per_param": "3", "perplexity": 9}\n', "line 1: bits_per_param must be a finite number"),
        ('{"label": "a", "bits_per_param": 3, "perplexity": null}\n', "line 1: perplexity must be a finite number"),
    ],
)
def test_bad_evals_files(report_inputs, tmp_path, content, message):
    path = tmp_path / "evals.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_evals(path)
    out = tmp_path / "r"
    with pytest.raises(ValueError, match=message):
        bitalloc.report(report_inputs["profile"], evals=path, out=out)
    assert _no_output(out)


# ----- allocations -------------------------------------------------------------------------
def test_allocation_from_another_model_is_refused(report_inputs, other_profile, tmp_path):
    with pytest.raises(ValueError, match="solved for model hash hash-synthetic.*another profile"):
        bitalloc.report(other_profile, allocs=[report_inputs["allocs"][0]], out=tmp_path / "r")


def test_allocation_with_unknown_matrix_or_config(report_inputs, tmp_path):
    data = json.loads(report_inputs["allocs"][0].read_text())
    data["assignments"]["model.layers.9.mlp.up_proj"] = "nf3-g64-s8x256-r0"
    path = tmp_path / "a.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="assigns 'model.layers.9.mlp.up_proj'"):
        bitalloc.report(report_inputs["profile"], allocs=[path], out=tmp_path / "r")
    data = json.loads(report_inputs["allocs"][0].read_text())
    data["assignments"]["model.layers.0.mlp.up_proj"] = "nf4-g32-s8x256-r0"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="did not measure"):
        bitalloc.report(report_inputs["profile"], allocs=[path], out=tmp_path / "r")
