"""Evaluation windows sampled from a model itself (``--data self:N``), cached on disk.

Without any text (no WikiText-2, no hub), ``bitalloc eval --data self:N`` evaluates on N
sequences sampled from the *original* model: for an applied directory that is the model it
was made from, so every quantized variant is scored on the same tokens. The windows are
cached under ``$BITALLOC_CACHE/text`` keyed by the sampling model's fingerprint, N, seqlen,
seed and the sampler's version and sizes.

Evaluation windows never repeat calibration ones (``--calib self:N``, sampled with the same
``seed``): they are drawn from the seed stream ``seed + EVALUATION_SEED_OFFSET``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import torch

from bitalloc.atomic import atomic_write_bytes
from bitalloc.identity import cache_root, model_fingerprint
from bitalloc.models.sampling import DOCUMENT_TOKENS, SAMPLER_VERSION, SAMPLING_BATCH, sample_sequences

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2
#: Evaluation text is sampled from seed ``seed + EVALUATION_SEED_OFFSET``, calibration text from
#: ``seed``: the two are independent draws, so no evaluation window repeats a calibration one.
EVALUATION_SEED_OFFSET = 1_000_003


def _cache_file(model_hash: str, n: int, seqlen: int, seed: int) -> Path:
    payload = json.dumps({"format": CACHE_FORMAT, "model_hash": model_hash, "n": n, "seqlen": seqlen,
                          "seed": seed, "sampler": SAMPLER_VERSION, "document_tokens": DOCUMENT_TOKENS,
                          "batch_size": SAMPLING_BATCH}, sort_keys=True)
    key = hashlib.sha256(payload.encode()).hexdigest()[:16]
    return cache_root() / "text" / f"self-{key}.pt"


def self_windows(
    model: torch.nn.Module, tokenizer: Any, n: int, seqlen: int, *, seed: int = 0, progress: bool = True
) -> torch.LongTensor:
    """``LongTensor[n, seqlen]`` sampled from ``model`` (see :func:`sample_sequences`) from the
    evaluation seed stream (``seed + EVALUATION_SEED_OFFSET``), cached.

    A cache entry that cannot be read or has the wrong shape is resampled with a warning; a
    cache that cannot be written gives a warning, not an error.
    """
    path = _cache_file(model_fingerprint(model), n, seqlen, seed)
    if path.is_file():
        try:
            ids = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(ids, torch.Tensor) and tuple(ids.shape) == (n, seqlen) and ids.dtype == torch.long:
                logger.info("self-sampled windows from cache %s", path)
                return ids
            raise ValueError(f"unexpected content {type(ids).__name__} {getattr(ids, 'shape', '')}")
        except Exception as exc:  # noqa: BLE001 - a damaged cache entry is resampled
            logger.warning("ignoring the cached windows %s and resampling: %s", path, exc)
    ids = sample_sequences(model, tokenizer, n, seqlen, seed=seed + EVALUATION_SEED_OFFSET, progress=progress)
    try:
        buf = io.BytesIO()
        torch.save(ids.contiguous(), buf)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())
    except OSError as exc:
        logger.warning("could not cache the sampled windows at %s: %s", path, exc)
    return ids

