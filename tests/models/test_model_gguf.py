"""The GGUF route: conversion of a tiny GGUF file, the cache, atomic writes."""

from __future__ import annotations

import json

import gguf
import pytest
import torch

from bitalloc.models import gguf_cache, load_model


def _unpermuted(model) -> list[str]:
    """State-dict names whose tensors llama.cpp stores unpermuted (all but attention q and k)."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    permuted = {gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K}
    return [n for n in model.state_dict() if names.get_type(n, try_suffixes=(".weight", ".bias")) not in permuted]


def test_gguf_file_converts_and_caches(tiny_gguf, tiny_tokenizer, bitalloc_cache):
    path, original = tiny_gguf
    model, tokenizer = load_model(str(path))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training and model.dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config")

    ours, theirs = model.state_dict(), original.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    compared = _unpermuted(original)
    assert len(compared) > len(theirs) // 2
    for name in compared:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0)

    text = "The model weight matrix predicts the next token."
    assert tokenizer(text).input_ids == tiny_tokenizer(text).input_ids

    entry = gguf_cache.gguf_cache_dir(path)
    assert entry.parent.parent == bitalloc_cache
    assert (entry / gguf_cache.CACHE_MARKER).is_file()
    assert "quantization_config" not in json.loads((entry / "config.json").read_text())
    assert list(entry.glob("*.safetensors"))
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")]


def test_second_load_reads_the_cache(tiny_gguf, bitalloc_cache, monkeypatch):
    path, _ = tiny_gguf
    first, _ = load_model(str(path))

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setattr(gguf_cache, "convert_gguf", no_conversion)
    second, tokenizer = load_model(str(path))
    assert tokenizer is not None
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_directory_with_one_gguf_uses_it(tiny_gguf, bitalloc_cache):
    path, _ = tiny_gguf
    model, _ = load_model(str(path.parent))
    assert type(model).__name__ == "LlamaForCausalLM"


def test_interrupted_conversion_leaves_no_cache_entry(tiny_gguf, bitalloc_cache, monkeypatch):
    path, _ = tiny_gguf

    def half_conversion(gguf_path, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_cache, "convert_gguf", half_conversion)
    with pytest.raises(KeyboardInterrupt):
        load_model(str(path))
    assert not gguf_cache.is_cached(path)
    assert not gguf_cache.gguf_cache_dir(path).exists()
    assert list(gguf_cache.gguf_cache_dir(path).parent.iterdir()) == []

    monkeypatch.undo()
    monkeypatch.setenv("BITALLOC_CACHE", str(bitalloc_cache))
    model, _ = load_model(str(path))
    assert gguf_cache.is_cached(path)


def test_cache_key_follows_the_file(tiny_gguf, bitalloc_cache):
    path, _ = tiny_gguf
    before = gguf_cache.gguf_cache_key(path)
    assert before.startswith(path.stem)
    with open(path, "ab") as handle:
        handle.write(b"\0" * 32)
    assert gguf_cache.gguf_cache_key(path) != before


def test_stale_temporary_directories_are_removed(tiny_gguf, bitalloc_cache):
    import os

    path, _ = tiny_gguf
    target = gguf_cache.gguf_cache_dir(path)
    target.parent.mkdir(parents=True)
    stale = target.parent / f".{target.name}.killed.tmp"
    fresh = target.parent / f".{target.name}.running.tmp"
    stale.mkdir()
    fresh.mkdir()
    old = stale.stat().st_mtime - gguf_cache.STALE_TMP_SECONDS - 60
    os.utime(stale, (old, old))
    load_model(str(path))
    assert not stale.exists() and fresh.exists()
