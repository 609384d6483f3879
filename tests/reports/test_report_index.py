"""`write_index`: reports/README.md from every reports/*/results.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bitalloc.reports.index import write_index
from bitalloc.reports.index import main

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32  # the index only links figures, it does not read them


def _bench(root: Path, name: str, md: str, data: dict | None = None, figures: tuple[str, ...] = ()) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "results.md").write_text(md)
    if data is not None:
        (folder / "results.json").write_text(json.dumps(data))
    for fig in figures:
        (folder / fig).parent.mkdir(parents=True, exist_ok=True)
        (folder / fig).write_bytes(PNG)


@pytest.fixture
def reports(tmp_path) -> Path:
    root = tmp_path / "reports"
    _bench(root, "solver_scale",
           "# Solver scale\n\nA 70B-shaped problem, see [the raw numbers](results.json).\n\n"
           "| run | s |\n|---|---:|\n| highs | 0.45 |\n\n## More\n\n| other | table |\n",
           {"date": "2026-11-27 04:06 UTC", "command": ".venv/bin/python bench/solver_scale.py",
            "machine": {"cpu": "AMD EPYC", "cores": 2}, "total_bench_seconds": 62.0})
    _bench(root, "quality",
           "# Quality on the built-in model\n\n- perplexity against bits\n- KL too\n\n| model | ppl |\n| --- | ---: |\n| a | 14 |\n",
           {"date": "2026-11-28T10:00:00+00:00", "machine": "x86_64, H100", "wall_s": 9000.0},
           figures=("pareto.png", "sub/pareto-fisher.png", "allocation-3.0.png"))
    _bench(root, "fisher", "# Fisher estimates\n\nCheap vs full.\n", {"elapsed_s": 1241.8})
    (root / "not_a_benchmark").mkdir()
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "fisher_estimates.py").write_text('OUT = ROOT / "reports" / "fisher"\n')
    (bench / "_helper.py").write_text('OUT = ROOT / "reports" / "quality"\n')
    return root


def test_index_overview_headline_and_sections(reports):
    path = write_index(reports)
    assert path == reports / "README.md"
    text = path.read_text()
    lines = text.splitlines()
    # the headline Pareto figure comes first, before the overview table
    first_image = next(i for i, line in enumerate(lines) if line.startswith("!["))
    assert lines[first_image].endswith("(quality/pareto.png)")
    assert first_image < next(i for i, line in enumerate(lines) if line.startswith("| benchmark |"))
    # one overview row per benchmark folder with a results.md, quality first
    rows = [line for line in lines if line.startswith("| [")]
    assert [r.split("]")[0][3:] for r in rows] == ["quality", "fisher", "solver_scale"]
    quality, fisher, scale = rows
    assert "x86_64, H100" in quality and "2026-11-28 10:00" in quality and "2.50 h" in quality
    assert "| - |" in quality  # no command recorded and no script found (helpers are skipped)
    assert "`python bench/fisher_estimates.py`" in fisher and "20.7 min" in fisher
    assert "AMD EPYC, 2 cores" in scale and "`.venv/bin/python bench/solver_scale.py`" in scale and "62.0 s" in scale
    # sections: summary, first table only, figures, link to the full page; links made relative to reports/
    assert "## Solver scale" in text and "[the raw numbers](solver_scale/results.json)" in text
    assert "| highs | 0.45 |" in text and "| other | table |" not in text
    assert "- perplexity against bits\n- KL too" in text
    for fig in ("quality/pareto.png", "quality/sub/pareto-fisher.png", "quality/allocation-3.0.png"):
        assert f"]({fig})" in text
    assert "Full results: [fisher/results.md](fisher/results.md)." in text
    assert "not_a_benchmark" not in text


def test_index_without_results_or_folder(tmp_path):
    (tmp_path / "reports").mkdir()
    text = write_index(tmp_path / "reports").read_text()
    assert "No benchmark results yet" in text
    with pytest.raises(FileNotFoundError):
        write_index(tmp_path / "missing")


def test_index_is_stable_and_runs_as_a_module(reports):
    main([str(reports)])
    first = (reports / "README.md").read_text()
    write_index(reports)
    assert (reports / "README.md").read_text() == first


def test_committed_reports_index_is_up_to_date():
    """reports/README.md is what `make report-index` makes from the committed results."""
    root = Path(__file__).resolve().parents[2] / "reports"
    if not (root / "README.md").is_file():
        pytest.skip("no reports/README.md in this checkout")
    committed = (root / "README.md").read_text()
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "reports"
        shutil.copytree(root, copy)
        regenerated = write_index(copy, bench_dir=root.parent / "bench").read_text()
    assert regenerated == committed, "reports/README.md is stale: run `make report-index`"
