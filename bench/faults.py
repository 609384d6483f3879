"""Fault benchmark: kill `bitalloc profile` (--jobs 1 and 2) and `bitalloc apply` at random points.

Each command runs in its own process group and gets SIGKILL (workers included) at a random
point of its work: `profile` once a random number of its matrices (0 to all but one) is in
``parts/``, `apply` a random time after its temporary directory appears. Then:

- nothing half-written loads: ``load_profile`` refuses an unfinished profile, ``bitalloc.load``
  finds no applied directory (or a complete one, when the run finished before the kill);
- the same command, rerun, gives outputs equal to an uninterrupted run's (the profile table
  without its timing columns; every SHA-256 of the applied directory).

A tiny seeded Llama (4 layers, hidden 64, 28 targets) keeps a run at seconds; ``--builtin`` runs
the same on the built-in model, on the targets ``--include`` selects (default: the first layer's 7
matrices), rank 0 of the ``default`` space. Results go to reports/faults/: ``results.md`` (a table
of kills survived per model), and per model ``results[-builtin].json`` (one record per kill) and
``results[-builtin].csv`` (the same records).

    python bench/faults.py --kills 6
    python bench/faults.py --builtin --kills 3 --apply-window 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pandas as pd

SPACE = ["nf2-g16-s8x16-r0", "nf3-g16-s8x16-r0", "nf4-g16-s16-r0", "nf3-g32-s4x16-r4", "nf2-g16-s8x16-r4-lr8"]
TIMING = ["seconds", "iterations"]


def _tiny_model(folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(folder)


def _bitalloc(*args: str) -> list[str]:
    return [sys.executable, "-m", "bitalloc.cli", "-q", *args]


def _run(cmd: list[str], kill_when: Callable[[], bool] | None = None) -> bool:
    """Run ``cmd``; SIGKILL its process group as soon as ``kill_when()`` holds. Returns whether it was killed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    if kill_when is None:
        if proc.wait() != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed")
        return False
    while proc.poll() is None:
        if kill_when():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    return False


def _after_parts(out: Path, count: int) -> Callable[[], bool]:
    """Kill point of a profile: ``count`` finished matrices in ``parts/`` (0: once meta.json exists)."""
    return lambda: (out / "meta.json").exists() and len(list((out / "parts").glob("*.csv"))) >= count


def _inside_apply(out: Path, delay: float) -> Callable[[], bool]:
    """Kill point of an apply: ``delay`` seconds after its temporary directory appears."""
    seen: list[float] = []

    def due() -> bool:
        if not seen and any(out.parent.glob(f".{out.name}.tmp-*")):
            seen.append(time.perf_counter())
        return bool(seen) and time.perf_counter() - seen[0] >= delay

    return due


def _table(out: Path) -> pd.DataFrame:
    from bitalloc.profiles import load_profile

    df, _ = load_profile(out)
    return df.drop(columns=TIMING)


def _digests(out: Path) -> dict[str, str]:
    from bitalloc.apply import read_info

    return read_info(out, verify=True)["sha256"]


def _half_written_loads(kind: str, out: Path) -> bool:
    """Whether an output left by a killed run is accepted by a reader although unfinished."""
    from bitalloc.errors import BitallocError

    try:
        if kind == "apply":
            from bitalloc.apply import load

            if not out.exists():
                return False
            load(out)
        else:
            _table(out)
    except (BitallocError, ValueError, OSError):
        return False
    return True  # accepted: counted as half-written only when it differs from the reference (below)


#: What each model mode profiles, for the report: (json file stem, description).
MODES = {"tiny": ("results", "Tiny seeded Llama (4 layers, hidden 64, 28 targets), 5 configs, CPU."),
         "builtin": ("results-builtin", "The built-in model (SmolLM2-135M), the targets of --include (default: the "
                                        "first layer's 7), the `default` "
                                        "space at rank 0 (24 configs), no Fisher, CPU.")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=6, help="kill points per command (default 6)")
    parser.add_argument("--builtin", action="store_true", help="the built-in model instead of the tiny Llama")
    parser.add_argument("--include", default=r"layers\.0\.", metavar="REGEX",
                        help="with --builtin: the targets profiled and applied (default: the first layer's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--apply-window", type=float, default=1.5, metavar="S",
                        help="kill apply a uniform 0..S seconds after its temporary directory appears (default 1.5)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "reports" / "faults"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    started = time.perf_counter()
    report = Path(args.out)
    report.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bitalloc-faults-") as tmp_name:
        tmp = Path(tmp_name)
        if args.builtin:  # the dequantized built-in model is reused from the user's cache: converting it is no fault
            user_cache = Path(os.environ.get("BITALLOC_CACHE") or Path.home() / ".cache" / "bitalloc")
            if (user_cache / "gguf").is_dir():
                shutil.copytree(user_cache / "gguf", tmp / "cache" / "gguf")
            target_args = ["--space", "default", "--ranks", "0", "--include", args.include]
            model_args: list[str] = []
        else:
            model = tmp / "model"
            _tiny_model(model)
            space = tmp / "space.json"
            space.write_text(json.dumps(SPACE))
            target_args = ["--space", str(space)]
            model_args = ["--model", str(model)]
        os.environ["BITALLOC_CACHE"] = str(tmp / "cache")

        def profile_cmd(out: Path, jobs: int) -> list[str]:
            return _bitalloc("profile", *model_args, "--no-fisher", "--no-act", "--no-kl", *target_args, "--jobs", str(jobs), "--out", str(out))

        _run(profile_cmd(tmp / "ref-profile", 1))
        _run(profile_cmd(tmp / "ref-profile-j2", 2))
        reference_tables = {1: _table(tmp / "ref-profile"), 2: _table(tmp / "ref-profile-j2")}
        n_targets = len(reference_tables[1]["matrix"].unique())
        alloc = tmp / "alloc.json"
        _run(_bitalloc("solve", str(tmp / "ref-profile"), "--budget", "4", "--out", str(alloc)))

        def apply_cmd(out: Path) -> list[str]:
            return _bitalloc("apply", str(alloc), "--out", str(out), "--device", "cpu", "--force")

        _run(apply_cmd(tmp / "ref-applied"))
        reference_digests = _digests(tmp / "ref-applied")

        rows = []
        for kind in ("profile --jobs 1", "profile --jobs 2", "apply"):
            for k in range(args.kills):
                out = tmp / f"{kind.replace(' ', '').replace('--', '-')}-{k}"
                jobs = 1 if kind.endswith("1") else 2
                reference_table = reference_tables[jobs]
                cmd = apply_cmd(out) if kind == "apply" else profile_cmd(out, jobs)
                point = (rng.uniform(0.0, args.apply_window) if kind == "apply" else rng.randrange(n_targets))
                killed = _run(cmd, _inside_apply(out, point) if kind == "apply" else _after_parts(out, point))
                # how far it got: finished matrices of a profile; for apply, a temporary directory left
                progress = (len(list(out.parent.glob(f".{out.name}.tmp-*"))) if kind == "apply"
                            else len(list((out / "parts").glob("*.csv"))))
                lock_left = (out.parent / f".{out.name}.lock").exists()  # a dead holder's: taken over
                loads = _half_written_loads("apply" if kind == "apply" else "profile", out)
                if loads:  # a reader accepted it: only fine when it is the finished output
                    same = (_digests(out) == reference_digests if kind == "apply"
                            else _table(out).equals(reference_table))
                    half_written = not same
                else:
                    half_written = False
                _run(cmd)  # rerun (a resume for the profile)
                equal = (_digests(out) == reference_digests if kind == "apply"
                         else _table(out).equals(reference_table))
                rows.append({"command": kind, "kill": k, "kill_point": round(point, 3), "killed_mid_run": killed,
                             "parts_or_temporaries_left": progress, "lock_left": lock_left,
                             "half_written_loaded": half_written, "rerun_equals_uninterrupted": equal})
                print(rows[-1], flush=True)
                shutil.rmtree(out, ignore_errors=True)  # an applied built-in model is half a gigabyte

    mode = "builtin" if args.builtin else "tiny"
    stem = MODES[mode][0]
    results = pd.DataFrame(rows)
    results.to_csv(report / f"{stem}.csv", index=False)
    command = (f"python bench/faults.py {'--builtin ' if args.builtin else ''}--kills {args.kills} --seed {args.seed} "
               f"--apply-window {args.apply_window}")
    (report / f"{stem}.json").write_text(json.dumps({
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "load": f"{os.getloadavg()[0]:.1f} (1-minute load average at the end)",
        "date": time.strftime("%Y-%m-%d %H:%M"), "command": command, "wall_s": round(time.perf_counter() - started, 1),
        "kills": json.loads(results.to_json(orient="records"))}, indent=2) + "\n")
    text = render(report)
    (report / "results.md").write_text(text)
    print(text)


def render(report: Path) -> str:
    """results.md: one table of kills survived, a row per command and model whose results JSON is in ``report``."""
    runs, rows = [], []
    for mode, (stem, description) in MODES.items():
        path = report / f"{stem}.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        load = f", load {data['load']}" if data.get("load") else ""
        runs.append(f"- {mode}: {description} `{data['command']}` ({data['machine']}{load}; {data['wall_s']:.0f} s)")
        results = pd.DataFrame(data["kills"])
        if "lock_left" not in results:
            results["lock_left"] = pd.NA
        summary = results.groupby("command", sort=False).agg(
            kills=("kill", "size"), killed_mid_run=("killed_mid_run", "sum"),
            mid_work=("parts_or_temporaries_left", lambda v: int((v > 0).sum())),
            locks=("lock_left", lambda v: "-" if v.isna().all() else int(v.fillna(False).astype(bool).sum())),
            half_written_loaded=("half_written_loaded", "sum"), rerun_equal=("rerun_equals_uninterrupted", "sum"))
        for command, r in summary.iterrows():
            rows.append(f"| {mode} | `{command}` | {r.kills} | {r.killed_mid_run} | {r.mid_work} | {r.locks} | "
                        f"{r.half_written_loaded} | {r.rerun_equal} of {r.kills} |")
    lines = ["# faults: killed profile and apply runs resume or rerun to the uninterrupted outputs", "",
             "SIGKILL (process group, workers included) of `profile` once a random number of its matrices "
             "(0 to all but one) is in `parts/`, of `apply` a random time after its temporary directory appears; "
             "then the same command again.", "",
             "| model | command | kills | killed mid-run | killed with work on disk | lock left behind | "
             "half-written output loaded | rerun equals uninterrupted |",
             "|---|---|---|---|---|---|---|---|", *rows, "", *runs, "",
             "Killed with work on disk: a profile with finished matrices in `parts/`, or an apply that left its "
             "temporary directory (removed by the rerun). Lock left behind: the killed run's `.OUT.lock`, which the "
             "rerun takes over (`-`: not recorded in that run)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
