"""Profile and apply of a tiny model whose targets mix the NF and integer families."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import bitalloc
from bitalloc.apply import QuantizedLinear, apply_allocation, load, read_info
from bitalloc.apply.layout import ADAPTER_DIR, MODEL_FILE
from bitalloc.configs import QuantConfig
from bitalloc.lowrank import decompose
from bitalloc.models import load_model, target_weight
from bitalloc.profiles import ProfileRequest, load_profile, profile

SPACE = ["nf3-g16-s8x16-r0", "int3-g16-s8x16-r0", "int4-g16-s16-r0", "nf4-g16-s16-r4",
         "int3-g32-s4x16-r4", "int2-g16-s8x16-r4-lr8"]
#: the configs the targets take in turn: both families, ranks 0 and 4, bf16 and NF8 factors
CYCLE = ["int3-g32-s4x16-r4", "nf3-g16-s8x16-r0", "int4-g16-s16-r0", "int2-g16-s8x16-r4-lr8", "nf4-g16-s16-r4"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def mixed(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama profiled over both families, an allocation cycling through :data:`CYCLE`, applied."""
    tmp = tmp_path_factory.mktemp("mixed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BITALLOC_CACHE", str(tmp / "cache"))
        space = tmp / "space.json"
        space.write_text(json.dumps(SPACE))
        prof = profile(ProfileRequest(model=str(tiny_llama_dir), out=tmp / "profile", space=str(space), fisher=False,
                                      samples=4, seqlen=32, progress=False))
        data = bitalloc.solve(prof, 6.0).to_dict()
        data["assignments"] = {name: CYCLE[i % len(CYCLE)] for i, name in enumerate(data["assignments"])}
        out = apply_allocation(data, out=tmp / "q", device="cpu", progress=False)
    return prof, out, tiny_llama_dir


def test_the_profile_measures_every_config_of_both_families(mixed):
    prof, _, _ = mixed
    df, _ = load_profile(prof)
    assert set(df["config"]) == set(SPACE)
    assert df["error"].notna().all() and (df["error"] > 0).all()
    for name, group in df.groupby("matrix"):
        err = dict(zip(group["config"], group["error"]))
        # more code bits, lower error; the rank-4 factors lower it further
        assert err["int4-g16-s16-r0"] < err["int3-g16-s8x16-r0"], name
        bits = dict(zip(group["config"], group["storage_bits"]))
        rows, cols = int(group["rows"].iloc[0]), int(group["cols"].iloc[0])
        assert bits == {c: QuantConfig.from_name(c).storage_bits(rows, cols) for c in SPACE}


def _reference(model_dir: Path, info: dict, with_lowrank: bool) -> torch.nn.Module:
    model, _ = load_model(str(model_dir))
    modules = dict(model.named_modules())
    for i, name in enumerate(info["targets"]):
        dec = decompose(target_weight(modules[name]).detach().float(), QuantConfig.from_name(info["targets"][name]),
                        seed=i)
        with torch.no_grad():
            target_weight(modules[name]).copy_(dec.reconstruct() if with_lowrank else dec.q.dequantize().float())
    return model


def test_apply_load_and_peft_adapter_work_for_both_families(mixed):
    _, out, model_dir = mixed
    info = read_info(out)
    assert {QuantConfig.from_name(c).family for c in info["targets"].values()} == {"nf", "int"}
    model = load(out)
    for name, module in model.named_modules():
        if name in info["targets"]:
            assert isinstance(module, QuantizedLinear)
            assert (getattr(module, "qzeros", None) is not None) == (module.config.family == "int")
    full = load(out, adapter=True)
    ids = torch.randint(1, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, _reference(model_dir, info, False)(ids).logits, atol=1e-5)
        assert torch.allclose(full(ids).logits, _reference(model_dir, info, True)(ids).logits, atol=1e-5)


def test_bits_agree_with_bytes_on_disk_for_both_families(mixed):
    _, out, _ = mixed
    info = read_info(out)
    storage = disk = arrays = 0
    with safe_open(str(out / MODEL_FILE), framework="pt") as f:
        keys = list(f.keys())
        for name, config in info["targets"].items():
            d = info["target_details"][name]
            storage += QuantConfig.from_name(config).storage_bits(d["rows"], d["cols"])
            mine = [k for k in keys if k.startswith(name + ".") and not k.endswith(".bias")]
            assert (f"{name}.qzeros" in mine) == config.startswith("int")
            for k in mine:
                t = f.get_tensor(k)
                disk += 8 * t.numel() * t.element_size()
            arrays += len(mine)
    with safe_open(str(out / ADAPTER_DIR / "adapter_model.safetensors"), framework="pt") as f:
        for k in f.keys():
            module = k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            if QuantConfig.from_name(info["targets"][module]).lowrank_bits == 16:
                t = f.get_tensor(k)
                disk += 8 * t.numel() * t.element_size()
                arrays += 1
    assert 0 <= disk - storage < 8 * arrays
    assert info["bits_per_param"] * info["target_params"] == pytest.approx(storage)


def test_uniform_int_apply(tiny_llama_dir, tmp_path):
    out = apply_allocation(None, uniform="int3-g16-s16-r0", model=str(tiny_llama_dir), out=tmp_path / "q",
                           device="cpu", progress=False)
    info = read_info(out)
    assert set(info["targets"].values()) == {"int3-g16-s16-r0"}
    assert info["bits_per_param"] == pytest.approx(3 + 16 / 16 + 3 / 16)
    assert not (out / ADAPTER_DIR).exists()
    with pytest.raises(ValueError, match="did you mean 'int3-g64-s16-r0'"):
        apply_allocation(None, uniform="int3-g61-s16-r0", model=str(tiny_llama_dir), out=tmp_path / "x",
                         progress=False)
