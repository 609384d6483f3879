"""Profiling against the base model: the fit check, and the activation-weighted error."""

import pytest
import torch

from bitalloc.adapters import AdapterQuantConfig, load_adapter_profile, profile_adapters, read_adapter, solve_adapters
from bitalloc.adapters.split import dequantized_factors
from bitalloc.adapters import svd_split
from bitalloc.cli import main
from bitalloc.models import calibration_tokens, load_model

from adapter_helpers import make_adapter


@pytest.fixture(scope="module")
def model_adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("on_model")
    base, _ = load_model(str(tiny_llama_dir))
    one = make_adapter(root / "one", seed=11, r=4, base=base, targets=["q_proj", "down_proj"])
    base, _ = load_model(str(tiny_llama_dir))
    two = make_adapter(root / "two", seed=12, r=4, base=base, targets=["q_proj", "down_proj"])
    return root, [one, two]


def test_activation_weighted_error(model_adapters, tiny_llama_dir, tiny_text_file):
    root, dirs = model_adapters
    out = profile_adapters(dirs, root / "profile", model=str(tiny_llama_dir), calib=str(tiny_text_file),
                           samples=3, seqlen=16, groups=[32])
    prof = load_adapter_profile(out)
    assert prof.table["error_act"].notna().all()
    assert prof.meta["calibration"]["samples"] == 3
    # independent check: mean over calibration tokens of ||dE x||^2, with inputs captured here
    model, tokenizer = load_model(str(tiny_llama_dir))
    tokens = calibration_tokens(str(tiny_text_file), model, tokenizer, 16, 3)
    adapter = read_adapter(dirs[0])
    module = adapter.modules[0]
    captured = []
    layer = dict(model.named_modules())[module.name]
    handle = layer.register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0].reshape(-1, inputs[0].shape[-1])))
    with torch.no_grad():
        for row in tokens:
            model(row.unsqueeze(0))
    handle.remove()
    x = torch.cat(captured).double()
    cfg = AdapterQuantConfig(bits=2, high=1, group=32)
    split = svd_split(module.lora_a, module.lora_b, module.scale)
    b, a = dequantized_factors(split, cfg)
    diff = module.delta() - b[0].double() @ a[0].double()
    expect = float(((x @ diff.T) ** 2).sum(dim=1).mean())
    row = prof.table[(prof.table["matrix"] == f"one/{module.name}") & (prof.table["config"] == cfg.name)]
    assert float(row["error_act"].iloc[0]) == pytest.approx(expect, rel=1e-6)
    act = solve_adapters(out, 2.5, objective="act").to_dict()
    assert act["objective_column"] == "error_act" and act["status"] == "optimal" and act["bits_per_param"] <= 2.5


def test_adapter_for_another_model(adapter_dirs, tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "prof"
    code = main(["adapter", "profile", str(adapter_dirs[0]), "--model", str(tiny_llama_dir), "--out", str(out)])
    assert code == 2
    assert "does not fit model" in capsys.readouterr().err
    assert not out.exists()


def test_calib_needs_model(adapter_dirs, tmp_path, tiny_text_file):
    with pytest.raises(ValueError, match="--calib needs --model"):
        profile_adapters(adapter_dirs, tmp_path / "p", calib=str(tiny_text_file))
    assert not (tmp_path / "p").exists()
