"""`bitalloc profile --executor ray`: shards as Ray tasks on a local Ray instance, merged.

The Ray tests share one local instance (2 CPUs, no dashboard) for the module and shut it
down at the end. Its workers see BITALLOC_CACHE and HF_HUB_OFFLINE as set when it started.
"""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from bitalloc.cli import main
from bitalloc.profiles import ProfileError, ProfileRequest, load_profile, profile
from bitalloc.profiles.ray_executor import (
    RayNotInstalledError,
    ShardFailedError,
    install_fisher_files,
    profile_with_ray,
    shards_root,
)

SPACE = ["nf2-g16-s8x16-r0", "nf4-g16-s16-r0", "nf3-g32-s4x16-r4"]


@pytest.fixture(scope="module")
def worker_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ray-cache")


@pytest.fixture(scope="module")
def ray_local(worker_cache):
    """A local Ray instance for this module; always shut down."""
    ray = pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BITALLOC_CACHE", str(worker_cache))  # inherited by the workers
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.delenv("RAY_ADDRESS", raising=False)
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False)
        try:
            yield ray
        finally:
            ray.shutdown()


@pytest.fixture
def driver_cache(tmp_path, monkeypatch) -> Path:
    """This process's own cache (the workers keep theirs)."""
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "driver-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "driver-cache"


def _request(model_dir, out, space_file, **kw) -> ProfileRequest:
    kw.setdefault("fisher", False)
    kw.setdefault("act", False)
    kw.setdefault("kl", False)
    return ProfileRequest(model=str(model_dir), out=out, space=str(space_file), progress=False, device="cpu", **kw)


def _without_timing(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=["seconds"]).reset_index(drop=True)


def _assert_same_table(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(_without_timing(a), _without_timing(b), check_exact=False, rtol=1e-6, atol=0)


def test_cli_ray_matches_local(ray_local, driver_cache, tiny_llama_dir, tmp_path, space_file, capsys):
    local, _ = load_profile(profile(_request(tiny_llama_dir, tmp_path / "local", space_file)))
    out = tmp_path / "ray"
    code = main(["-q", "profile", "--model", str(tiny_llama_dir), "--no-fisher", "--no-act", "--no-kl", "--space", str(space_file),
                 "--device", "cpu", "--out", str(out), "--executor", "ray", "--shards", "2"])
    assert code == 0, capsys.readouterr().err
    merged, meta = load_profile(out)
    _assert_same_table(merged, local)
    assert meta["shard"] is None and len(meta["merged_from"]) == 2
    root = shards_root(out)
    assert sorted(p.name for p in root.iterdir()) == ["shard-1-of-2", "shard-2-of-2"]
    _, meta1 = load_profile(root / "shard-1-of-2")
    assert meta1["shard"] == "1/2" and meta1["work"] == list(range(0, 14, 2))
    # The merged profile exists: a rerun into it is refused before anything runs.
    assert main(["-q", "profile", "--model", str(tiny_llama_dir), "--no-fisher", "--no-act", "--no-kl", "--space", str(space_file),
                 "--out", str(out), "--executor", "ray"]) == 2
    assert "not empty" in capsys.readouterr().err


def test_fisher_estimated_once_and_shipped(ray_local, worker_cache, driver_cache, tiny_llama_dir, tmp_path,
                                           space_file, caplog):
    kw = dict(fisher=True, samples=2, seqlen=16)
    before = set((worker_cache / "fisher").glob("fisher-*.json")) if (worker_cache / "fisher").is_dir() else set()
    with caplog.at_level("INFO", logger="bitalloc.profiles.ray_executor"):
        merged, meta = load_profile(profile_with_ray(_request(tiny_llama_dir, tmp_path / "ray", space_file, **kw),
                                                     shards=2))
    assert "estimated a Fisher itself" not in caplog.text
    assert "Fisher estimate ready" in caplog.text
    new = set((worker_cache / "fisher").glob("fisher-*.json")) - before
    assert len(new) == 1  # one estimate (in the prepare task), reused by both shards
    assert meta["calibration"]["samples"] == 2 and merged["error_fisher"].notna().all()
    # The same profile locally, from the same cached estimate, gives the same table.
    driver_cache.mkdir(parents=True)
    fisher_dir = driver_cache / "fisher"
    for path in (worker_cache / "fisher").glob("fisher-*"):
        fisher_dir.mkdir(exist_ok=True)
        (fisher_dir / path.name).write_bytes(path.read_bytes())
    local, local_meta = load_profile(profile(_request(tiny_llama_dir, tmp_path / "local", space_file, **kw)))
    assert local_meta["calibration"] == meta["calibration"]
    _assert_same_table(merged, local)


def test_install_fisher_files(tmp_path):
    blobs = {"fisher-abc.safetensors": b"tensors", "fisher-abc.json": b"{}"}
    digests = {n: hashlib.sha256(b).hexdigest() for n, b in blobs.items()}
    calls = []

    def fetch():
        calls.append(1)
        return blobs

    folder = tmp_path / "fisher"
    assert install_fisher_files(digests, fetch, folder) is True  # an empty cache: fetched and written
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == blobs
    assert install_fisher_files(digests, fetch, folder) is False and len(calls) == 1  # present: no fetch
    (folder / "fisher-abc.safetensors").write_bytes(b"truncat")
    assert install_fisher_files(digests, fetch, folder) is True  # a damaged copy is replaced
    assert (folder / "fisher-abc.safetensors").read_bytes() == b"tensors"
    with pytest.raises(ProfileError, match="digest"):
        install_fisher_files({"fisher-x.json": "0" * 64}, lambda: {"fisher-x.json": b"other"}, folder)


def _failing_on(model_dir: Path, *names: str):
    """A decompose_fn (shipped to the workers by value) that fails on the named matrices."""
    from safetensors.torch import load_file

    weights = load_file(str(model_dir / "model.safetensors"))
    poison = {float(weights[f"{n}.weight"][0, 0]) for n in names}

    def failing(W, configs, fisher=None):
        from bitalloc.lowrank import decompose_many

        if float(W[0, 0]) in poison:
            raise RuntimeError("injected failure")
        return decompose_many(W, configs, fisher=fisher)

    return failing


def test_failed_shard_is_named_kept_and_resumed(ray_local, driver_cache, tiny_llama_dir, tmp_path, space_file):
    out = tmp_path / "ray"
    request = _request(tiny_llama_dir, out, space_file)
    failing = _failing_on(tiny_llama_dir, "model.layers.0.self_attn.o_proj")  # target 3: shard 2 of 2
    with pytest.raises(ShardFailedError) as info:
        profile_with_ray(request, decompose_fn=failing)  # shards default to the cluster's 2 CPUs
    message = str(info.value)
    assert "shard 2/2" in message and "injected failure" in message and "1 of 2 shards failed" in message
    assert "shard 1/2" not in message and "rerun" in message
    root = shards_root(out)
    load_profile(root / "shard-1-of-2")  # finished and kept
    with pytest.raises(ProfileError, match="not finished"):
        load_profile(root / "shard-2-of-2")
    kept = sorted(p.name for p in (root / "shard-2-of-2" / "parts").glob("*.csv"))
    assert kept == ["00001.csv"]  # the matrix finished before the failure came back
    assert not out.exists()

    # The rerun resumes: matrices 0 (finished shard 1) and 1 (kept from shard 2) are not profiled again.
    done_before = _failing_on(tiny_llama_dir, "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj")
    merged, _ = load_profile(profile_with_ray(request, decompose_fn=done_before))
    local, _ = load_profile(profile(_request(tiny_llama_dir, tmp_path / "local", space_file)))
    _assert_same_table(merged, local)


def test_shard_of_another_profile_refused(ray_local, driver_cache, tiny_llama_dir, tmp_path, space_file):
    out = tmp_path / "ray"
    profile_with_ray(_request(tiny_llama_dir, out, space_file), shards=2)
    other = tmp_path / "other.json"
    other.write_text(json.dumps(SPACE[:2]))
    shutil.rmtree(out)
    with pytest.raises(ProfileError, match="made differently.*configs"):
        profile_with_ray(_request(tiny_llama_dir, out, other), shards=2)


def test_bad_input_found_by_the_prepare_task(ray_local, driver_cache, tiny_llama_dir, tmp_path, space_file):
    out = tmp_path / "ray"
    with pytest.raises(ValueError, match=r"has no config with rank <= 32 .*on Ray node"):
        profile_with_ray(ProfileRequest(model=str(tiny_llama_dir), out=out, ranks=(999,), fisher=False,
                                        act=False, kl=False, device="cpu", progress=False))
    assert not out.exists() and not shards_root(out).exists()


def test_missing_ray_error(monkeypatch, tmp_path, tiny_llama_dir, capsys):
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(RayNotInstalledError, match=r"install ray: pip install 'bitalloc\[ray\]'"):
        profile_with_ray(ProfileRequest(model=str(tiny_llama_dir), out=tmp_path / "p"))
    code = main(["-q", "profile", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "p"), "--executor", "ray"])
    assert code == 2
    assert "install ray: pip install 'bitalloc[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("flags", [["--shards", "2"], ["--ray-address", "auto"]])
def test_ray_flags_need_ray_executor(flags, tmp_path, tiny_llama_dir, capsys):
    code = main(["-q", "profile", "--model", str(tiny_llama_dir), "--no-fisher", "--no-act", "--no-kl", "--out", str(tmp_path / "p")] + flags)
    assert code == 2
    assert "--executor ray" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_shard_flag_and_ray_executor_exclusive(tmp_path, tiny_llama_dir, capsys):
    pytest.importorskip("ray")
    code = main(["-q", "profile", "--model", str(tiny_llama_dir), "--no-fisher", "--no-act", "--no-kl", "--out", str(tmp_path / "p"),
                 "--executor", "ray", "--shard", "1/2"])
    assert code == 2
    assert "--shard cannot be combined" in capsys.readouterr().err


def test_shard_task_fetches_fisher_missing_on_its_node(ray_local, worker_cache, driver_cache, tiny_llama_dir,
                                                       tmp_path, space_file):
    """A worker whose cache lacks the estimate (no shared filesystem) fetches the shipped one."""
    from bitalloc.profiles.ray_executor import _prepare_task, _shard_task

    request = _request(tiny_llama_dir, tmp_path / "unused", space_file, fisher=True, samples=2, seqlen=16)
    info, blobs = ray_local.get(ray_local.remote(_prepare_task).options(num_returns=2).remote(request))
    assert info.get("error") is None and set(blobs) == set(info["fisher_files"]) and len(blobs) == 2
    empty = tmp_path / "empty-worker-cache"
    fisher = {"digests": info["fisher_files"], "ref": [ray_local.put(blobs)]}
    task = ray_local.remote(_shard_task).options(runtime_env={"env_vars": {"BITALLOC_CACHE": str(empty)}})
    result = ray_local.get(task.remote(dataclasses.replace(request, shard="1/2"), {}, fisher))
    assert result["error"] is None, result["error"]
    assert result["fisher_fetched"] and result["fisher_estimated"] == []
    assert sorted(p.name for p in (empty / "fisher").iterdir()) == sorted(blobs)
    assert "profile.csv" in result["files"] and "parts/00000.csv" in result["files"]
