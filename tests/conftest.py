"""Shared test fixtures: a tiny seeded corpus, tokenizer and models saved as Hugging Face dirs.

Everything here is built locally in milliseconds, so tests never need the hub or the built-in
model. Models are returned in eval mode, float32, on CPU.
"""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

WORDS = (
    "the a model weight matrix bit budget layer error quantize rank block scale code "
    "small large fast slow number token text window learn predict next word value run "
    "solver profile config apply load save test seed data sample mean sum loss value"
).split()
SPECIAL = "<|endoftext|>"


def tiny_text(n_sentences: int = 200, seed: int = 0) -> str:
    """Deterministic pseudo-English: ``n_sentences`` short sentences from a fixed word list."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(n_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


def build_tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE PreTrainedTokenizerFast trained on :func:`tiny_text`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(tiny_text(400, seed=1).split(". "), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=SPECIAL, eos_token=SPECIAL, unk_token=SPECIAL, pad_token=SPECIAL
    )


def build_tiny_llama(vocab_size: int, seed: int = 0, tie: bool = False):
    """A 2-layer Llama causal LM (hidden 32), seeded, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


def build_tiny_gpt2(vocab_size: int, seed: int = 0):
    """A 2-layer GPT-2 causal LM (Conv1D layers, tied output embedding), seeded, eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=32, n_layer=2, n_head=4, n_positions=128, vocab_size=vocab_size, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def build_tiny_bert(vocab_size: int, seed: int = 0):
    """A 2-layer BERT masked LM (an encoder), seeded, eval mode."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    return BertForMaskedLM(config).eval()


@pytest.fixture(scope="session")
def tiny_builders() -> SimpleNamespace:
    """The builders above, for tests that need a variant (another seed, tied embeddings...):
    ``text``, ``tokenizer``, ``llama``, ``gpt2``, ``bert``."""
    return SimpleNamespace(
        text=tiny_text,
        tokenizer=build_tiny_tokenizer,
        llama=build_tiny_llama,
        gpt2=build_tiny_gpt2,
        bert=build_tiny_bert,
    )


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text(tiny_text(200, seed=0), encoding="utf-8")
    return path


@pytest.fixture
def tiny_llama(tiny_tokenizer):
    """A fresh tiny Llama causal LM and its tokenizer."""
    return build_tiny_llama(len(tiny_tokenizer)), tiny_tokenizer


@pytest.fixture
def tiny_gpt2(tiny_tokenizer):
    """A fresh tiny GPT-2 (Conv1D) causal LM and its tokenizer."""
    return build_tiny_gpt2(len(tiny_tokenizer)), tiny_tokenizer


@pytest.fixture
def tiny_bert(tiny_tokenizer):
    """A fresh tiny BERT masked LM (an encoder)."""
    return build_tiny_bert(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny Llama (config.json, model.safetensors, tokenizer files)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(len(tiny_tokenizer)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny GPT-2 with its tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    build_tiny_gpt2(len(tiny_tokenizer)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny BERT masked LM, deliberately without tokenizer files."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    build_tiny_bert(len(tiny_tokenizer)).save_pretrained(folder)
    return folder
