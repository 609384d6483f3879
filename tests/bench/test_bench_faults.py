"""bench/faults.py's report: one table of kills survived, a row per command and model whose results are present."""

from __future__ import annotations

import json

from bench_scripts import load_bench



def _bench():
    return load_bench("faults.py", "faults")


def _record(command: str, kill: int, equal: bool, lock: bool | None) -> dict:
    record = {"command": command, "kill": kill, "kill_point": 1.0, "killed_mid_run": True,
              "parts_or_temporaries_left": kill, "half_written_loaded": False, "rerun_equals_uninterrupted": equal}
    if lock is not None:
        record["lock_left"] = lock
    return record


def test_results_md_has_a_row_per_command_and_model_and_counts_what_the_records_say(tmp_path):
    faults = _bench()
    common = {"machine": "m", "date": "d", "wall_s": 1.0}
    (tmp_path / "results.json").write_text(json.dumps(dict(common, command="tiny run", kills=[
        _record("apply", 0, True, None), _record("apply", 1, False, None)])))
    text = faults.render(tmp_path)
    assert "- tiny: Tiny seeded Llama" in text and "builtin" not in text
    assert "| tiny | `apply` | 2 | 2 | 1 | - | 0 | 1 of 2 |" in text
    (tmp_path / "results-builtin.json").write_text(json.dumps(dict(common, command="builtin run", load="3.0", kills=[
        _record("profile --jobs 2", 0, True, True), _record("profile --jobs 2", 3, True, False)])))
    text = faults.render(tmp_path)
    assert text.index("| tiny | `apply`") < text.index("| builtin | `profile --jobs 2`")
    assert "`builtin run` (m, load 3.0; 1 s)" in text
    assert "| builtin | `profile --jobs 2` | 2 | 2 | 1 | 1 | 0 | 2 of 2 |" in text
