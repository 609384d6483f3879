"""``bitalloc.solvers`` stays free of torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_does_not_pull_torch():
    code = (
        "import sys; import bitalloc.solvers as s; "
        "from bitalloc.solvers import SolveOptions, solve, sweep, solve_table, lagrange_hull; "
        "import bitalloc.solvers.highs_backend, bitalloc.solvers.pulp_backend, bitalloc.solvers.core_dp; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
