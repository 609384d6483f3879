"""Telling causal language models (which have a perplexity) from encoders (which do not)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def _causal_class_names() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return names


def is_causal_lm(model: torch.nn.Module) -> bool:
    """True for a model that predicts the next token (a decoder with an LM head).

    Encoder models that carry a causal head class (BERT's ``BertLMHeadModel``) count only when
    their config says ``is_decoder``. Wrappers with ``get_base_model()`` (PEFT) are unwrapped.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    name = type(base).__name__
    if name not in _causal_class_names() and not name.endswith(_CAUSAL_SUFFIXES):
        return False
    if getattr(config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return bool(getattr(config, "is_decoder", False))
    return True


def require_causal_lm(model: torch.nn.Module, what: str) -> None:
    """Raise ValueError saying ``what`` needs a causal LM when ``model`` is not one."""
    if not is_causal_lm(model):
        raise ValueError(
            f"{what} is defined only for causal (decoder) language models that predict the next "
            f"token; {type(model).__name__} is an encoder or has no language-model head"
        )


def check_seqlen(model: torch.nn.Module, seqlen: int) -> None:
    """Raise ValueError when ``seqlen`` exceeds the positions the model has."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and seqlen > limit:
        raise ValueError(
            f"seqlen {seqlen} exceeds the {limit} positions of {type(model).__name__}; use a smaller --seqlen"
        )


@contextmanager
def eval_mode(*models: torch.nn.Module) -> Iterator[None]:
    """Put models in eval mode for the block, then restore each one's previous mode."""
    previous = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, was_training in zip(models, previous, strict=True):
            m.train(was_training)
