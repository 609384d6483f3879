"""Text sampled from the model itself, for calibration without any data (``self:N``)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from tqdm.auto import tqdm

from bitalloc.models.causal import check_seqlen, eval_mode, require_causal_lm

logger = logging.getLogger(__name__)


def start_token_id(model: torch.nn.Module, tokenizer: Any | None) -> int:
    """The token sampling starts from: BOS (tokenizer's, else the config's), else EOS."""
    candidates = []
    if tokenizer is not None:
        candidates += [getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)]
    config = getattr(model, "config", None)
    candidates += [getattr(config, "bos_token_id", None), getattr(config, "eos_token_id", None)]
    for token in candidates:
        if isinstance(token, (list, tuple)):
            token = token[0] if token else None
        if token is not None:
            return int(token)
    raise ValueError("cannot sample from the model: neither its tokenizer nor its config names a BOS or EOS token")


def sample_sequences(
    model: torch.nn.Module,
    tokenizer: Any | None,
    n: int,
    seqlen: int,
    *,
    seed: int = 0,
    top_k: int = 50,
    temperature: float = 1.0,
    batch_size: int = 8,
    progress: bool = True,
) -> torch.LongTensor:
    """``n`` sequences of ``seqlen`` tokens sampled from ``model``, each starting with BOS.

    Top-k sampling at the given temperature, batched, never stopping early (end-of-sequence
    is suppressed until the full length). Seeded: the same seed, batch size and device give
    the same tokens; the global random state is left untouched. Returns a CPU LongTensor.
    """
    from transformers import GenerationConfig

    require_causal_lm(model, "sampling calibration text from the model (self:N)")
    if n < 1 or seqlen < 2:
        raise ValueError(f"need n >= 1 sequences of seqlen >= 2 tokens, got n={n}, seqlen={seqlen}")
    check_seqlen(model, seqlen)
    start = start_token_id(model, tokenizer)
    eos = getattr(model.config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = getattr(tokenizer, "eos_token_id", None)
    pad = eos[0] if isinstance(eos, (list, tuple)) else (eos if eos is not None else start)
    generation = GenerationConfig(
        do_sample=True,
        top_k=top_k,
        top_p=1.0,
        temperature=temperature,
        num_beams=1,
        repetition_penalty=1.0,
        max_new_tokens=seqlen - 1,
        min_new_tokens=seqlen - 1,
        bos_token_id=start,
        eos_token_id=eos,
        pad_token_id=pad,
        use_cache=True,
    )
    device = next(model.parameters()).device
    devices = [device] if device.type == "cuda" else []
    rows: list[torch.Tensor] = []
    logger.info("sampling %d sequences of %d tokens from the model (seed %d)", n, seqlen, seed)
    with torch.random.fork_rng(devices=devices), torch.inference_mode(), eval_mode(model):
        torch.manual_seed(seed)
        for first in tqdm(range(0, n, batch_size), desc="sampling", unit="batch", disable=not progress):
            count = min(batch_size, n - first)
            prompt = torch.full((count, 1), start, dtype=torch.long, device=device)
            attention = torch.ones_like(prompt)
            out = model.generate(input_ids=prompt, attention_mask=attention, generation_config=generation)
            rows.append(out[:, :seqlen].cpu())
    tokens = torch.cat(rows)
    if tokens.shape[1] != seqlen:
        raise RuntimeError(f"generation stopped at {tokens.shape[1]} tokens instead of {seqlen}")
    return tokens
