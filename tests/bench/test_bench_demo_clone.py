"""bench/demo_clone.py: step times from the demo's echoed commands, and its report."""

from __future__ import annotations

import json
import math

from bench_scripts import load_bench



def _bench():
    return load_bench("demo_clone.py", "demo_clone")


LINES = [(0.5, "python3 -m venv .venv"), (80.0, ".venv/bin/bitalloc info | tail -n 3"),
         (81.0, ".venv/bin/bitalloc profile --space default --out demo-out/profile"),
         (240.0, ".venv/bin/bitalloc sweep demo-out/profile --budgets 2.25:4.5:0.125"),
         (300.0, ".venv/bin/bitalloc eval smollm2-135m demo-out/model-2.75 --data shakespeare"),
         (500.0, ".venv/bin/bitalloc report demo-out/profile --out demo-out/report")]


def test_steps_start_at_their_echoed_commands_and_end_at_the_next():
    steps = _bench().step_times(LINES, 520.0)
    assert [s["step"] for s in steps] == ["set-up of .venv", "profile", "sweep, solves and applies", "evaluation",
                                          "report"]
    assert [(s["start_s"], s["end_s"]) for s in steps] == [(0.0, 81.0), (81.0, 240.0), (240.0, 300.0), (300.0, 500.0),
                                                           (500.0, 520.0)]
    missing = _bench().step_times(LINES[:3], 300.0)  # a step never echoed has no time
    assert math.isnan(missing[2]["start_s"])


def test_report_states_the_time_the_verdict_and_every_evaluation(tmp_path):
    bench = _bench()
    evals = [{"label": "original", "bits_per_param": None, "perplexity": 38.4, "kl": 0.0, "model_seconds": 40.0},
             {"label": "alloc-3.25", "bits_per_param": 3.25, "perplexity": 59.7, "kl": 0.46, "model_seconds": 55.0}]
    data = {"make_args": [], "date": "d", "machine": "m", "commit": "abc1234", "wall_s": 575.5,
            "steps": bench.step_times(LINES, 575.5), "profile_seconds": 130.0, "load_start": "0.1",
            "load_end": "1.9", "peak_rss_kb": 3 * 2**20, "evals": evals}
    bench.write_report(tmp_path, data)
    text = (tmp_path / "results.md").read_text()
    assert "**9:35.50 wall time** (goal: at most 10 minutes: met)" in text
    assert "| alloc-3.25 | 3.2500 | 59.70 | 0.4600 | 55.0 |" in text and "3.0 GiB" in text
    assert json.loads((tmp_path / "results.json").read_text())["wall_s"] == 575.5
    bench.write_report(tmp_path, dict(data, wall_s=601.0))
    assert "10:01.00 wall time** (goal: at most 10 minutes: missed)" in (tmp_path / "results.md").read_text()
