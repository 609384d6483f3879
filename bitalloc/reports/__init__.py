"""Reports: matplotlib figures (PNG + SVG) and a markdown page per profile, and the index of
the committed benchmark results.

- :func:`report` writes ``DIR/report.md`` with the Pareto figure (predicted error and, with
  evals, measured perplexity/KL against bits/param), an allocation map per allocation and a
  sensitivity figure; ``bitalloc report`` is its command.
- :func:`bitalloc.reports.index.write_index` regenerates ``reports/README.md`` from every
  ``reports/*/results.md`` (``python -m bitalloc.reports.index``; not re-exported here, so that
  running that module finds it not yet imported).
- :func:`split_name` / :func:`layer_grid` derive layers and matrix kinds from target names.
"""

from __future__ import annotations

from .data import load_evals
from .markdown import report
from .names import layer_grid, split_name

__all__ = ["layer_grid", "load_evals", "report", "split_name"]
