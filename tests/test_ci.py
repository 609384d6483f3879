"""CI (.ci/run) runs the README's test command and the reduced demo in a fresh clone."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _recipe(target: str) -> str:
    """The prerequisites and recipe lines of a Makefile target."""
    text = (ROOT / "Makefile").read_text()
    match = re.search(rf"^{re.escape(target)}:(.*?)(?=^\S|\Z)", text, re.M | re.S)
    assert match, f"the Makefile has no {target!r} target"
    return match.group(1)


def test_ci_runs_the_readme_test_command_then_the_fresh_clone_smoke():
    commands = _commands(ROOT / ".ci" / "run")
    assert "make test" in (ROOT / "README.md").read_text()
    assert "make test" in commands and "make smoke-clone" in commands
    assert commands.index("make test") < commands.index("make smoke-clone")
    assert "-m slow tests/test_smoke.py" in _recipe("smoke-clone")
    assert "test smoke-clone" in _recipe("ci")
