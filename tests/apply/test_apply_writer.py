"""`bitalloc apply` + `bitalloc.load`: end to end on tiny models, accounting, PEFT, bad input."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import bitalloc
from bitalloc.apply import AppliedModelError, QuantizedLinear, apply_allocation, load, read_info
from bitalloc.apply.layout import ADAPTER_DIR, MODEL_FILE
from bitalloc.configs import QuantConfig
from bitalloc.lowrank import decompose
from bitalloc.models import find_targets, load_model, target_weight
from bitalloc.profiles import ProfileRequest, profile

SPACE = ["nf2-g16-s8x16-r0", "nf3-g16-s8x16-r0", "nf4-g16-s16-r0", "nf3-g32-s4x16-r4", "nf2-g16-s8x16-r4-lr8"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _profile(model_dir: Path, out: Path, tmp_path: Path, fisher: bool = False, space=SPACE) -> Path:
    space_file = tmp_path / "space.json"
    space_file.write_text(json.dumps(space))
    return profile(ProfileRequest(model=str(model_dir), out=out, space=str(space_file), fisher=fisher,
                                  act=False, kl=False, samples=4, seqlen=32, progress=False))


def _ids(vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (2, 24), generator=g)


@pytest.fixture(scope="module")
def applied(tiny_llama_dir, tmp_path_factory):
    """A tiny Llama profiled, solved at a budget that mixes ranks 0 and 4, and applied (shared: read only)."""
    tmp_path = tmp_path_factory.mktemp("applied")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
        prof = _profile(tiny_llama_dir, tmp_path / "profile", tmp_path)
        alloc = bitalloc.solve(prof, 6.0)
        alloc_path = alloc.save(tmp_path / "alloc.json")
        # cpu: the reference below decomposes on the cpu too (cuda rounds differently)
        out = apply_allocation(alloc_path, out=tmp_path / "q", device="cpu", progress=False)
    return out, alloc, tiny_llama_dir


def _reference_model(model_dir: Path, info: dict, with_lowrank: bool) -> torch.nn.Module:
    """The source model with each target's weight replaced by Q (+ L1 L2) recomputed independently."""
    model, _ = load_model(str(model_dir))
    modules = dict(model.named_modules())
    names = list(info["targets"])
    for i, name in enumerate(names):
        cfg = QuantConfig.from_name(info["targets"][name])
        W = target_weight(modules[name]).detach().float()
        dec = decompose(W, cfg, seed=i)
        new = dec.reconstruct() if with_lowrank else dec.q.dequantize().float()
        with torch.no_grad():
            target_weight(modules[name]).copy_(new)
    return model


def test_end_to_end_profile_solve_apply_load_eval(applied, tiny_text_file):
    out, alloc, model_dir = applied
    info = read_info(out)
    assert info["format_version"] == 1
    assert info["targets"] == alloc.assignments
    ranks = {QuantConfig.from_name(c).rank for c in info["targets"].values()}
    assert ranks == {0, 4}, "the fixture should mix ranks so both adapter paths are exercised"
    assert info["bits_per_param"] == pytest.approx(alloc.bits_per_param, rel=1e-12)

    model = load(out)
    assert all(isinstance(m, QuantizedLinear) for n, m in model.named_modules() if n in info["targets"])
    full = load(out, adapter=True)
    ids = _ids(model.config.vocab_size)
    ref_q = _reference_model(model_dir, info, with_lowrank=False)
    ref_full = _reference_model(model_dir, info, with_lowrank=True)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref_q(ids).logits, atol=1e-5)
        assert torch.allclose(full(ids).logits, ref_full(ids).logits, atol=1e-5)
        assert not torch.allclose(model(ids).logits, full(ids).logits, atol=1e-4)

    from bitalloc.models import evaluate

    from bitalloc.apply import load_model_or_applied

    model_full, tok = load_model_or_applied(str(out))
    result = evaluate(model_full, tok, data=str(tiny_text_file), seqlen=32, windows=2, kl_to=str(model_dir),
                      progress=False)
    assert result["perplexity"] > 1 and result["kl"] > 0


def test_bits_agree_with_bytes_on_disk(applied):
    out, alloc, _ = applied
    info = read_info(out)
    storage = 0
    disk_bits = 0
    arrays = 0
    with safe_open(str(out / MODEL_FILE), framework="pt") as f:
        keys = list(f.keys())
        for name, config in info["targets"].items():
            cfg = QuantConfig.from_name(config)
            storage += cfg.storage_bits(info["target_details"][name]["rows"], info["target_details"][name]["cols"])
            mine = [k for k in keys if k.startswith(name + ".") and not k.endswith(".bias")]
            for k in mine:
                t = f.get_tensor(k)
                disk_bits += 8 * t.numel() * t.element_size()
            arrays += len(mine)
    with safe_open(str(out / ADAPTER_DIR / "adapter_model.safetensors"), framework="pt") as f:
        for k in f.keys():
            module = k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            if QuantConfig.from_name(info["targets"][module]).lowrank_bits == 16:
                t = f.get_tensor(k)
                assert t.dtype == torch.bfloat16
                disk_bits += 8 * t.numel() * t.element_size()
                arrays += 1
    params = info["target_params"]
    assert 0 <= disk_bits - storage < 8 * arrays
    assert info["bits_per_param_on_disk"] * params == pytest.approx(disk_bits)
    assert info["bits_per_param"] * params == pytest.approx(storage)
    assert info["bits_per_param"] == pytest.approx(alloc.bits_per_param)


def test_peft_round_trip_and_training_step(applied):
    from peft import PeftModel

    out, _, _ = applied
    ids = _ids(load(out).config.vocab_size, seed=1)
    attached = load(out, adapter=True)
    by_hand = PeftModel.from_pretrained(load(out), str(out / ADAPTER_DIR), is_trainable=True)
    with torch.no_grad():
        assert torch.allclose(by_hand(ids).logits, attached(ids).logits, atol=1e-6)

    config = json.loads((out / ADAPTER_DIR / "adapter_config.json").read_text())
    for key, r in config["rank_pattern"].items():
        assert config["alpha_pattern"][key] == r  # scale alpha / r == 1
    info = read_info(out)
    assert sorted(config["target_modules"]) == sorted(
        n for n, c in info["targets"].items() if QuantConfig.from_name(c).rank > 0)

    by_hand.train()
    before = {n: b.clone() for n, b in by_hand.named_buffers()}
    frozen = {n: p.clone() for n, p in by_hand.named_parameters() if not p.requires_grad}
    trainable = {n: p.clone() for n, p in by_hand.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.SGD([p for p in by_hand.parameters() if p.requires_grad], lr=1e-2)
    loss = by_hand(ids, labels=ids).loss
    loss.backward()
    opt.step()
    after = dict(by_hand.named_parameters())
    assert any(not torch.equal(after[n], v) for n, v in trainable.items())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())
    assert all(torch.equal(b, before[n]) for n, b in by_hand.named_buffers())


def test_dequantized_checkpoint_loads_without_bitalloc(tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = apply_allocation(None, uniform="nf3-g16-s8x16-r4", model=str(tiny_llama_dir), out=tmp_path / "q",
                           dequantized=True, progress=False)
    plain = AutoModelForCausalLM.from_pretrained(out / "dequantized")
    assert all(type(m) is torch.nn.Linear for n, m in plain.named_modules() if n in read_info(out)["targets"])
    vanilla = PeftModel.from_pretrained(plain, str(out / ADAPTER_DIR)).eval()
    ours = load(out, adapter=True)
    ids = _ids(plain.config.vocab_size, seed=2)
    with torch.no_grad():
        a, b = vanilla(ids).logits, ours(ids).logits
    assert torch.allclose(a, b, atol=5e-3), float((a - b).abs().max())  # Q rounded to bf16 in the checkpoint


@pytest.mark.parametrize("fixture", ["tiny_gpt2_dir", "tiny_bert_dir"])
def test_other_architectures(fixture, request, tmp_path):
    model_dir = request.getfixturevalue(fixture)
    out = apply_allocation(None, uniform="nf4-g16-s16-r4", model=str(model_dir), out=tmp_path / "q", progress=False)
    info = read_info(out)
    source, _ = load_model(str(model_dir))
    assert set(info["targets"]) == {n for n, _ in find_targets(source)}
    model = load(out, adapter=True)
    ids = _ids(source.config.vocab_size, seed=3)[:, :16]
    with torch.no_grad():
        got = model(ids).logits
        want = source(ids).logits
    assert torch.isfinite(got).all()
    assert (got - want).abs().mean() < 0.1 * want.abs().mean() + 1e-3  # 4-bit + rank 4: close to the source


def test_rank_zero_everywhere_writes_no_adapter(tiny_llama_dir, tmp_path, caplog):
    out = apply_allocation(None, uniform="nf4-g16-s16-r0", model=str(tiny_llama_dir), out=tmp_path / "q",
                           progress=False)
    assert not (out / ADAPTER_DIR).exists() and not read_info(out)["adapter"]
    with caplog.at_level(logging.WARNING):
        model = load(out, adapter=True)
    assert "no adapter" in caplog.text
    assert isinstance(model, torch.nn.Module) and not hasattr(model, "peft_config")


def test_fisher_allocation_reuses_the_cached_estimate(tiny_llama_dir, tmp_path, monkeypatch):
    prof = _profile(tiny_llama_dir, tmp_path / "profile", tmp_path, fisher=True)
    alloc = bitalloc.solve(prof, 5.0)

    def no_estimate(*args, **kwargs):
        raise AssertionError("apply recomputed the Fisher estimate instead of reading the profile's cache")

    monkeypatch.setattr("bitalloc.models.fisher_cache.estimate_fisher", no_estimate)
    out = apply_allocation(alloc, out=tmp_path / "q", progress=False)
    info = read_info(out)
    assert info["fisher"] is True
    assert all(d["error_fisher"] is not None for d in info["target_details"].values())
    plain = apply_allocation(alloc, out=tmp_path / "q-plain", fisher=False, progress=False)
    assert read_info(plain)["fisher"] is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_apply_and_load_on_cuda(applied, tmp_path):
    out, alloc, _ = applied
    gpu_out = apply_allocation(alloc, out=tmp_path / "gpu", device="cuda", progress=False)
    assert read_info(gpu_out)["targets"] == read_info(out)["targets"]
    cpu_model = load(out, adapter=True)
    gpu_model = load(gpu_out, adapter=True, device="cuda")
    assert next(gpu_model.buffers()).device.type == "cuda"
    ids = _ids(cpu_model.config.vocab_size, seed=4)
    with torch.no_grad():
        a = cpu_model(ids).logits
        b = gpu_model(ids.cuda()).logits.cpu()
    # the same configs decomposed on another device: rounding differs, the model must not
    assert (a - b).abs().mean() < 0.05 * a.abs().mean()


# ----- bad input ---------------------------------------------------------------------------
def test_allocation_for_another_model_is_refused(applied, tiny_gpt2_dir, tiny_builders, tiny_tokenizer, tmp_path):
    out, alloc, model_dir = applied
    with pytest.raises(ValueError, match="another model"):
        apply_allocation(alloc, model=str(tiny_gpt2_dir), out=tmp_path / "x", progress=False)

    other = tmp_path / "other-llama"  # same names and shapes, other weights
    tiny_builders.llama(len(tiny_tokenizer), seed=7).save_pretrained(other)
    with pytest.raises(ValueError, match="hash"):
        apply_allocation(alloc, model=str(other), out=tmp_path / "y", progress=False)
    apply_allocation(alloc, model=str(other), out=tmp_path / "y", ignore_model_hash=True, progress=False)

    data = alloc.to_dict()
    name = next(iter(data["assignments"]))
    data["provenance"] = dict(data["provenance"], shapes=dict(data["provenance"]["shapes"], **{name: [3, 5]}))
    with pytest.raises(ValueError, match="3x5"):
        apply_allocation(data, out=tmp_path / "z", progress=False)
    for p in ("x", "z"):
        assert not (tmp_path / p).exists()


def test_output_dir_not_empty_needs_force(applied, tmp_path):
    out, alloc, _ = applied
    out = Path(shutil.copytree(out, tmp_path / "copy"))
    with pytest.raises(FileExistsError, match="--force"):
        apply_allocation(alloc, out=out, progress=False)
    (tmp_path / "empty").mkdir()
    apply_allocation(alloc, out=tmp_path / "empty", progress=False)  # an empty dir is fine
    old = read_info(out)["created"]
    apply_allocation(alloc, out=out, force=True, progress=False)
    assert read_info(out)["files"] and load(out) is not None
    assert read_info(out)["created"] >= old


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_write_leaves_nothing_loadable(tiny_llama_dir, tmp_path, monkeypatch, error):
    import bitalloc.apply.writer as writer

    def failing_save(*args, **kwargs):
        raise error

    monkeypatch.setattr(writer, "save_file", failing_save)
    with pytest.raises(type(error)):
        apply_allocation(None, uniform="nf4-g16-s16-r0", model=str(tiny_llama_dir), out=tmp_path / "q",
                         progress=False)
    assert not (tmp_path / "q").exists()
    assert list(tmp_path.glob(".q.tmp-*")) == []


def test_damaged_directory_is_refused(applied, tmp_path):
    out, _, _ = applied
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    data = (broken / MODEL_FILE).read_bytes()
    (broken / MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(AppliedModelError, match="incomplete or damaged"):
        load(broken)
    (broken / "bitalloc.json").unlink()
    with pytest.raises(AppliedModelError, match="bitalloc apply"):
        load(broken)


def test_bad_uniform_config_and_missing_inputs(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError):
        apply_allocation(None, uniform="nf5-g16", model=str(tiny_llama_dir), out=tmp_path / "q", progress=False)
    with pytest.raises(ValueError, match="either"):
        apply_allocation(None, out=tmp_path / "q", progress=False)
    with pytest.raises(ValueError, match="rank"):
        apply_allocation(None, uniform="nf4-g16-s16-r100", model=str(tiny_llama_dir), out=tmp_path / "q",
                         progress=False)


def _flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_changed_byte_of_the_same_size_is_refused_naming_the_file(applied, tmp_path):
    out, _, _ = applied
    assert set(read_info(out)["sha256"]) == set(read_info(out)["files"])
    for name in (MODEL_FILE, f"{ADAPTER_DIR}/adapter_model.safetensors"):
        broken = Path(shutil.copytree(out, tmp_path / name.replace("/", "-")))
        size = (broken / name).stat().st_size
        _flip_one_byte(broken / name)
        assert (broken / name).stat().st_size == size
        with pytest.raises(AppliedModelError, match=f"{name}.*SHA-256"):
            load(broken)
        with pytest.raises(AppliedModelError, match="SHA-256"):
            bitalloc.apply.evaluate_model(str(broken), data="self:1", seqlen=16, windows=1, kl=False, device="cpu")
    assert load(broken, verify=False) is not None  # the stated escape: sizes only


def test_a_directory_without_digests_loads_unverified_with_a_warning(applied, tmp_path, caplog):
    out, _, _ = applied
    old = Path(shutil.copytree(out, tmp_path / "old"))
    info = json.loads((old / "bitalloc.json").read_text())
    del info["sha256"]
    (old / "bitalloc.json").write_text(json.dumps(info))
    with caplog.at_level(logging.WARNING):
        assert load(old) is not None
    assert "not verified" in caplog.text


@pytest.mark.parametrize("entry", ["../outside.bin", "/etc/hostname"])
def test_a_files_entry_outside_the_directory_is_refused(applied, tmp_path, entry):
    out, _, _ = applied
    probe = Path(shutil.copytree(out, tmp_path / "probe"))
    info = json.loads((probe / "bitalloc.json").read_text())
    info["files"][entry] = 1
    (probe / "bitalloc.json").write_text(json.dumps(info))
    with pytest.raises(AppliedModelError, match="outside"):
        read_info(probe)


def _without(alloc, name: str) -> dict:
    data = alloc.to_dict()
    data["assignments"] = {k: v for k, v in data["assignments"].items() if k != name}
    return data


def test_an_allocation_missing_a_matrix_is_refused_naming_it(applied, tmp_path):
    out, alloc, _ = applied
    name = "model.layers.1.mlp.up_proj"
    with pytest.raises(ValueError, match=rf"no config to 1 target.*{name}.*--keep-dense"):
        apply_allocation(_without(alloc, name), out=tmp_path / "q", device="cpu", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_keep_dense_keeps_the_matrix_dense_and_counts_its_stored_bits(applied, tmp_path):
    out, alloc, model_dir = applied
    name = "model.layers.1.mlp.up_proj"
    q = apply_allocation(_without(alloc, name), out=tmp_path / "q", keep_dense=r"layers\.1\.mlp\.up_proj",
                         device="cpu", progress=False)
    info = read_info(q)
    dense = info["dense_targets"][name]
    original = dict(load_model(str(model_dir))[0].named_modules())[name].weight
    assert dense["storage_bits"] == original.numel() * original.element_size() * 8
    quantized = sum(d["storage_bits"] for d in info["target_details"].values())
    params = sum(d["rows"] * d["cols"] for d in [*info["target_details"].values(), dense])
    assert info["target_params"] == params
    assert info["bits_per_param"] == pytest.approx((quantized + dense["storage_bits"]) / params)
    assert name not in info["targets"]
    layer = dict(load(q).named_modules())[name]
    assert not isinstance(layer, QuantizedLinear) and torch.equal(layer.weight, original)


def test_extra_target_layers_with_ignore_model_hash_are_refused_unless_kept_dense(applied, tmp_path):
    from transformers import AutoConfig, LlamaForCausalLM

    _, alloc, model_dir = applied
    config = AutoConfig.from_pretrained(model_dir)
    config.num_hidden_layers = 3
    torch.manual_seed(3)
    bigger = tmp_path / "three-layers"
    LlamaForCausalLM(config).save_pretrained(bigger)
    with pytest.raises(ValueError, match=r"no config to 7 target.*model\.layers\.2\."):
        apply_allocation(alloc, model=str(bigger), out=tmp_path / "q", ignore_model_hash=True, device="cpu",
                         progress=False)
    assert not (tmp_path / "q").exists()
    q = apply_allocation(alloc, model=str(bigger), out=tmp_path / "q", ignore_model_hash=True,
                         keep_dense=r"layers\.2\.", device="cpu", progress=False)
    assert len(read_info(q)["dense_targets"]) == 7 and len(read_info(q)["targets"]) == 14


def test_include_with_an_allocation_is_refused(applied, tmp_path):
    _, alloc, _ = applied
    with pytest.raises(ValueError, match="--include/--exclude choose the targets of --uniform"):
        apply_allocation(alloc, out=tmp_path / "q", include="mlp", progress=False)
    assert not (tmp_path / "q").exists()


def test_outputs_respect_the_umask_and_stale_temporaries_of_the_target_are_removed(tiny_llama_dir, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    stale = tmp_path / f".q.tmp-{host}.{int(dead.stdout)}.abc123"
    live = tmp_path / f".q.tmp-{host}.{os.getpid()}.def456"  # a writer still running: kept
    other = tmp_path / f".other.tmp-{host}.{int(dead.stdout)}.abc123"  # another target: kept
    for folder in (stale, live, other):
        folder.mkdir()
        (folder / MODEL_FILE).write_bytes(b"half-written")
    previous = os.umask(0o022)
    try:
        q = apply_allocation(None, uniform="nf4-g16-s16-r0", model=str(tiny_llama_dir), out=tmp_path / "q",
                             device="cpu", progress=False)
    finally:
        os.umask(previous)
    assert not stale.exists() and live.exists() and other.exists()
    assert q.stat().st_mode & 0o777 == 0o755
    assert (q / "bitalloc.json").stat().st_mode & 0o777 == 0o644
    assert (q / MODEL_FILE).stat().st_mode & 0o777 == 0o644


def test_apply_without_model_says_which_it_loads_and_refuses_a_path_that_is_gone(applied, tmp_path, caplog):
    from bitalloc.models import ModelNotFoundError

    _, alloc, model_dir = applied
    data = alloc.to_dict()
    data["provenance"] = dict(data["provenance"], model=str(tmp_path / "moved-away"))
    with pytest.raises(ModelNotFoundError, match=r"moved-away.*does not exist here.*--model"):
        apply_allocation(data, out=tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()
    with caplog.at_level(logging.INFO, logger="bitalloc"):
        apply_allocation(alloc, out=tmp_path / "q", device="cpu", progress=False)
    assert f"quantizing {model_dir}, the model the allocation was made for" in caplog.text


def test_a_checkpoint_without_head_weights_applies_and_loads_as_its_bare_class(tiny_builders, tiny_tokenizer,
                                                                               tmp_path):
    from transformers import BertModel

    torch.manual_seed(0)
    folder = tmp_path / "bert-bare"
    BertModel(tiny_builders.bert(len(tiny_tokenizer)).config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    q = apply_allocation(None, uniform="nf4-g16-s16-r0", model=str(folder), out=tmp_path / "q", device="cpu",
                         progress=False)
    assert read_info(q)["model_class"] == "BertModel"
    loaded = load(q)
    assert type(loaded) is BertModel
    assert any(isinstance(m, QuantizedLinear) for m in loaded.modules())


def test_the_same_apply_twice_gives_the_same_bytes(tiny_llama_dir, tmp_path):
    runs = [apply_allocation(None, uniform="nf3-g16-s16-r4", model=str(tiny_llama_dir), out=tmp_path / name,
                             device="cpu", progress=False) for name in ("a", "b", "c")]
    digests = [read_info(run)["sha256"] for run in runs]
    assert digests[0] == digests[1] == digests[2]
    with safe_open(str(runs[0] / MODEL_FILE), framework="pt") as f:
        assert f.metadata() == {"bitalloc_format": "bitalloc-model", "format": "pt"}
