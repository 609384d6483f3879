"""`bitalloc.report` end to end on synthetic profiles: every figure rendered, report.md links them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from report_helpers import png_size

import bitalloc
from bitalloc.reports.data import fragility, profile_info, uniform_points


def _linked_images(report_md: Path) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report_md.read_text())


def _check_png(path: Path) -> None:
    width, height = png_size(path)
    assert 500 <= width <= 5000 and 300 <= height <= 5000, (path, width, height)
    pixels = imread(path)
    assert pixels.shape[:2] == (height, width)
    assert float(np.std(pixels[..., :3])) > 0.05  # not a blank canvas


@pytest.fixture(scope="module")
def full_report(report_inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full-report") / "report"
    i = report_inputs
    path = bitalloc.report(i["profile"], sweep=i["sweep"], evals=i["evals"], allocs=i["allocs"], out=out)
    assert path == out / "report.md"
    return path


def test_every_figure_is_a_sane_png_with_svg_and_referenced(full_report):
    out = full_report.parent
    expected = {"pareto.png", "sensitivity.png", "allocation-alloc-3.5.png", "allocation-alloc-4.5.png"}
    assert {p.name for p in out.glob("*.png")} == expected
    linked = _linked_images(full_report)
    assert set(linked) == expected  # relative paths, every figure embedded once
    for name in expected:
        _check_png(out / name)
        svg = (out / name).with_suffix(".svg").read_text()
        assert "<svg" in svg and "<dc:date>" not in svg  # reproducible: no timestamp


def test_report_tables(full_report, report_inputs):
    text = full_report.read_text()
    # both objectives drawn: plain from the sweep, fisher computed by the report
    assert "### Exact allocations, plain objective" in text and "### Exact allocations, fisher objective" in text
    assert f"Source: sweep `{report_inputs['sweep']}`" in text
    assert "computed by the report" in text
    assert "omitted" not in text
    # allocations table: budget, achieved bits, status, and the measured perplexity matched from the evals
    row = next(line for line in text.splitlines() if line.startswith("| [`alloc-3.5.json`]"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "3.5" and cells[5] == "optimal" and cells[8] == "16.2500"
    row45 = next(line for line in text.splitlines() if line.startswith("| [`alloc-4.5.json`]"))
    assert row45.rstrip().endswith("| - |")  # not evaluated
    # evals table lists every model, extra keys ignored
    for label in ("original", "uniform nf3", "uniform nf4", "bitalloc 3.5"):
        assert f"| {label} |" in text


def test_uniform_points_and_fragility_numbers(report_inputs):
    info = profile_info(report_inputs["profile"])
    df = info.df
    uni = uniform_points(df).set_index("config")
    assert len(uni) == df["config"].nunique()
    sub = df[df["config"] == "nf3-g64-s8x256-r0"]
    params = float((sub["rows"] * sub["cols"]).sum())
    assert uni.loc["nf3-g64-s8x256-r0", "bits_per_param"] == pytest.approx(sub["storage_bits"].sum() / params)
    assert uni.loc["nf3-g64-s8x256-r0", "error"] == pytest.approx(sub["error"].sum())
    assert not uni.loc["nf2-g64-s8x256-r0", "dominated"]  # the cheapest is never dominated

    ranked, ref = fragility(df, "error", 3.0)
    assert ref == 3.0
    assert ranked["error"].is_monotonic_decreasing
    top = ranked.iloc[0]
    rows = df[(df["matrix"] == top["matrix"]) & (df["bits_per_param"] <= 3.0)]
    assert top["error"] == pytest.approx(rows["error"].min())
    assert ranked["share"].sum() == pytest.approx(1.0)


def test_profile_without_fisher_marks_the_omission(plain_profile, tmp_path):
    path = bitalloc.report(plain_profile, out=tmp_path / "r")
    text = path.read_text()
    assert "Fisher curve omitted" in text
    assert "### Exact allocations, plain objective" in text and "fisher objective" not in text
    assert set(_linked_images(path)) == {"pareto.png", "sensitivity.png"}
    for name in ("pareto.png", "sensitivity.png"):
        _check_png(tmp_path / "r" / name)


def test_figures_of_a_one_layer_profile_with_names_of_another_architecture(tmp_path):
    """GPT-2 style names, a single layer, evals with only the original: nothing breaks."""
    from synthetic import synthetic_table, write_synthetic_profile

    table = synthetic_table(n_layers=1, seed=3, fisher=False)
    names = {n: f"transformer.h.0.{k}" for n, k in zip(
        table["matrix"].unique(), ["attn.c_attn", "attn.c_proj", "attn.c_q", "attn.c_k", "mlp.c_fc", "mlp.c_fc2", "mlp.c_proj"])}
    table["matrix"] = table["matrix"].map(names)
    prof = write_synthetic_profile(tmp_path / "prof", table, model="gpt2-like")
    alloc = bitalloc.solve(prof, 3.0).save(tmp_path / "a.json")
    evals = tmp_path / "e.jsonl"
    evals.write_text('{"label": "original", "bits_per_param": null, "perplexity": 30.5}\n')
    path = bitalloc.report(prof, evals=evals, allocs=[alloc], out=tmp_path / "r", budgets=[2.5, 3.0])
    assert set(_linked_images(path)) == {"pareto.png", "sensitivity.png", "allocation-a.png"}
    assert "computed by the report (2 budgets" in path.read_text()
    for name in _linked_images(path):
        _check_png(tmp_path / "r" / name)


def test_sweep_with_lowrank_outside_the_budget_draws_the_hull_in_stored_bits(report_inputs, tmp_path):
    """LQ-LoRA's convention: exact points are in stored bits, so the hull drawn must be too."""
    from bitalloc.reports.data import pareto_curves, read_sweep

    pareto, _, _ = bitalloc.sweep(report_inputs["profile"], [3.0, 4.0], objective="plain",
                                  exclude_lowrank_from_budget=True)
    path = tmp_path / "lq.csv"
    pareto.to_csv(path, index=False)
    info = profile_info(report_inputs["profile"])
    (curve,) = pareto_curves(info, ["plain"], sweep=read_sweep(path), sweep_path=str(path))
    assert "left the low-rank factors out" in curve.source
    hull_x, hull_y = curve.hull["bits_per_param"].to_numpy(), curve.hull["objective"].to_numpy()
    for r in curve.ilp.itertuples():  # every exact point on or above the stored-bits hull
        assert r.objective >= np.interp(r.bits_per_param, hull_x, hull_y) * (1 - 1e-9)


def test_a_destroyed_model_is_listed_off_scale_not_plotted_to_the_top():
    import pandas as pd
    from matplotlib.figure import Figure

    from bitalloc.reports.pareto import OFF_SCALE_FACTOR, _measured_panel

    evals = pd.DataFrame([
        {"label": "original", "bits_per_param": None, "perplexity": 16.0, "baseline": True, "objective": None},
        {"label": "nf4", "bits_per_param": 4.1, "perplexity": 19.0, "baseline": True, "objective": None},
        {"label": "ours-3", "bits_per_param": 3.0, "perplexity": 37.0, "baseline": False, "objective": "fisher"},
        {"label": "ours-2.5", "bits_per_param": 2.5, "perplexity": 2e9, "baseline": False, "objective": "fisher"},
    ])
    ax = Figure().add_subplot()
    _measured_panel(ax, evals, "perplexity", "perplexity", "measured", (2.0, 5.0))
    assert ax.get_ylim()[1] == pytest.approx(OFF_SCALE_FACTOR * 16.0)
    notes = [t.get_text() for t in ax.texts if "off scale" in t.get_text()]
    assert len(notes) == 1 and "ours-2.5" in notes[0] and "ours-3" not in notes[0]


def test_fixed_and_solver_rank_points_of_one_objective_are_separate_curves(tmp_path):
    import pandas as pd
    from matplotlib.figure import Figure

    from bitalloc.reports import load_evals
    from bitalloc.reports.pareto import _measured_panel

    path = tmp_path / "e.jsonl"
    rows = [{"label": "original", "bits_per_param": None, "perplexity": 16.0}]
    rows += [{"label": f"{mode}-{b}", "bits_per_param": b, "perplexity": 30 - 2 * b + (mode == "fixed"),
              "objective": "fisher", "rank_mode": mode} for mode in ("fixed", "solver") for b in (3.0, 3.5, 4.0)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    evals = load_evals(path)
    assert pd.isna(evals["rank_mode"].iloc[0])
    assert evals["rank_mode"].iloc[1:].tolist() == ["fixed"] * 3 + ["solver"] * 3
    ax = Figure().add_subplot()
    _measured_panel(ax, evals, "perplexity", "perplexity", "measured", (2.0, 5.0))
    curves = {line.get_label(): list(line.get_xdata()) for line in ax.get_lines()}
    assert curves["bitalloc (fisher), rank fixed"] == [3.0, 3.5, 4.0]
    assert curves["bitalloc (fisher), rank solver"] == [3.0, 3.5, 4.0]
