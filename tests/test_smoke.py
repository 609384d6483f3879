"""A fresh clone with no ../shared beside it and an empty cache runs a reduced demo end to end
(`make smoke-run`) on the built-in model. Slow: not part of `make test`; run by `make smoke-clone`
(which CI runs after `make test`) and `make test-slow`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fresh_clone_runs_the_reduced_demo(tmp_path):
    if shutil.which("git") is None or shutil.which("make") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git, make and a git checkout")
    clone = tmp_path / "somewhere" / "bitalloc"  # nothing beside it: no ../shared
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    assert not (clone.parent / "shared").exists()
    cache = tmp_path / "cache"
    cache.mkdir()
    gguf = Path(os.environ.get("BITALLOC_CACHE") or Path.home() / ".cache" / "bitalloc") / "gguf"
    if gguf.is_dir():  # the built-in model's one-off conversion may be reused; nothing else is
        shutil.copytree(gguf, cache / "gguf")
    env = dict(os.environ, BITALLOC_CACHE=str(cache), PYTHONPATH=str(clone), HF_HUB_OFFLINE="1",
               BITALLOC_DATA=str(tmp_path / "no-data"))
    started = time.perf_counter()
    done = subprocess.run(["make", "-s", "smoke-run", f"BITALLOC={sys.executable} -m bitalloc.cli"], cwd=clone,
                          env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = clone / "smoke-out"
    evals = [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]
    assert [e["label"] for e in evals] == ["original", "alloc-3.25"]
    assert all(e["tokens"] == 2 * 255 and e["data"] == "self:2" for e in evals)
    assert evals[1]["perplexity"] >= evals[0]["perplexity"] * 0.99
    assert (out / "report" / "report.md").is_file()
    print(f"reduced demo in a fresh clone: {time.perf_counter() - started:.0f} s")
