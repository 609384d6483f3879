"""`bitalloc adapter ...`: the happy path, and bad input refused with a clear message and nothing written."""

import json
import shutil

from safetensors.torch import load_file, save_file

from bitalloc.cli import main

from adapter_helpers import make_adapter, tiny_base


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_profile_solve_apply(adapter_dirs, tmp_path, capsys):
    prof, alloc, out = tmp_path / "prof", tmp_path / "alloc.json", tmp_path / "out"
    code, stdout, _ = _run(capsys, "adapter", "profile", *map(str, adapter_dirs), "--out", str(prof), "--groups", "64,128")
    assert code == 0 and "28 modules of 2 adapters" in stdout
    code, stdout, _ = _run(capsys, "adapter", "solve", str(prof), "--budget", "2.0", "--out", str(alloc))
    assert code == 0 and "optimal" in stdout
    data = json.loads(alloc.read_text())
    assert data["bits_per_param"] <= 2.0 and data["mode"] == "fleet"
    code, stdout, _ = _run(capsys, "adapter", "solve", str(prof), "--variant", "3@0.9", "--json")
    assert code == 0 and json.loads(stdout.strip().splitlines()[-1])["variant"] == "3@0.9"
    code, stdout, _ = _run(capsys, "adapter", "apply", str(alloc), "--out", str(out), "--dequantized")
    assert code == 0
    for name in ("math", "chat"):
        assert (out / name / "adapter_quant.safetensors").is_file()
        assert (out / name / "peft" / "adapter_config.json").is_file()


def _expect_error(capsys, out, *argv, match):
    code, _, err = _run(capsys, *argv)
    assert code == 2
    assert match in err, err
    assert not out.exists(), f"{out} was written"


def test_directory_without_adapter_config(adapter_dirs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    _expect_error(capsys, tmp_path / "prof", "adapter", "profile", str(adapter_dirs[0]), str(empty), "--out",
                  str(tmp_path / "prof"), match="adapter_config.json is missing")


def test_ia3_and_dora_are_not_supported(tmp_path, capsys):
    from peft import IA3Config, LoraConfig, get_peft_model

    ia3 = tmp_path / "ia3"
    get_peft_model(tiny_base(), IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                          feedforward_modules=["down_proj"])).save_pretrained(str(ia3))
    _expect_error(capsys, tmp_path / "prof", "adapter", "profile", str(ia3), "--out", str(tmp_path / "prof"),
                  match="PEFT type 'IA3' is not supported")
    dora = tmp_path / "dora"
    get_peft_model(tiny_base(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)).save_pretrained(str(dora))
    _expect_error(capsys, tmp_path / "prof", "adapter", "profile", str(dora), "--out", str(tmp_path / "prof"),
                  match="DoRA adapters (use_dora: true) are not supported")


def test_ranks_that_disagree(adapter_dirs, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(adapter_dirs[0], bad)
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = tensors[key][:, :6].contiguous()
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    _expect_error(capsys, tmp_path / "prof", "adapter", "profile", str(bad), "--out", str(tmp_path / "prof"),
                  match="ranks that disagree")


def test_two_adapters_with_one_name(adapter_dirs, tmp_path, capsys):
    twin = tmp_path / "other" / "math"
    shutil.copytree(adapter_dirs[0], twin)
    _expect_error(capsys, tmp_path / "prof", "adapter", "profile", str(adapter_dirs[0]), str(twin), "--out",
                  str(tmp_path / "prof"), match="two adapters are named 'math'")


def test_adapter_of_another_base_model(adapter_dirs, tmp_path, capsys):
    _expect_error(capsys, tmp_path / "prof", "adapter", "profile", *map(str, adapter_dirs), "--base-model",
                  "other-model", "--out", str(tmp_path / "prof"), match="not on 'other-model'")
    foreign = make_adapter(tmp_path / "foreign", seed=9, base_name="another-base")
    _expect_error(capsys, tmp_path / "prof", "adapter", "profile", str(adapter_dirs[0]), str(foreign), "--out",
                  str(tmp_path / "prof"), match="different base models")


def test_budget_below_the_cheapest_allocation(adapter_dirs, tmp_path, capsys):
    prof = tmp_path / "prof"
    assert main(["adapter", "profile", *map(str, adapter_dirs), "--out", str(prof), "--groups", "128"]) == 0
    capsys.readouterr()
    _expect_error(capsys, tmp_path / "alloc.json", "adapter", "solve", str(prof), "--budget", "0.5", "--out",
                  str(tmp_path / "alloc.json"), match="the minimum feasible budget is")


def test_solve_of_a_model_profile_is_refused(tmp_path, capsys):
    fake = tmp_path / "model_profile"
    fake.mkdir()
    (fake / "meta.json").write_text(json.dumps({"format": "bitalloc-profile"}))
    _expect_error(capsys, tmp_path / "a.json", "adapter", "solve", str(fake), "--budget", "2", "--out",
                  str(tmp_path / "a.json"), match="use `bitalloc solve`")


def test_pickle_only_adapter_is_refused(adapter_dirs, tmp_path, capsys):
    pickled = tmp_path / "pickled"
    shutil.copytree(adapter_dirs[0], pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    _expect_error(capsys, tmp_path / "prof", "adapter", "profile", str(pickled), "--out", str(tmp_path / "prof"),
                  match="does not load")


def test_solve_refuses_an_existing_out_without_force(adapter_dirs, tmp_path, capsys):
    prof, alloc = tmp_path / "prof", tmp_path / "alloc.json"
    assert main(["-q", "adapter", "profile", *map(str, adapter_dirs), "--out", str(prof), "--groups", "128"]) == 0
    alloc.write_text("keep me")
    capsys.readouterr()
    code, _, err = _run(capsys, "-q", "adapter", "solve", str(prof), "--budget", "2.0", "--out", str(alloc))
    assert code == 2 and "exists" in err and "--force" in err
    assert alloc.read_text() == "keep me"
    code, _, _ = _run(capsys, "-q", "adapter", "solve", str(prof), "--budget", "2.0", "--out", str(alloc), "--force")
    assert code == 0 and json.loads(alloc.read_text())["mode"] == "fleet"
