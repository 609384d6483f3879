import json

import pytest
import torch
from safetensors.torch import load_file

from bitalloc.adapters import (
    AdapterQuantConfig,
    apply_adapters,
    load_adapter,
    load_adapter_profile,
    profile_adapters,
    read_adapter,
    solve_adapters,
    svd_split,
)
from bitalloc.adapters.split import dequantized_factors

from adapter_helpers import tiny_base


@pytest.fixture(scope="module")
def applied(adapter_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("applied")
    profile = profile_adapters(adapter_dirs, root / "profile", groups=[32, 128])
    alloc = solve_adapters(profile, 2.2)
    alloc.save(root / "alloc.json")
    out = apply_adapters(root / "alloc.json", root / "out", dequantized=True)
    return root, out, alloc.to_dict(), load_adapter_profile(profile)


def test_storage_bits_equal_bytes_written(applied):
    _, out, alloc, _ = applied
    index = json.loads((out / "adapters.json").read_text())
    assert {a["name"] for a in index["adapters"]} == {"math", "chat"}
    for entry in index["adapters"]:
        info = json.loads((out / entry["name"] / "adapter_quant.json").read_text())
        tensors = load_file(str(out / entry["name"] / "adapter_quant.safetensors"))
        for module, m in info["modules"].items():
            cfg = AdapterQuantConfig.from_name(m["config"])
            assert cfg.name == alloc["assignments"][f"{entry['name']}/{module}"]
            written = sum(tensors[k].numel() * tensors[k].element_size() for k in m["arrays"])
            assert written == m["bytes"]
            slack = 8 * written - cfg.storage_bits(m["rows"], m["cols"], m["rank"])
            assert 0 <= slack <= 7 * cfg.stored_arrays(m["rank"])
        assert set(tensors) == {k for m in info["modules"].values() for k in m["arrays"]}
    total_bits = sum(a["storage_bits"] for a in index["adapters"])
    assert total_bits == alloc["total_bits"]


def test_load_adapter_reproduces_the_quantized_delta(applied, adapter_dirs):
    _, out, alloc, profile = applied
    for directory in adapter_dirs:
        adapter = read_adapter(directory)
        loaded = load_adapter(out, adapter.name)
        assert loaded.config["peft_type"] == "LORA" and loaded.config["use_rslora"] is False
        for module in adapter.modules:
            cfg = AdapterQuantConfig.from_name(alloc["assignments"][f"{adapter.name}/{module.name}"])
            split = svd_split(module.lora_a, module.lora_b, module.scale)
            b, a = dequantized_factors(split, cfg)
            assert torch.equal(loaded.factors[module.name][0], b[0])
            assert torch.equal(loaded.factors[module.name][1], a[0])
            error = float(((module.delta() - loaded.delta(module.name).double()) ** 2).sum())
            row = profile.table[(profile.table["matrix"] == f"{adapter.name}/{module.name}")
                                & (profile.table["config"] == cfg.name)]
            assert error == pytest.approx(float(row["error"].iloc[0]), rel=1e-6)


def _merged_logits(factors, ids):
    model = tiny_base()
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, (b, a) in factors.items():
            modules[name].weight += (b.double() @ a.double()).float()
        return model(ids).logits


def test_peft_loads_the_dequantized_export(applied, adapter_dirs):
    from peft import PeftModel

    _, out, _, _ = applied
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = tiny_base()(ids).logits
    for directory in adapter_dirs:
        name = directory.name
        peft_model = PeftModel.from_pretrained(tiny_base(), str(out / name / "peft")).eval()
        with torch.no_grad():
            got = peft_model(ids).logits
        expect = _merged_logits(load_adapter(out, name).factors, ids)
        torch.testing.assert_close(got, expect, rtol=0, atol=2e-5)
        assert (got - plain).abs().max() > 1e-3  # the adapter changes the output


def test_delta_matches_peft_for_the_source_adapters(adapter_dirs):
    """Our ΔW = s·B·A (rsLoRA included) is what PEFT itself adds."""
    from peft import PeftModel

    for directory in adapter_dirs:
        adapter = read_adapter(directory)
        merged = PeftModel.from_pretrained(tiny_base(), str(directory)).merge_and_unload()
        base = dict(tiny_base().named_modules())
        after = dict(merged.named_modules())
        for module in adapter.modules:
            delta = (after[module.name].weight - base[module.name].weight).double()
            torch.testing.assert_close(delta, module.delta(), rtol=0, atol=1e-6)


def test_apply_refuses_a_non_empty_out(applied):
    root, out, _, _ = applied
    with pytest.raises(ValueError, match="not empty"):
        apply_adapters(root / "alloc.json", out)


def test_apply_refuses_a_changed_adapter(applied, adapter_dirs, tmp_path):
    import shutil

    root, _, _, _ = applied
    moved = tmp_path / "math"
    shutil.copytree(adapter_dirs[0], moved)
    tensors = load_file(str(moved / "adapter_model.safetensors"))
    key = next(iter(tensors))
    tensors[key] = tensors[key] * 2
    from safetensors.torch import save_file

    save_file(tensors, str(moved / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="not the one profiled"):
        apply_adapters(root / "alloc.json", tmp_path / "out", adapters=[moved])
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))
