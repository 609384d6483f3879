"""``reports/README.md``: the page of the project's measured results, built from every benchmark.

Each benchmark (``bench/NAME.py``) writes ``reports/DIR/results.md`` (title on the first
``# `` line, then a summary paragraph and tables), ``results.json`` and any figures (PNG).
:func:`write_index` collects them: an overview table (machine, date, command, wall time,
read from ``results.json`` keys ``machine``, ``date``, ``command`` and ``wall_s``; the older
names ``elapsed_s``/``total_bench_seconds`` are read too), the headline Pareto figure first
(``reports/quality/`` or ``reports/pareto/``), then per benchmark its summary, first table
and figures, linking to the full page. Run as ``python -m bitalloc.reports.index [DIR]``
(``make report-index``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from bitalloc.atomic import atomic_write_bytes

log = logging.getLogger("bitalloc.reports.index")  # the same name when run with -m

INDEX_FILE = "README.md"
RESULTS_MD = "results.md"
RESULTS_JSON = "results.json"
#: Benchmark folders whose Pareto figure heads the page, in order of preference.
HEADLINE_DIRS = ("quality", "pareto")
WALL_KEYS = ("wall_s", "elapsed_s", "total_bench_seconds", "total_seconds", "wall_seconds")
_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")


def write_index(reports_dir: str | os.PathLike[str] = "reports", *, bench_dir: str | os.PathLike[str] | None = None) -> Path:
    """Regenerate ``reports_dir/README.md`` from every ``reports_dir/*/results.md``; return its path.

    ``bench_dir`` (default: ``bench`` next to ``reports_dir``) is searched for the script
    that writes a folder when its ``results.json`` records no ``command``.
    """
    root = Path(reports_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"reports folder {root} does not exist")
    bench = Path(bench_dir) if bench_dir is not None else root.parent / "bench"
    entries = [_entry(d, bench) for d in _benchmark_dirs(root)]
    lines = [
        "# Measured results",
        "",
        "Every number on this page was measured by the benchmarks in `bench/` (`make bench`), which "
        "write their tables and figures into the folders below; this page is regenerated from them "
        "(`make report-index`). Each folder's `results.md` has the full tables and `results.json` "
        "the raw numbers.",
        "",
    ]
    headline = _headline(root)
    if headline is not None:
        rel = headline.relative_to(root).as_posix()
        lines += [f"![Pareto front: predicted error and measured quality against bits per parameter]({rel})", ""]
    if not entries:
        lines += ["No benchmark results yet: run `make bench`.", ""]
    else:
        lines += ["| benchmark | what | machine | date | command | wall time |",
                  "| --- | --- | --- | --- | --- | ---: |"]
        for e in entries:
            lines.append(f"| [{e['name']}]({e['name']}/{RESULTS_MD}) | {_cell(e['title'])} | {_cell(e['machine'])} | "
                         f"{_cell(e['date'])} | {('`' + e['command'] + '`') if e['command'] else '-'} | {e['wall']} |")
        lines.append("")
        for e in entries:
            lines += [f"## {e['title']}", ""]
            if e["summary"]:
                lines += [e["summary"], ""]
            if e["table"]:
                lines += e["table"] + [""]
            for png in e["figures"]:
                lines += [f"![{png.stem}]({png.relative_to(root).as_posix()})", ""]
            lines += [f"Full results: [{e['name']}/{RESULTS_MD}]({e['name']}/{RESULTS_MD}).", ""]
    path = root / INDEX_FILE
    atomic_write_bytes(path, ("\n".join(lines).rstrip() + "\n").encode())
    log.info("wrote %s (%d benchmarks)", path, len(entries))
    return path


def _benchmark_dirs(root: Path) -> list[Path]:
    dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and (d / RESULTS_MD).is_file()]
    first = [d for name in HEADLINE_DIRS for d in dirs if d.name == name]
    return first + [d for d in dirs if d not in first]


def _headline(root: Path) -> Path | None:
    for name in HEADLINE_DIRS:
        folder = root / name
        if folder.is_dir():
            found = sorted(folder.rglob("pareto*.png"), key=lambda p: (len(p.parts), p.as_posix()))
            if found:
                return found[0]
    return None


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _entry(folder: Path, bench: Path) -> dict[str, Any]:
    text = (folder / RESULTS_MD).read_text(encoding="utf-8")
    title, summary, table = _parse_results_md(text, folder.name)
    data: dict[str, Any] = {}
    json_path = folder / RESULTS_JSON
    if json_path.is_file():
        try:
            loaded = json.loads(json_path.read_text(encoding="utf-8"))
            data = loaded if isinstance(loaded, dict) else {}
        except json.JSONDecodeError as exc:
            log.warning("%s is not valid JSON (%s); its metadata is left out", json_path, exc)
    command = data.get("command") or _find_script(folder.name, bench)
    figures = sorted(folder.rglob("*.png"), key=lambda p: (len(p.parts), p.as_posix()))
    return {
        "name": folder.name,
        "title": title,
        "summary": summary,
        "table": table,
        "machine": _machine(data.get("machine")),
        "date": _date(data.get("date")),
        "command": str(command) if command else "",
        "wall": _wall(data),
        "figures": figures,
    }


def _parse_results_md(text: str, name: str) -> tuple[str, str, list[str]]:
    """(title, first paragraph, first table) of a results page; links made relative to reports/."""
    lines = text.splitlines()
    title = name
    start = 0
    for i, line in enumerate(lines):
        if line.startswith("# "):
            title, start = line[2:].strip(), i + 1
            break
    summary: list[str] = []
    i = start
    while i < len(lines) and not lines[i].strip():
        i += 1
    while i < len(lines) and lines[i].strip() and not lines[i].lstrip().startswith(("#", "|", "![")):
        summary.append(lines[i].strip())
        i += 1
    table: list[str] = []
    for j in range(start, len(lines)):
        if lines[j].lstrip().startswith("|"):
            k = j
            while k < len(lines) and lines[k].lstrip().startswith("|"):
                table.append(lines[k])
                k += 1
            break
    fix = lambda s: _relink(s, name)  # noqa: E731
    return title, fix("\n".join(summary)), [fix(t) for t in table]


def _relink(text: str, folder: str) -> str:
    def repl(m: re.Match) -> str:
        target = m.group(2)
        if re.match(r"^([a-z]+:|#|/)", target):
            return m.group(0)
        return f"{m.group(1)}{folder}/{target}{m.group(3)}"

    return _LINK.sub(repl, text)


def _find_script(name: str, bench: Path) -> str:
    """``python bench/X.py`` for the benchmark script that writes ``reports/NAME``, if one does."""
    if not bench.is_dir():
        return ""
    pattern = re.compile(rf"""(["']reports["']\s*/\s*["']{re.escape(name)}["'])|(reports/{re.escape(name)}\b)""")
    for script in sorted(bench.glob("*.py")):
        if script.name.startswith("_"):
            continue
        try:
            if pattern.search(script.read_text(encoding="utf-8")):
                return f"python bench/{script.name}"
        except OSError:
            continue
    return ""


def _machine(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        parts = []
        cpu = value.get("cpu") or value.get("processor")
        if cpu:
            parts.append(str(cpu))
        cores = value.get("cores") or value.get("cpu_count")
        if cores:
            parts.append(f"{cores} cores")
        for key in ("gpu", "device", "torch"):
            if value.get(key):
                parts.append(f"{key} {value[key]}" if key != "gpu" else str(value[key]))
        return ", ".join(parts) or "-"
    return str(value)


def _date(value: Any) -> str:
    if not value:
        return "-"
    text = str(value)
    m = re.match(r"^(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2})", text)
    return f"{m.group(1)} {m.group(2)}" if m else text


def _wall(data: dict[str, Any]) -> str:
    for key in WALL_KEYS:
        value = data.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _duration(float(value))
    return "not recorded"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def main(argv: list[str] | None = None) -> int:
    """``python -m bitalloc.reports.index [REPORTS_DIR]``."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    write_index(args[0] if args else "reports")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
