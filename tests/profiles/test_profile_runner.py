"""`bitalloc profile`: table contents, resume after a kill, shards and merge, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest

from bitalloc.cli import main
from bitalloc.configs import QuantConfig
from bitalloc.profiles import ProfileError, ProfileRequest, load_profile, merge_profiles, profile

SPACE = ["nf2-g16-s8x16-r0", "nf4-g16-s16-r0", "nf3-g32-s4x16-r4", "nf8-g16-s8x16-r8"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _request(model_dir, out, space_file, **kw) -> ProfileRequest:
    kw.setdefault("fisher", False)
    kw.setdefault("act", False)
    kw.setdefault("kl", False)
    return ProfileRequest(model=str(model_dir), out=out, space=str(space_file), progress=False, **kw)


def _without_timing(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=["seconds"]).reset_index(drop=True)


def test_profile_table(tiny_llama_dir, tmp_path, space_file):
    out = profile(_request(tiny_llama_dir, tmp_path / "p", space_file))
    df, meta = load_profile(out)
    n_targets = len(meta["targets"])
    assert n_targets == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert len(df) == n_targets * len(SPACE)
    for col in ["matrix", "rows", "cols", "config", "storage_bits", "bits_per_param", "error", "error_fisher", "seconds"]:
        assert col in df.columns
    assert df["error_fisher"].isna().all()
    row = df.iloc[0]
    cfg = QuantConfig.from_name(row["config"])
    assert row["storage_bits"] == cfg.storage_bits(row["rows"], row["cols"])
    assert (df["error"] >= 0).all() and (df["error"] < df["weight_norm_sq"]).all()
    # More bits, less error (rank 0 configs of one matrix).
    one = df[df["matrix"] == df["matrix"].iloc[0]].set_index("config")
    assert one.loc["nf4-g16-s16-r0", "error"] < one.loc["nf2-g16-s8x16-r0", "error"]
    assert meta["complete"] and meta["fisher"] is False


def test_profile_is_deterministic(tiny_llama_dir, tmp_path, space_file):
    a, _ = load_profile(profile(_request(tiny_llama_dir, tmp_path / "a", space_file)))
    b, _ = load_profile(profile(_request(tiny_llama_dir, tmp_path / "b", space_file)))
    pd.testing.assert_frame_equal(_without_timing(a), _without_timing(b))


def test_interrupted_run_resumes_to_identical_table(tiny_llama_dir, tmp_path, space_file):
    from bitalloc.lowrank import decompose_many

    full, _ = load_profile(profile(_request(tiny_llama_dir, tmp_path / "full", space_file)))

    calls = {"n": 0}

    def flaky(W, cfgs, fisher=None):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return decompose_many(W, cfgs, fisher=fisher)

    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        profile(_request(tiny_llama_dir, out, space_file), decompose_fn=flaky)
    assert len(list((out / "parts").glob("*.csv"))) == 5
    with pytest.raises(ProfileError, match="not finished"):
        load_profile(out)
    resumed, meta = load_profile(profile(_request(tiny_llama_dir, out, space_file)))
    pd.testing.assert_frame_equal(_without_timing(resumed), _without_timing(full))


def test_killed_process_resumes(tiny_llama_dir, tmp_path, space_file):
    """SIGKILL a real `bitalloc profile` process mid-run; the rerun completes identically."""
    out = tmp_path / "killed"
    script = textwrap.dedent(
        f"""
        import sys, time
        import bitalloc.lowrank as lr
        real = lr.decompose_many
        def slow(W, cfgs, fisher=None):
            time.sleep(0.4)
            return real(W, cfgs, fisher=fisher)
        lr.decompose_many = slow
        from bitalloc.cli import main
        sys.exit(main(["-q", "profile", "--model", {str(tiny_llama_dir)!r}, "--no-fisher", "--no-act", "--no-kl",
                       "--space", {str(space_file)!r}, "--out", {str(out)!r}]))
        """
    )
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "parts").glob("*.csv"))) < 3:
        time.sleep(0.05)
        if proc.poll() is not None:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    parts = len(list((out / "parts").glob("*.csv")))
    assert 3 <= parts < 14, "the process was not killed mid-run"
    assert main(["-q", "profile", "--model", str(tiny_llama_dir), "--no-fisher", "--no-act", "--no-kl", "--space", str(space_file),
                 "--out", str(out)]) == 0
    resumed, _ = load_profile(out)
    full, _ = load_profile(profile(_request(tiny_llama_dir, tmp_path / "full", space_file)))
    pd.testing.assert_frame_equal(_without_timing(resumed), _without_timing(full))


def test_shards_merge_to_the_whole(tiny_llama_dir, tmp_path, space_file):
    whole, _ = load_profile(profile(_request(tiny_llama_dir, tmp_path / "whole", space_file)))
    shards = [profile(_request(tiny_llama_dir, tmp_path / f"s{i}", space_file, shard=f"{i}/3")) for i in (1, 2, 3)]
    df1, meta1 = load_profile(shards[0])
    assert meta1["work"] == [0, 3, 6, 9, 12]
    merged, meta = load_profile(merge_profiles(shards, tmp_path / "merged"))
    pd.testing.assert_frame_equal(_without_timing(merged), _without_timing(whole))
    assert meta["shard"] is None
    with pytest.raises(ProfileError, match="missing"):
        merge_profiles(shards[:2], tmp_path / "m2")
    with pytest.raises(ProfileError, match="in both"):
        merge_profiles([shards[0], shards[0], shards[1], shards[2]], tmp_path / "m3")


def test_merge_refuses_foreign_shard(tiny_llama_dir, tiny_gpt2_dir, tmp_path, space_file):
    a = profile(_request(tiny_llama_dir, tmp_path / "a", space_file, shard="1/2"))
    b = profile(_request(tiny_gpt2_dir, tmp_path / "b", space_file, shard="2/2"))
    with pytest.raises(ProfileError, match="does not belong"):
        merge_profiles([a, b], tmp_path / "m")


@pytest.mark.parametrize("spec", ["3/2", "0/2", "1/0", "a/b", "1", "-1/2"])
def test_bad_shard(tiny_llama_dir, tmp_path, space_file, spec, capsys):
    code = main(["-q", "profile", "--model", str(tiny_llama_dir), "--no-fisher", "--no-act", "--no-kl", "--space", str(space_file),
                 "--out", str(tmp_path / "x"), f"--shard={spec}"])
    assert code == 2
    assert "--shard" in capsys.readouterr().err


def test_profile_dir_of_another_model_refused(tiny_llama_dir, tiny_gpt2_dir, tmp_path, space_file):
    out = profile(_request(tiny_llama_dir, tmp_path / "p", space_file))
    with pytest.raises(ProfileError, match="model"):
        profile(_request(tiny_gpt2_dir, out, space_file))


def test_profile_dir_of_another_space_refused(tiny_llama_dir, tmp_path, space_file):
    out = profile(_request(tiny_llama_dir, tmp_path / "p", space_file))
    other = tmp_path / "other.json"
    other.write_text(json.dumps(SPACE[:2]))
    with pytest.raises(ProfileError, match="configs"):
        profile(_request(tiny_llama_dir, out, other))


def test_truncated_table_refused_and_rebuilt(tiny_llama_dir, tmp_path, space_file):
    out = profile(_request(tiny_llama_dir, tmp_path / "p", space_file))
    good, _ = load_profile(out)
    table = out / "profile.csv"
    table.write_bytes(table.read_bytes()[: len(table.read_bytes()) // 2])
    with pytest.raises(ProfileError, match="truncated or edited"):
        load_profile(out)
    rebuilt, _ = load_profile(profile(_request(tiny_llama_dir, out, space_file)))
    pd.testing.assert_frame_equal(rebuilt, good)


def test_corrupt_part_is_redone(tiny_llama_dir, tmp_path, space_file):
    out = profile(_request(tiny_llama_dir, tmp_path / "p", space_file))
    good, _ = load_profile(out)
    part = sorted((out / "parts").glob("*.csv"))[2]
    part.write_text("matrix,index\ngarbage")
    (out / "profile.csv").unlink()
    redone, _ = load_profile(profile(_request(tiny_llama_dir, out, space_file)))
    pd.testing.assert_frame_equal(_without_timing(redone), _without_timing(good))


def test_not_a_profile(tmp_path):
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    with pytest.raises(ProfileError, match="meta.json is missing"):
        load_profile(tmp_path / "d")
    (tmp_path / "d" / "meta.json").write_text("{broken")
    with pytest.raises(ProfileError, match="corrupt"):
        load_profile(tmp_path / "d")


def test_output_dir_not_a_profile_refused(tiny_llama_dir, tmp_path, space_file):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ProfileError, match="not empty"):
        profile(_request(tiny_llama_dir, out, space_file))
    with pytest.raises(ProfileError, match="--resume"):
        profile(_request(tiny_llama_dir, tmp_path / "fresh", space_file, resume=True))


def test_nan_matrix_named(tiny_builders, tiny_tokenizer, tmp_path, space_file, monkeypatch):

    model = tiny_builders.llama(len(tiny_tokenizer))
    name = "model.layers.1.mlp.up_proj"
    model.get_submodule(name).weight.data[0, 0] = float("nan")
    monkeypatch.setattr("bitalloc.profiles.runner.load_model", lambda spec=None, **kw: (model, tiny_tokenizer))
    with pytest.raises(ValueError, match=name):
        profile(_request("whatever", tmp_path / "p", space_file))


def test_empty_space_file(tiny_llama_dir, tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    code = main(["-q", "profile", "--model", str(tiny_llama_dir), "--no-fisher", "--no-act", "--no-kl", "--space", str(empty),
                 "--out", str(tmp_path / "x")])
    assert code == 2
    assert "no configs" in capsys.readouterr().err


@pytest.fixture
def fisher_calls(monkeypatch) -> dict[str, int]:
    """Counts the Fisher estimations (cache misses) of this test."""
    import bitalloc.models.fisher_cache as fisher_mod

    calls = {"n": 0}
    real = fisher_mod.estimate_fisher

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(fisher_mod, "estimate_fisher", counting)
    return calls


def test_fisher_profile_uses_cache(tiny_llama_dir, tiny_text_file, tmp_path, space_file, fisher_calls):
    calls = fisher_calls
    kw = dict(fisher=True, calib=str(tiny_text_file), samples=4, seqlen=32)
    df, meta = load_profile(profile(_request(tiny_llama_dir, tmp_path / "f1", space_file, **kw)))
    assert calls["n"] == 1
    assert df["error_fisher"].notna().all() and (df["error_fisher"] >= 0).all()
    assert meta["calibration"]["source"] == str(tiny_text_file) and meta["calibration"]["samples"] == 4
    df2, _ = load_profile(profile(_request(tiny_llama_dir, tmp_path / "f2", space_file, **kw)))
    assert calls["n"] == 1  # the second profile reused the cached Fisher
    pd.testing.assert_frame_equal(_without_timing(df), _without_timing(df2))


def test_prepare_fisher_caches_what_the_profile_then_reads(tiny_llama_dir, tiny_text_file, tmp_path, space_file,
                                                            fisher_calls):
    from bitalloc.profiles.runner import prepare_fisher

    calls = fisher_calls
    request = _request(tiny_llama_dir, tmp_path / "p", space_file, fisher=True, calib=str(tiny_text_file),
                       samples=4, seqlen=32)
    ready = prepare_fisher(request)
    tensors, sidecar = ready["files"]
    assert tensors.is_file() and sidecar.is_file() and calls["n"] == 1
    assert ready["calibration"].samples == 4
    _, meta = load_profile(profile(request))
    assert calls["n"] == 1  # the profile (or its shards) read the prepared estimate
    assert meta["calibration"] == ready["calibration"].to_dict() and meta["model_hash"] == ready["model_hash"]
    assert prepare_fisher(_request(tiny_llama_dir, tmp_path / "q", space_file, fisher=False)) is None


def test_fisher_default_calibration_is_self_text(tiny_llama_dir, tmp_path, space_file):
    df, meta = load_profile(profile(_request(tiny_llama_dir, tmp_path / "p", space_file, fisher=True,
                                             samples=2, seqlen=16)))
    assert meta["calibration"]["source"] == "self:2"
    assert df["error_fisher"].notna().all()


@pytest.mark.parametrize(
    "flags, message",
    [(["--device", "tpu9"], "--device"), (["--ranks", "a,b"], "--ranks"), (["--ranks", "999"], "rank")],
)
def test_bad_profile_flags(tiny_llama_dir, tmp_path, space_file, flags, message, capsys):
    code = main(["-q", "profile", "--model", str(tiny_llama_dir), "--no-fisher", "--no-act", "--no-kl", "--out", str(tmp_path / "x")] + flags)
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "two"])
def test_bad_jobs_is_refused_before_anything_runs(tmp_path, value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["-q", "profile", "--no-fisher", "--no-act", "--no-kl", "--jobs", value, "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert f"argument --jobs: expected a number of worker processes >= 0 (0: one per core), got '{value}'" in (
        capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


def test_cuda_device_without_cuda(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["-q", "profile", "--no-fisher", "--no-act", "--no-kl", "--device", "cuda:0", "--out", str(tmp_path / "x")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_request_is_frozen_and_checked_when_made(tmp_path):
    import dataclasses

    request = ProfileRequest(out=tmp_path / "p", ranks=[0, 8])
    assert request.ranks == (0, 8) == ProfileRequest(ranks="0,8").ranks
    data = json.loads(json.dumps(request.to_dict()))
    assert ProfileRequest.from_dict(data) == dataclasses.replace(request, out=str(request.out))
    with pytest.raises(ValueError, match="extra"):
        ProfileRequest.from_dict({**data, "extra": {}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.seed = 1
    for bad, message in [(dict(samples=0), "samples"), (dict(seqlen=2.5), "seqlen"), (dict(fisher_mode="fast"), "mode"),
                         (dict(shard="3/2"), "shard"), (dict(ranks="some"), "--ranks"), (dict(jobs="2"), "jobs"),
                         (dict(seed=None), "seed")]:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(request, **bad)


def test_request_calibration_fills_the_device_defaults():
    from bitalloc.identity import BUILTIN_ALIAS
    from bitalloc.models import Calibration

    request = ProfileRequest(calib="data.txt", samples=3)
    assert request.calibration("cpu") == Calibration.for_device("cpu", source="data.txt", samples=3)
    assert request.calibration("cpu").seqlen == Calibration.for_device("cpu").seqlen
    assert ProfileRequest().model_id == BUILTIN_ALIAS


def test_profile_refuses_an_unusual_space_file_before_the_model_loads(tmp_path, capsys, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("loaded a model although the config space was wrong")

    monkeypatch.setattr("bitalloc.profiles.runner.load_model", no_load)
    space = tmp_path / "space.json"
    space.write_text(json.dumps(["nf4-g46-s8x256"]))
    assert main(["-q", "profile", "--no-fisher", "--no-act", "--no-kl", "--space", str(space), "--ranks", "0",
                 "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "nf4-g46-s8x256" in err and "nf4-g64-s8x256-r0" in err and "--allow-unusual-config" in err


def test_a_part_cut_on_a_line_boundary_is_redone_and_reading_deletes_nothing(tiny_llama_dir, tmp_path, space_file):
    out = profile(_request(tiny_llama_dir, tmp_path / "p", space_file))
    good, _ = load_profile(out)
    part = sorted((out / "parts").glob("*.csv"))[2]
    lines = part.read_text().splitlines(keepends=True)
    short = "".join(lines[:3])  # header + 2 of len(SPACE) rows, cut exactly at a line end
    part.write_text(short)
    (out / "profile.csv").unlink()
    with pytest.raises(ProfileError, match="not finished"):
        load_profile(out)
    assert part.read_text() == short  # reading never deletes or repairs
    redone, _ = load_profile(profile(_request(tiny_llama_dir, out, space_file)))
    assert len(redone) == len(good)
    pd.testing.assert_frame_equal(_without_timing(redone), _without_timing(good))


def test_a_missing_calib_file_leaves_nothing_behind(tiny_llama_dir, tmp_path, space_file):
    from bitalloc.errors import InputError

    out = tmp_path / "p"
    with pytest.raises(InputError, match="not found"):
        profile(_request(tiny_llama_dir, out, space_file, fisher=True, calib=str(tmp_path / "missing.txt")))
    assert not out.exists()
    (tmp_path / "calib.txt").write_text("Some calibration text for the model. " * 200)
    done = profile(_request(tiny_llama_dir, out, space_file, fisher=True, calib=str(tmp_path / "calib.txt")))
    assert load_profile(done)[1]["fisher"] is True


def test_an_out_that_is_a_file_or_a_mistyped_meta_is_refused_naming_it(tiny_llama_dir, tmp_path, space_file):
    from bitalloc.errors import InputError

    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        profile(_request(tiny_llama_dir, tmp_path / "file", space_file))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "meta.json").write_text('{"format": "bitalloc-profile", "format_version": "one"}')
    with pytest.raises(ProfileError, match="meta.json has mistyped"):
        load_profile(tmp_path / "d")


def test_a_second_profile_on_the_same_out_is_refused_naming_the_holder(tiny_llama_dir, tmp_path, space_file):
    import socket
    import subprocess
    import sys

    from bitalloc.errors import OutputBusyError

    out = tmp_path / "p"
    lock = tmp_path / ".p.lock"
    host = socket.gethostname()
    lock.write_text(json.dumps({"pid": os.getpid(), "host": host, "since": "now"}))  # a running holder
    with pytest.raises(OutputBusyError, match=rf"process {os.getpid()} on {host}"):
        profile(_request(tiny_llama_dir, out, space_file))
    assert not out.exists() and lock.exists()
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    lock.write_text(json.dumps({"pid": dead, "host": host, "since": "then"}))  # its holder died: taken over
    assert load_profile(profile(_request(tiny_llama_dir, out, space_file)))[0] is not None
    assert not lock.exists()


def test_a_nan_in_an_excluded_layer_is_a_warning_not_a_refusal(tiny_builders, tiny_tokenizer, tmp_path, space_file,
                                                               caplog):
    import logging

    import torch

    from bitalloc.models import NonFiniteWeightsError

    model = tiny_builders.llama(len(tiny_tokenizer))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    folder = tmp_path / "nan-model"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    with pytest.raises(NonFiniteWeightsError, match=r"layers\.1\.mlp\.down_proj"):
        profile(_request(folder, tmp_path / "all", space_file))
    with caplog.at_level(logging.WARNING):
        out = profile(_request(folder, tmp_path / "some", space_file, exclude=r"layers\.1\.mlp\.down_proj"))
    df, _ = load_profile(out)
    assert "model.layers.1.mlp.down_proj" not in set(df["matrix"]) and np.isfinite(df["error"]).all()
    assert "outside the targets" in caplog.text


def _counting(calls: list):
    from bitalloc.lowrank import decompose_many

    def decompose_fn(W, configs, **kw):
        calls.append(1)
        return decompose_many(W, configs, **kw)

    return decompose_fn


def test_a_corrupt_meta_is_rebuilt_from_the_same_command_line_with_resume_keeping_the_parts(
        tiny_llama_dir, tmp_path, space_file):
    from bitalloc.profiles.store import CorruptMetaError

    out = profile(_request(tiny_llama_dir, tmp_path / "p", space_file))
    good, _ = load_profile(out)
    (out / "meta.json").write_text('{"format": "bitalloc-profile", "targ')  # cut mid-write by a crash
    (out / "parts" / "00003.csv").unlink()  # and one matrix not done yet
    with pytest.raises(CorruptMetaError, match=r"rerun the `bitalloc profile` command that made it with --resume"):
        profile(_request(tiny_llama_dir, out, space_file))
    calls: list = []
    rebuilt, meta = load_profile(profile(_request(tiny_llama_dir, out, space_file, resume=True),
                                         decompose_fn=_counting(calls)))
    assert len(calls) == 1  # only the missing matrix was profiled again; the 13 intact parts were kept
    assert meta["complete"] and len(meta["targets"]) == 14
    pd.testing.assert_frame_equal(_without_timing(rebuilt), _without_timing(good))


def test_a_corrupt_meta_is_not_rebuilt_from_another_command_line(tiny_llama_dir, tmp_path, space_file):
    out = profile(_request(tiny_llama_dir, tmp_path / "p", space_file))
    (out / "meta.json").write_bytes(b"\x00\xff binary garbage")
    other_space = tmp_path / "other-space.json"
    other_space.write_text(json.dumps(SPACE[:2]))
    with pytest.raises(ProfileError, match=r"cannot be rebuilt from this command line: 14 of 14 parts do not fit"):
        profile(_request(tiny_llama_dir, out, other_space, resume=True))
    assert (out / "meta.json").read_bytes() == b"\x00\xff binary garbage"  # left as it was
    assert len(list((out / "parts").glob("*.csv"))) == 14
    (tmp_path / "calib.txt").write_text("Some calibration text for the model. " * 200)
    with pytest.raises(ProfileError, match="do not fit"):  # --no-fisher differs: parts without Fisher errors
        profile(_request(tiny_llama_dir, out, space_file, resume=True, fisher=True,
                         calib=str(tmp_path / "calib.txt")))


def test_a_resume_across_calibration_parts_names_the_flag_that_resumes_it():
    from bitalloc.profiles.runner import describe_meta_difference

    old = {"calibration": {"source": "wikitext2", "samples": 16, "seqlen": 256, "mode": "persample"}}
    new = {"calibration": {**old["calibration"], "part": "second-half"}}
    message = describe_meta_difference(old, new)
    assert "--calib-part whole resumes it" in message and "second-half" in message
    assert describe_meta_difference(new, new) == ""
