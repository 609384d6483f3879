"""Perplexity and KL divergence of a causal LM on token windows (GPTQ conventions).

Perplexity: each window is fed whole; tokens 1..seqlen-1 of each window are predicted from the
ones before (as ``labels=input_ids`` does in transformers); the mean negative log-likelihood over
all predicted tokens of all windows gives ``ppl = exp(mean)``. KL divergence: the mean over all
positions of all windows of ``KL(P_reference || P_model)`` of the next-token distributions. Both
are computed in float32, a few hundred positions at a time, so that a 49k vocabulary over long
windows never needs more than one window's logits at once.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bitalloc.models.causal import check_seqlen, eval_mode, require_causal_lm
from bitalloc.models.loading import load_model
from bitalloc.models.self_text import self_windows
from bitalloc.models.text import is_self_source, load_text, parse_self_source, token_windows

logger = logging.getLogger(__name__)

POSITION_CHUNK = 256


def _check_windows(windows: torch.Tensor) -> torch.LongTensor:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2:
        raise ValueError("windows must be a 2-D tensor of token ids [n_windows, seqlen]")
    if windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(f"need at least one window of at least 2 tokens, got shape {tuple(windows.shape)}")
    if windows.is_floating_point():
        raise ValueError("windows must hold integer token ids")
    return windows.long()


def _place(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    """The device to run on: ``device`` (moving the model there if needed), else the model's own."""
    current = next(model.parameters()).device
    if device is None:
        return current
    target = torch.device(device)
    if target != current and not (target.type == current.type and target.index is None):
        logger.info("moving %s from %s to %s", type(model).__name__, current, target)
        model.to(target)
        return target
    return current


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def _nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Sum over rows of the NLL of tokens 1.. given the logits of positions ..-1, in float32."""
    predicted = logits[:, :-1]
    labels = ids[:, 1:]
    total = 0.0
    for start in range(0, labels.shape[1], POSITION_CHUNK):
        chunk = predicted[:, start : start + POSITION_CHUNK].float()
        target = labels[:, start : start + POSITION_CHUNK]
        total += F.cross_entropy(chunk.reshape(-1, chunk.shape[-1]), target.reshape(-1), reduction="sum").item()
    return total


def _kl_sum(logits: torch.Tensor, ref_logits: torch.Tensor) -> float:
    """Sum over positions of KL(softmax(ref_logits) || softmax(logits)), in float32, chunk by chunk."""
    total = 0.0
    for start in range(0, logits.shape[1], POSITION_CHUNK):
        log_p = F.log_softmax(logits[:, start : start + POSITION_CHUNK].float(), dim=-1)
        log_q = F.log_softmax(ref_logits[:, start : start + POSITION_CHUNK].float(), dim=-1)
        total += F.kl_div(log_p, log_q, log_target=True, reduction="sum").item()
    return total


def _batches(windows: torch.Tensor, batch_size: int, desc: str, progress: bool):
    """Batches of ``batch_size`` windows, with a progress bar in tokens (rate and ETA)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    with tqdm(total=windows.numel(), desc=desc, unit="token", unit_scale=True, disable=not progress) as bar:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size]
            yield batch
            bar.update(batch.numel())


def _perplexity_result(total_nll: float, tokens: int, windows: torch.Tensor) -> dict[str, Any]:
    """:func:`perplexity`'s result from the summed NLL over ``tokens`` predicted tokens."""
    nll = total_nll / tokens
    return {
        "perplexity": math.exp(nll) if nll < 700 else math.inf,
        "nll": nll,
        "tokens": tokens,
        "windows": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
    }


@torch.inference_mode()
def score_models(
    models: Sequence[torch.nn.Module],
    windows: torch.Tensor,
    *,
    reference: torch.nn.Module | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str | None = None,
) -> list[dict[str, Any]]:
    """Perplexity of every model in ``models`` (and KL to ``reference``) from one pass over ``windows``.

    Each batch of windows runs through ``reference`` once and through each model once; a model
    that *is* the reference reuses its logits. One result per model, in order:
    :func:`perplexity`'s keys, ``kl`` (None without a reference; 0 for the reference itself)
    ``model_seconds`` (the time of that model's own forward passes and losses) and
    ``reference_seconds`` (the reference's forward passes, shared by all). All the
    models are held in memory together; the reference runs on its own device and its logits
    are brought to each model's.
    """
    if not models:
        raise ValueError("score_models needs at least one model")
    for model in [*models, *([reference] if reference is not None else [])]:
        require_causal_lm(model, "perplexity" if reference is None else "KL divergence")
    windows = _check_windows(windows)
    for model in models:
        check_seqlen(model, windows.shape[1])
    places = [_place(model, device) for model in models]
    ref_device = None if reference is None else next(reference.parameters()).device
    nll = [0.0] * len(models)
    kl = [0.0] * len(models)
    seconds = [0.0] * len(models)
    ref_seconds = 0.0
    tokens = positions = 0
    label = desc or ("perplexity" if reference is None else "perplexity and KL") + (
        f" ({len(models)} models)" if len(models) > 1 else "")
    with eval_mode(*models, *([reference] if reference is not None else [])):
        for batch in _batches(windows, batch_size, label, progress):
            started = time.perf_counter()
            ref_logits = None if reference is None else _logits(reference, batch.to(ref_device))
            ref_seconds += time.perf_counter() - started
            for i, (model, run_on) in enumerate(zip(models, places)):
                started = time.perf_counter()
                ids = batch.to(run_on)
                if model is reference:
                    nll[i] += _nll_sum(ref_logits.to(run_on), ids)
                else:
                    logits = _logits(model, ids)
                    nll[i] += _nll_sum(logits, ids)
                    if ref_logits is not None:
                        ref = ref_logits.to(run_on)
                        if logits.shape != ref.shape:
                            raise ValueError(f"model and reference disagree on output shape: "
                                             f"{tuple(logits.shape)} vs {tuple(ref.shape)}")
                        kl[i] += _kl_sum(logits, ref)
                seconds[i] += time.perf_counter() - started
            tokens += batch.shape[0] * (batch.shape[1] - 1)
            positions += batch.shape[0] * batch.shape[1]
    return [
        {**_perplexity_result(nll[i], tokens, windows),
         "kl": None if reference is None else kl[i] / positions,
         "model_seconds": seconds[i], "reference_seconds": ref_seconds}
        for i, model in enumerate(models)
    ]


def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of a causal LM on ``windows`` (``LongTensor[n, seqlen]``).

    Returns ``perplexity``, ``nll`` (mean token NLL, nats), ``tokens`` (predicted tokens:
    ``n * (seqlen - 1)``), ``windows`` and ``seqlen``. Raises ValueError for encoder models.
    """
    result = score_models([model], windows, batch_size=batch_size, device=device, progress=progress)[0]
    return {k: v for k, v in result.items() if k not in ("kl", "model_seconds", "reference_seconds")}


def kl_divergence(
    model: torch.nn.Module,
    reference_model: torch.nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> float:
    """Mean per-token ``KL(P_reference || P_model)`` (nats) over all positions of all windows.

    The reference model runs on its own device; its logits are brought to the model's.
    """
    return perplexity_and_kl(model, reference_model, windows, batch_size=batch_size, device=device,
                             progress=progress, desc="KL divergence")["kl"]


def perplexity_and_kl(
    model: torch.nn.Module,
    reference_model: torch.nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "perplexity and KL",
) -> dict[str, Any]:
    """:func:`perplexity`'s result plus ``kl`` (as :func:`kl_divergence`), from one forward pass
    of ``model`` per batch: the same logits give both."""
    result = score_models([model], windows, reference=reference_model, batch_size=batch_size, device=device,
                          progress=progress, desc=desc)[0]
    for key in ("model_seconds", "reference_seconds"):
        result.pop(key)
    return result


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    data: str | os.PathLike | torch.Tensor,
    seqlen: int,
    windows: int | None,
    kl_to: torch.nn.Module | str | None = None,
    *,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
    text_model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Perplexity (and KL to a reference) on the first ``windows`` windows of a text source.

    ``data`` is a text source (see :func:`bitalloc.models.text.load_text`), ``self:N`` (N
    windows sampled from ``text_model``, else the KL reference, else ``model``; cached, see
    :mod:`bitalloc.models.self_text`) or ready windows (``LongTensor[n, seqlen]``);
    ``windows`` None means all. ``kl_to`` is a reference model or
    a model specification for :func:`bitalloc.models.load_model`. Returns a dict with
    ``perplexity``, ``nll``, ``tokens``, ``windows``, ``seqlen``, ``kl`` (None without a
    reference), ``seconds`` (wall time of the whole call) and ``data``.
    """
    if not isinstance(kl_to, (torch.nn.Module, type(None))):
        kl_to, _ = load_model(kl_to, device=next(model.parameters()).device)
    result = evaluate_many([model], tokenizer, data, seqlen, windows, kl_to, batch_size=batch_size, device=device,
                           progress=progress, text_model=text_model)[0]
    for key in ("model_seconds", "reference_seconds"):
        result.pop(key)
    return result


def evaluate_many(
    models: Sequence[torch.nn.Module],
    tokenizer: Any,
    data: str | os.PathLike | torch.Tensor,
    seqlen: int,
    windows: int | None,
    reference: torch.nn.Module | None = None,
    *,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
    text_model: torch.nn.Module | None = None,
) -> list[dict[str, Any]]:
    """:func:`evaluate` of several models that share a tokenizer, in one pass over the text.

    The text is read (or sampled, for ``self:N``: from ``text_model``, else ``reference``, else
    the first model) once, and each window runs through ``reference`` once (see
    :func:`score_models`). One result per model, in order: :func:`evaluate`'s keys (``seconds``
    is the wall time of the whole call, shared by all) plus ``reference_seconds`` and
    ``model_seconds`` (see :func:`score_models`).
    """
    started = time.perf_counter()
    if not models:
        raise ValueError("evaluate_many needs at least one model")
    if isinstance(data, torch.Tensor):
        ids = _check_windows(data)[: windows or None]
        data_name = "tensor"
    elif is_self_source(data):
        sampler = next(m for m in (text_model, reference, models[0]) if m is not None)
        ids = _self_ids(data, windows, seqlen, sampler, tokenizer, progress)
        data_name = os.fspath(data)
    else:
        ids = token_windows(tokenizer, load_text(data), seqlen, windows)
        data_name = os.fspath(data)
    results = score_models(models, ids, reference=reference, batch_size=batch_size, device=device, progress=progress)
    seconds = time.perf_counter() - started
    for result in results:
        result.update(seconds=seconds, data=data_name)
        logger.info("perplexity %.3f on %d windows of %d tokens (%s)", result["perplexity"], result["windows"],
                    result["seqlen"], data_name)
    return results


def _self_ids(data: Any, windows: int | None, seqlen: int, sampler: torch.nn.Module, tokenizer: Any,
              progress: bool) -> torch.LongTensor:
    """The windows of a ``self:N`` source: N (else ``windows``) sequences sampled from ``sampler``."""
    _, count = parse_self_source(os.fspath(data).strip().lower())
    if count == 0:
        raise ValueError(f"{os.fspath(data)!r}: need at least one sampled window (self:N with N >= 1)")
    n = count or windows
    if not n:
        raise ValueError(f"{os.fspath(data)!r}: say how many windows to sample (self:N or --windows N)")
    if count and windows and windows < count:
        n = windows
    return self_windows(sampler, tokenizer, n, seqlen, progress=progress)
