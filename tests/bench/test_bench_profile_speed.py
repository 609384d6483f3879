"""bench/profile_speed.py's options: wrong input gets a message that says what to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bench_scripts import load_bench

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    return load_bench("profile_speed.py", "profile_speed")


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()  # main() sets --threads
    yield
    torch.set_num_threads(threads)


def _matrices(path: Path, layer: int = 0) -> Path:
    g = torch.Generator().manual_seed(0)
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    save_file({f"model.layers.{layer}.{n}": 0.02 * torch.randn(16, 32, generator=g) for n in names}, str(path))
    return path


def _fails(bench, argv, match):
    with pytest.raises(SystemExit, match=match):
        bench.main(argv)


def test_missing_matrices_file(bench, tmp_path):
    _fails(bench, ["--matrices", str(tmp_path / "none.safetensors"), "--out", str(tmp_path)],
           "no such file; write it with --save-matrices")


def test_matrices_saved_for_other_layers(bench, tmp_path):
    path = _matrices(tmp_path / "m.safetensors", layer=0)
    _fails(bench, ["--matrices", str(path), "--layers", "3", "--out", str(tmp_path)],
           r"missing \['model.layers.3.*the same --layers")


@pytest.mark.parametrize("argv, message", [
    (["--device", "gpu"], "use cpu, cuda or cuda:i"),
    (["--bitalloc-seeds", "one"], "comma-separated integers"),
    (["--noise-seeds", "1;2"], "comma-separated integers"),
])
def test_bad_option_values(bench, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        bench.main([*argv, "--out", str(tmp_path)])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_asked_for_without_cuda(bench, tmp_path):
    _fails(bench, ["--device", "cuda", "--out", str(tmp_path)], "no CUDA device here; use --device cpu")


@pytest.mark.parametrize("option", ["--bitalloc-noise-only", "--skip-main", "--render-only"])
def test_adding_to_results_that_do_not_exist(bench, tmp_path, option):
    _fails(bench, [option, "--out", str(tmp_path / "empty")], f"{option}: no .*results.json to add to")


def test_noise_only_refuses_results_of_other_code(bench, tmp_path):
    path = _matrices(tmp_path / "m.safetensors")
    name = "model.layers.0.self_attn.k_proj"
    rows = [{"config": "nf4-g16-s8x16-r4", "error": 123.0}]  # not what this code computes
    (tmp_path / "results.json").write_text(json.dumps({"per_matrix": {name: {"bitalloc": rows, "reference": []}}}))
    _fails(bench, ["--bitalloc-noise-only", "--bitalloc-seeds", "1", "--matrices", str(path), "--layers", "0",
                   "--out", str(tmp_path)], "seed-0 errors of this code differ")


def test_save_matrices_refuses_stand_ins(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "load_matrices", lambda layers, path=None: ({}, "seeded N(0, 0.02^2) stand-ins"))
    _fails(bench, ["--save-matrices", str(tmp_path / "m.safetensors"), "--out", str(tmp_path)],
           "the built-in model could not be loaded")
    assert not (tmp_path / "m.safetensors").exists()


def test_reference_from_a_missing_or_foreign_file(bench, tmp_path):
    path = _matrices(tmp_path / "m.safetensors")
    _fails(bench, ["--matrices", str(path), "--layers", "0", "--reference-from", str(tmp_path / "none.json"),
                   "--out", str(tmp_path)], "--reference-from .*no such file")
    (tmp_path / "old.json").write_text(json.dumps({"per_matrix": {}}))
    _fails(bench, ["--matrices", str(path), "--layers", "0", "--reference-from", str(tmp_path / "old.json"),
                   "--out", str(tmp_path)], "no reference rows for model.layers.0")


def test_ablations_are_policies_that_change_their_knob_only(bench):
    import _profile_speed_ablations as ablations

    from bitalloc.lowrank import MANY_CONFIGS, LoopPolicy

    rows = ablations.ABLATIONS
    assert len(ablations.by_name()) == len(rows)
    fields = set(LoopPolicy.__dataclass_fields__)
    for a in rows:
        assert isinstance(a.policy, LoopPolicy) and a.knob in fields
        changed = {k for k, v in a.policy.to_dict().items() if v != MANY_CONFIGS.to_dict()[k]}
        assert changed == {a.knob}, a.name
    assert set(ablations.NOT_EXERCISED) <= fields
    # every knob is ablated here or named as not exercised, except the base tolerance and patience
    assert fields - {a.knob for a in rows} - set(ablations.NOT_EXERCISED) == {"tol", "patience"}


def test_verdicts(bench):
    assert bench.verdict(0.10, 0.0, 0, 0.02).startswith("needed (slower")
    assert bench.verdict(0.0, 0.0, 1, 0.02).startswith("needed (more entries")
    assert bench.verdict(0.02, 0.10, 0, 0.05).startswith("needed (more work")
    assert bench.verdict(-0.02, 0.10, 0, 0.01).startswith("needed (more work")
    assert bench.verdict(0.04, 0.0, 0, 0.05).startswith("unclear")
    assert bench.verdict(-0.10, -0.2, 0, 0.02).startswith("not needed (less work")
    assert bench.verdict(0.04, -0.05, 0, 0.10).startswith("not needed (less work")
    assert bench.verdict(-0.10, 0.0, 0, 0.02) == "not needed"
    assert bench.verdict(0.01, 0.01, -2, 0.02) == "not needed"


def test_the_benchmark_sets_no_library_globals():
    for path in (ROOT / "bench").glob("*.py"):
        text = path.read_text()
        assert "setattr(" not in text and "monkeypatch" not in text, path.name
