"""Input moments and the activation-aware error: error_act equals ‖X ΔWᵀ‖² / N on the calibration inputs."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from bitalloc.configs import QuantConfig
from bitalloc.lowrank import decompose
from bitalloc.models import find_targets, load_model, target_weight
from bitalloc.models.activations import act_error, estimate_input_moments, load_moments, save_moments


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))


def _inputs(model, tokens, name):
    """The rows of X: every input the target ``name`` saw on ``tokens`` (one forward pass)."""
    module = dict(find_targets(model))[name]
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)
    handle.remove()
    return torch.cat(seen).double()


def _tokens(vocab: int, n: int = 3, seqlen: int = 16) -> torch.Tensor:
    return torch.randint(1, vocab, (n, seqlen), generator=torch.Generator().manual_seed(1))


def test_act_error_equals_the_output_error_on_the_inputs(tiny_llama):
    model, tokenizer = tiny_llama
    tokens = _tokens(len(tokenizer))
    targets = find_targets(model)
    moments = estimate_input_moments(model, tokens, targets, batch_size=2, progress=False)
    assert moments.tokens == tokens.numel()
    gen = torch.Generator().manual_seed(0)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        W = target_weight(dict(targets)[name])
        delta = torch.randn(W.shape, generator=gen)
        X = _inputs(model, tokens, name)
        direct = float((X @ delta.double().T).square().sum()) / X.shape[0]
        assert act_error(delta, moments.of(name)) == pytest.approx(direct, rel=1e-5)


def test_matrices_reading_one_input_share_one_moment(tiny_llama):
    model, tokenizer = tiny_llama
    moments = estimate_input_moments(model, _tokens(len(tokenizer)), find_targets(model), progress=False)
    group = moments.target_group
    assert group["model.layers.0.self_attn.q_proj"] == group["model.layers.0.self_attn.k_proj"] == \
        group["model.layers.0.self_attn.v_proj"]
    assert group["model.layers.0.mlp.gate_proj"] == group["model.layers.0.mlp.up_proj"]
    assert group["model.layers.0.self_attn.q_proj"] != group["model.layers.1.self_attn.q_proj"]
    assert group["model.layers.0.self_attn.o_proj"] != group["model.layers.1.self_attn.o_proj"]
    assert len(moments.groups) == 2 * 4  # per layer: attention input, o_proj input, MLP input, down_proj input


def test_wide_inputs_keep_the_diagonal(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    tokens = _tokens(len(tokenizer))
    targets = find_targets(model)
    full = estimate_input_moments(model, tokens, targets, progress=False)
    diag = estimate_input_moments(model, tokens, targets, full_max=32, progress=False)  # hidden 32, MLP 64
    name = "model.layers.0.mlp.down_proj"
    assert diag.of(name).dim() == 1 and diag.of("model.layers.0.mlp.up_proj").dim() == 2
    torch.testing.assert_close(diag.of(name), torch.diagonal(full.of(name)))
    save_moments(diag, tmp_path / "m.safetensors", "k")
    again = load_moments(tmp_path / "m.safetensors", "k")
    assert again.target_group == diag.target_group and again.tokens == diag.tokens
    torch.testing.assert_close(again.of(name), diag.of(name))
    with pytest.raises(ValueError, match="other inputs"):
        load_moments(tmp_path / "m.safetensors", "another")


def test_profile_records_error_act_of_each_config(tiny_llama_dir, tiny_text_file, tmp_path, monkeypatch):
    from bitalloc.models.text import calibration_tokens
    from bitalloc.profiles import ProfileRequest, load_profile, profile

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    space = tmp_path / "space.json"
    space.write_text('["nf2-g16-s8x16-r0", "nf4-g16-s16-r0"]')
    request = ProfileRequest(model=str(tiny_llama_dir), out=tmp_path / "p", space=str(space), progress=False,
                             fisher=False, kl=False, calib=str(tiny_text_file), samples=3, seqlen=24)
    df, meta = load_profile(profile(request))
    assert df["error_act"].notna().all() and (df["error_act"] > 0).all()
    assert meta["act"] and meta["calibration"]["samples"] == 3
    model, tokenizer = load_model(str(tiny_llama_dir))
    tokens = calibration_tokens(str(tiny_text_file), model, tokenizer, 24, 3, seed=0)
    name = "model.layers.1.self_attn.v_proj"
    W = target_weight(dict(find_targets(model))[name]).detach().float()
    X = _inputs(model, tokens, name)
    row = df[(df["matrix"] == name) & (df["config"] == "nf2-g16-s8x16-r0")].iloc[0]
    delta = W - decompose(W, QuantConfig.from_name("nf2-g16-s8x16-r0")).reconstruct()
    direct = float((X @ delta.double().T).square().sum()) / X.shape[0]
    assert row["error_act"] == pytest.approx(direct, rel=1e-4)


def test_a_profile_without_error_act_loads_and_a_rerun_adds_it(tiny_llama_dir, tiny_text_file, tmp_path, monkeypatch):
    from bitalloc.profiles import ProfileRequest, load_profile, profile
    from bitalloc.profiles.store import TABLE_FILE

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    space = tmp_path / "space.json"
    space.write_text('["nf2-g16-s8x16-r0", "nf4-g16-s16-r0"]')
    kw = dict(model=str(tiny_llama_dir), out=tmp_path / "p", space=str(space), progress=False, fisher=False, kl=False,
              calib=str(tiny_text_file), samples=3, seqlen=24)
    out = profile(ProfileRequest(act=False, **kw))
    df, meta = load_profile(out)
    # the table as bitalloc wrote it before the error_act and error_kl columns existed
    old = df.drop(columns=["error_act", "error_kl"])
    (out / TABLE_FILE).write_text(old.to_csv(index=False, float_format="%.17g"))
    for part in (out / "parts").glob("*.csv"):
        p = pd.read_csv(part)
        p.drop(columns=["error_act", "error_kl"]).to_csv(part, index=False, float_format="%.17g")
    meta.pop("act")
    import hashlib
    import json
    meta["table"]["sha256"] = hashlib.sha256((out / TABLE_FILE).read_bytes()).hexdigest()
    (out / "meta.json").write_text(json.dumps(meta))
    loaded, _ = load_profile(out)
    assert loaded["error_act"].isna().all()
    pd.testing.assert_frame_equal(loaded.drop(columns=["error_act", "error_kl"]), old, check_dtype=False)
    again, meta2 = load_profile(profile(ProfileRequest(**kw)))  # the same command with error_act on: resumes
    assert again["error_act"].notna().all() and meta2["act"]
    pd.testing.assert_series_equal(again["error"], df["error"])  # the same decompositions, now with error_act
