"""The README's Python API snippet runs as written.

The fast test runs it on the tiny Llama (the snippet's ``MODEL = ...`` line swapped for its
directory, everything else verbatim); the slow one runs it verbatim on the built-in model.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL_LINE = re.compile(r'^MODEL = "[^"]*"', re.M)


def python_api_snippet() -> str:
    """The first ```python block under the README's "## Python API" heading."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("\n## Python API\n"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_python_api_snippet_names_its_model_on_one_line():
    assert len(MODEL_LINE.findall(python_api_snippet())) == 1


def test_the_readme_python_snippet_runs_as_written_on_a_tiny_model(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    code = MODEL_LINE.sub(f"MODEL = {str(tiny_llama_dir)!r}", python_api_snippet())
    namespace: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)
    assert (tmp_path / "report" / "report.md").is_file() and (tmp_path / "model-3.25" / "bitalloc.json").is_file()
    assert namespace["alloc"].bits_per_param <= 3.25
    original, quantized = namespace["rows"]
    assert original["kl"] == 0.0 and quantized["kl"] > 0 and quantized["kl_to"] == str(tiny_llama_dir)


@pytest.mark.slow
def test_the_readme_python_snippet_runs_verbatim_on_the_built_in_model(tmp_path):
    done = subprocess.run([sys.executable, "-c", python_api_snippet()], cwd=tmp_path, capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "report" / "report.md").is_file()
