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
from typing import Any

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
    require_causal_lm(model, "perplexity")
    windows = _check_windows(windows)
    check_seqlen(model, windows.shape[1])
    run_on = _place(model, device)
    total_nll = 0.0
    tokens = 0
    with eval_mode(model):
        for batch in _batches(windows, batch_size, "perplexity", progress):
            ids = batch.to(run_on)
            total_nll += _nll_sum(_logits(model, ids), ids)
            tokens += ids.shape[0] * (ids.shape[1] - 1)
    return _perplexity_result(total_nll, tokens, windows)


@torch.inference_mode()
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


@torch.inference_mode()
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
    require_causal_lm(model, "KL divergence")
    require_causal_lm(reference_model, "KL divergence")
    windows = _check_windows(windows)
    check_seqlen(model, windows.shape[1])
    run_on = _place(model, device)
    ref_device = next(reference_model.parameters()).device
    total_nll = total_kl = 0.0
    tokens = positions = 0
    with eval_mode(model, reference_model):
        for batch in _batches(windows, batch_size, desc, progress):
            ids = batch.to(run_on)
            logits = _logits(model, ids)
            ref_logits = _logits(reference_model, batch.to(ref_device)).to(run_on)
            if logits.shape != ref_logits.shape:
                raise ValueError(
                    f"model and reference disagree on output shape: {tuple(logits.shape)} vs {tuple(ref_logits.shape)}"
                )
            total_nll += _nll_sum(logits, ids)
            total_kl += _kl_sum(logits, ref_logits)
            tokens += ids.shape[0] * (ids.shape[1] - 1)
            positions += logits.shape[0] * logits.shape[1]
    return {**_perplexity_result(total_nll, tokens, windows), "kl": total_kl / positions}


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
    started = time.perf_counter()
    if not isinstance(kl_to, (torch.nn.Module, type(None))):
        kl_to, _ = load_model(kl_to, device=next(model.parameters()).device)
    if isinstance(data, torch.Tensor):
        ids = _check_windows(data)[: windows or None]
        data_name = "tensor"
    elif is_self_source(data):
        sampler = next(m for m in (text_model, kl_to, model) if m is not None)
        ids = _self_ids(data, windows, seqlen, sampler, tokenizer, progress)
        data_name = os.fspath(data)
    else:
        ids = token_windows(tokenizer, load_text(data), seqlen, windows)
        data_name = os.fspath(data)
    if kl_to is None:
        result = perplexity(model, ids, batch_size=batch_size, device=device, progress=progress)
        result["kl"] = None
    else:
        result = perplexity_and_kl(model, kl_to, ids, batch_size=batch_size, device=device, progress=progress)
    result.update(seconds=time.perf_counter() - started, data=data_name)
    logger.info(
        "perplexity %.3f on %d windows of %d tokens (%s)",
        result["perplexity"],
        result["windows"],
        result["seqlen"],
        data_name,
    )
    return result


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
