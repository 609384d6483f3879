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


#: The sampler's version, part of every cache key of sampled text: text sampled another way is
#: never read back as this sampler's.
SAMPLER_VERSION = 2
#: Longest sampled document, in tokens. A window longer than this is filled with several documents
#: one after another, as a corpus holds many. Short documents keep the KV cache small: each
#: generation step reads the weights once per batch and the cache of its own document, so a batch
#: of short documents samples several times faster than a few long sequences.
DOCUMENT_TOKENS = 256
#: Documents sampled together (one ``generate`` call): the weights are read once per step for
#: this many tokens.
SAMPLING_BATCH = 32


def sample_sequences(
    model: torch.nn.Module,
    tokenizer: Any | None,
    n: int,
    seqlen: int,
    *,
    seed: int = 0,
    top_k: int = 50,
    temperature: float = 1.0,
    batch_size: int = SAMPLING_BATCH,
    document_tokens: int = DOCUMENT_TOKENS,
    progress: bool = True,
) -> torch.LongTensor:
    """``n`` windows of ``seqlen`` tokens sampled from ``model``: documents of at most
    ``document_tokens`` tokens, each starting with BOS, laid end to end.

    Top-k sampling at the given temperature with a KV cache, ``batch_size`` documents at a
    time, never stopping early (end-of-sequence is suppressed until the full length). Seeded:
    the same seed, sizes and device give the same tokens; the global random state is left
    untouched. Progress is shown in tokens, with rate and ETA. Returns a CPU LongTensor.
    """
    from transformers import GenerationConfig

    require_causal_lm(model, "sampling calibration text from the model (self:N)")
    if n < 1 or seqlen < 2:
        raise ValueError(f"need n >= 1 sequences of seqlen >= 2 tokens, got n={n}, seqlen={seqlen}")
    if batch_size < 1 or document_tokens < 2:
        raise ValueError(f"need batch_size >= 1 and document_tokens >= 2, got {batch_size}, {document_tokens}")
    doc_len = min(seqlen, document_tokens)
    check_seqlen(model, doc_len)
    n_docs = -(-n * seqlen // doc_len)
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
        max_new_tokens=doc_len - 1,
        min_new_tokens=doc_len - 1,
        bos_token_id=start,
        eos_token_id=eos,
        pad_token_id=pad,
        use_cache=True,
    )
    device = next(model.parameters()).device
    devices = [device] if device.type == "cuda" else []
    rows: list[torch.Tensor] = []
    logger.info("sampling %d windows of %d tokens from the model: %d documents of %d tokens, %d at a time (seed %d)",
                n, seqlen, n_docs, doc_len, batch_size, seed)
    with torch.random.fork_rng(devices=devices), torch.inference_mode(), eval_mode(model), \
            tqdm(total=n_docs * doc_len, desc="sampling", unit="token", unit_scale=True, disable=not progress) as bar:
        torch.manual_seed(seed)
        for first in range(0, n_docs, batch_size):
            count = min(batch_size, n_docs - first)
            prompt = torch.full((count, 1), start, dtype=torch.long, device=device)
            attention = torch.ones_like(prompt)
            out = model.generate(input_ids=prompt, attention_mask=attention, generation_config=generation)
            if out.shape[1] < doc_len:
                raise RuntimeError(f"generation stopped at {out.shape[1]} tokens instead of {doc_len}")
            rows.append(out[:, :doc_len].cpu())
            bar.update(count * doc_len)
    return torch.cat(rows).reshape(-1)[: n * seqlen].reshape(n, seqlen).long()
