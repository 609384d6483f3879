"""Fixtures for bitalloc.models tests: a tiny Llama written as a GGUF file with the gguf package."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


def write_llama_gguf(model, tokenizer, path: Path) -> Path:
    """Write a Llama model and its byte-level BPE tokenizer as an F32 GGUF file.

    Tensor names come from gguf's own HF -> GGUF name map (no hand-written list). The q/k row
    permutation llama.cpp applies is not applied, so q/k weights read back permuted; tests
    compare other tensors.
    """
    import gguf

    config = model.config
    arch = gguf.MODEL_ARCH.LLAMA
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)

    vocab = tokenizer.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = set(tokenizer.all_special_tokens)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)

    for name, tensor in model.state_dict().items():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        writer.add_tensor(gguf_name, tensor.detach().float().numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path, tiny_tokenizer, tiny_builders):
    """``(path, model)``: a tiny Llama (untied output layer) and its GGUF file in a fresh folder."""
    model = tiny_builders.llama(len(tiny_tokenizer), seed=3)
    folder = tmp_path / "gguf-model"
    folder.mkdir()
    return write_llama_gguf(model, tiny_tokenizer, folder / "tiny-llama.F32.gguf"), model


@pytest.fixture
def bitalloc_cache(tmp_path, monkeypatch) -> Path:
    """A fresh, empty BITALLOC_CACHE."""
    cache = tmp_path / "bitalloc-cache"
    monkeypatch.setenv("BITALLOC_CACHE", str(cache))
    return cache
