"""`bitalloc profile --jobs N`: worker processes give the same table, and die with a killed profile."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from bitalloc.profiles import ProfileRequest, load_profile, profile
from bitalloc.profiles import jobs
from bitalloc.profiles.jobs import AUTO_JOBS_MIN_WORK, resolve_jobs


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _request(model_dir, out, space_file, **kw) -> ProfileRequest:
    kw.setdefault("device", "cpu")  # worker processes are a CPU feature (one process per GPU)
    return ProfileRequest(model=str(model_dir), out=out, space=str(space_file), progress=False, fisher=False,
                          act=False, kl=False, **kw)


def _without_timing(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=["seconds"]).reset_index(drop=True)


def test_resolve_jobs():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_jobs(3, cpu, 10) == 3
    assert resolve_jobs(8, cpu, 2) == 2  # never more than the matrices left
    assert resolve_jobs(4, cuda, 10) == 1  # one device: one process
    assert resolve_jobs(None, cpu, 10, work=AUTO_JOBS_MIN_WORK - 1) == 1  # tiny: not worth a process start
    assert resolve_jobs(0, cpu, 10_000, work=AUTO_JOBS_MIN_WORK) == (os.cpu_count() or 1)
    with pytest.raises(ValueError, match="--jobs"):
        resolve_jobs(-1, cpu, 10)


def test_auto_jobs_fit_the_available_memory(monkeypatch):
    from bitalloc.profiles import runner

    cpu = torch.device("cpu")
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 16)
    big = 8192 * 28672  # a 70B down_proj: about 29 GiB of working set per worker
    per_worker = jobs.WORKER_BASE_BYTES + jobs.WORKER_MATRIX_COPIES * 4 * big
    assert resolve_jobs(None, cpu, 500, largest=big, memory=int(3.5 * per_worker / 0.8)) == 3
    assert resolve_jobs(None, cpu, 500, largest=big, memory=per_worker // 2) == 1  # never below one
    assert resolve_jobs(None, cpu, 500, largest=576 * 1536, memory=64 * 2**30) == 16  # small matrices: all cores
    assert resolve_jobs(12, cpu, 500, largest=big, memory=1) == 12  # an explicit --jobs is the user's call
    assert jobs.available_memory() is None or jobs.available_memory() > 0


def test_worker_processes_give_the_same_table(tiny_llama_dir, tmp_path, space_file):
    # workers run one torch thread each, and so does the in-process run (on a 16-core machine,
    # with all 16 threads in-process, one entry of 56 moved by 4%: the loop amplifies rounding)
    one, _ = load_profile(profile(_request(tiny_llama_dir, tmp_path / "one", space_file, jobs=1)))
    two, meta = load_profile(profile(_request(tiny_llama_dir, tmp_path / "two", space_file, jobs=2)))
    assert meta["complete"]
    pd.testing.assert_frame_equal(_without_timing(two), _without_timing(one), check_exact=False, rtol=1e-6)


def test_workers_get_the_largest_matrices_first(tiny_llama_dir, tmp_path, space_file, monkeypatch):
    from bitalloc.lowrank import decompose_many
    from bitalloc.profiles import runner
    from bitalloc.profiles.store import write_part

    submitted: list[int] = []

    def in_order(todo, task, jobs, seed, out, done_one):  # the pool, without processes
        for index in todo:
            submitted.append(index)
            i, name, W, F, configs, H = task(index)
            write_part(out, index, runner._profile_matrix(i, name, W, F, configs, seed, decompose_many, H))
            done_one()

    monkeypatch.setattr(runner, "_profile_in_processes", in_order)
    _, meta = load_profile(profile(_request(tiny_llama_dir, tmp_path / "p", space_file, jobs=2)))
    sizes = [meta["targets"][i]["rows"] * meta["targets"][i]["cols"] for i in submitted]
    assert sorted(submitted) == list(range(len(meta["targets"])))
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]


def _children(pid: int) -> list[int]:
    kids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        if f"\nPPid:\t{pid}\n" in text:
            kids.append(int(status.parent.name))
    return kids


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to find the workers")
def test_killed_profile_takes_its_workers_with_it_and_resumes(tiny_llama_dir, tmp_path, space_file):
    out = tmp_path / "killed"
    script = textwrap.dedent(
        f"""
        import sys
        from bitalloc.cli import main
        sys.exit(main(["-q", "profile", "--model", {str(tiny_llama_dir)!r}, "--no-fisher", "--no-act", "--no-kl",
                       "--space", {str(space_file)!r}, "--jobs", "2", "--out", {str(out)!r}]))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 120
    workers: list[int] = []
    while time.time() < deadline and proc.poll() is None:
        workers = [k for k in _children(proc.pid)]
        if len(workers) >= 2 and (out / "parts").is_dir():
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.skip("the profile finished before it could be killed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(Path(f"/proc/{w}").exists() and _alive(w) for w in workers):
        time.sleep(0.1)
    assert not [w for w in workers if Path(f"/proc/{w}").exists() and _alive(w)], "workers outlived the profile"
    resumed, _ = load_profile(profile(_request(tiny_llama_dir, out, space_file, jobs=1)))
    full, _ = load_profile(profile(_request(tiny_llama_dir, tmp_path / "full", space_file, jobs=1)))
    pd.testing.assert_frame_equal(_without_timing(resumed), _without_timing(full), check_exact=False, rtol=1e-6)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("\nState:\t", 1)[1][0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_in_process_profile_runs_one_thread_and_restores_it(tiny_llama_dir, tmp_path, space_file, monkeypatch):
    from bitalloc.profiles import runner

    seen = []
    real = runner._profile_matrix

    def spy(*args):
        seen.append(torch.get_num_threads())
        return real(*args)

    monkeypatch.setattr(runner, "_profile_matrix", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        profile(_request(tiny_llama_dir, tmp_path / "p", space_file, jobs=1))
        assert seen and set(seen) == {1}  # like each worker process
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to find the workers")
def test_a_killed_worker_is_one_line_and_the_profile_resumes(tiny_llama_dir, tmp_path, space_file):
    out = tmp_path / "worker-killed"
    script = textwrap.dedent(
        f"""
        import sys
        from bitalloc.cli import main
        sys.exit(main(["-q", "profile", "--model", {str(tiny_llama_dir)!r}, "--no-fisher", "--no-act", "--no-kl",
                       "--space", {str(space_file)!r}, "--jobs", "2", "--out", {str(out)!r}]))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    workers: list[int] = []
    while time.time() < deadline and proc.poll() is None:
        workers = _children(proc.pid)
        if len(workers) >= 3 and (out / "parts").is_dir():  # two pool workers and the resource tracker
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.skip("the profile finished before a worker could be killed")
    pool = [w for w in workers if b"resource_tracker" not in Path(f"/proc/{w}/cmdline").read_bytes()]
    os.kill(pool[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the killed process was no pool worker")
    assert proc.returncode == 2, err
    lines = [line for line in err.splitlines() if "profile" in line and "error" in line]
    assert len(lines) == 1 and "worker process died" in lines[0] and "Traceback" not in err
    resumed, _ = load_profile(profile(_request(tiny_llama_dir, out, space_file, jobs=1)))
    full, _ = load_profile(profile(_request(tiny_llama_dir, tmp_path / "full", space_file, jobs=1)))
    pd.testing.assert_frame_equal(_without_timing(resumed), _without_timing(full), check_exact=False, rtol=1e-6)
