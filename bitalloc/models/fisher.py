"""Empirical diagonal Fisher information of the target weights, and its on-disk cache.

For a target weight ``W`` (in its ``(out, in)`` orientation, see
:func:`bitalloc.models.targets.target_weight`) the estimate is

    F[W] = Σ_i (∂L_i / ∂W)²        (elementwise, summed over the n calibration sequences)

where ``L_i`` is the language-model loss of sequence ``i`` as Hugging Face computes it with
``labels = input_ids`` (the mean next-token negative log-likelihood over its ``seqlen - 1``
predicted tokens). This is LQ-LoRA's empirical Fisher: a sum, not a mean, so estimates from
different sample counts differ by that factor (a common scale does not change an allocation).

Modes (all compute gradients for the target weights only: every other parameter has
``requires_grad`` switched off for the duration, so no gradient is ever materialized for
embeddings, norms or the LM head; the flags, any existing ``.grad`` and the train/eval mode are
restored afterwards; the model runs in eval mode, without dropout):

``exact``
    One sequence per forward/backward pass, as LQ-LoRA does. Each weight gradient is squared
    into a float32 accumulator by a post-accumulate-grad hook the moment autograd produces it,
    and then freed, so the memory overhead is one float32 copy of the targets.
``persample``
    ``batch_size`` sequences per pass, still exact: hooks keep each target's input activations
    ``x_i`` and catch the gradient ``δ_i`` of its output, so the per-sequence weight gradient
    ``g_i = δ_iᵀ x_i`` is formed with one batched matmul and squared before it is summed over
    the batch. Autograd computes no weight gradient at all (only activation gradients), so a
    pass costs about what ``exact`` passes over as many tokens cost (measured on CPU), in
    fewer, larger matrix products (the gain on a GPU); the result equals ``exact`` up to float
    rounding. Needs every target's input to have the batch as its first dimension (true of
    Hugging Face decoders); for models that flatten it (some mixture-of-experts layers) it
    falls back to ``exact`` with a warning. A weight
    used several times per pass (by one target or by targets sharing it) is handled exactly;
    one shared with a non-target module (an output layer tied to the input embedding) gets only
    its targets' share of the gradient here, and the whole parameter's gradient in ``exact``.
``batched``
    A cheaper-to-implement *biased* estimate: ``batch_size`` sequences per pass, the squared
    gradient of their summed loss, ``(Σ_b g_i)²``, accumulated over batches. Because
    ``(Σ g)² = Σ g² + Σ_{i≠j} g_i g_j``, its expectation over independent sequences is
    ``B·E[g²] + B(B-1)·E[g]²`` per batch of ``B``, not ``B·E[g²]``: it is unbiased only where
    the expected gradient is zero (a model at a stationary point of the calibration loss), and
    it overweights the mean gradient ``E[g]²`` by a factor ``B`` otherwise. With ``B = 1`` it
    is ``exact``. It is also noisier, since it averages ``n / B`` squared terms instead of ``n``.
    On CPU it is about 30 % cheaper per token than the exact modes (no per-sequence squares);
    on the built-in model it overstates the mean Fisher by a median factor 1.4 at ``B = 4``
    (``reports/fisher/``). Prefer ``persample``.

NaN or inf: the accumulators (which stay non-finite once any squared gradient was) are checked
every few passes and at the end, and the loss after every pass; either raises ValueError naming
the targets affected and the range of calibration sequences.

Default settings (:func:`default_fisher_settings`) were measured on the built-in model, see
``bench/fisher_estimates.py`` and ``reports/fisher/``.

The cache of estimates is :mod:`bitalloc.models.fisher_cache`.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from bitalloc.models.targets import find_targets, target_weight

logger = logging.getLogger(__name__)

FISHER_MODES = ("exact", "persample", "batched")
_PERSAMPLE_CHUNK_BYTES = 256 * 2**20  # per-sample gradients formed at most this many bytes at a time
_CHECK_EVERY = 8  # passes between checks of the accumulators for NaN/inf (and after the last one)

Targets = Sequence[tuple[str, torch.nn.Module]]


class _PerSampleUnsupported(ValueError):
    """A model the persample mode cannot handle (a target's input does not lead with the batch)."""



# --------------------------------------------------------------------------- defaults


def default_fisher_settings(device: str | torch.device | None = None) -> dict[str, Any]:
    """Default ``samples``, ``seqlen``, ``mode`` and ``batch_size`` for a Fisher pass on ``device``.

    CUDA: LQ-LoRA's 128 sequences of 512 tokens, ``persample`` (exact) in batches of 8.
    CPU: 16 sequences of 256 tokens, ``persample`` in batches of 4: about 9 s per sequence on
    the built-in 135M model on two (shared) cores, so 2.5-3 minutes in all. Its per-target mean
    Fisher ranks the 210 targets like a 4x larger estimate (Spearman 0.998; two disjoint
    16-sequence estimates agree to 0.994), see ``reports/fisher/``.
    """
    kind = torch.device(device).type if device is not None else "cpu"
    if kind == "cuda":
        return {"samples": 128, "seqlen": 512, "mode": "persample", "batch_size": 8}
    return {"samples": 16, "seqlen": 256, "mode": "persample", "batch_size": 4}


# --------------------------------------------------------------------------- estimation helpers


def _check_tokens(tokens: torch.Tensor) -> torch.LongTensor:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a LongTensor[n, seqlen], got {type(tokens).__name__}")
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be 2-D [n_sequences, seqlen], got shape {tuple(tokens.shape)}")
    if tokens.shape[0] == 0 or tokens.numel() == 0:
        raise ValueError(
            f"no calibration tokens (shape {tuple(tokens.shape)}): the Fisher estimate needs at least one sequence"
        )
    if tokens.shape[1] < 2:
        raise ValueError(
            f"calibration sequences need at least 2 tokens to have a next-token loss, got {tokens.shape[1]}"
        )
    if tokens.is_floating_point() or tokens.is_complex():
        raise ValueError("tokens must hold integer token ids")
    return tokens.long()


def resolve_mode(mode: str, batch_size: int | None) -> tuple[str, int]:
    """``(mode, sequences per pass)``: ``mode`` checked, ``batch_size`` 1 in exact mode, else default 4."""
    if mode not in FISHER_MODES:
        raise ValueError(f"unknown Fisher mode {mode!r}; use one of {', '.join(FISHER_MODES)}")
    if mode == "exact":
        if batch_size not in (None, 1):
            logger.info("exact mode runs one sequence per pass; batch_size=%s ignored", batch_size)
        return mode, 1
    size = 4 if batch_size is None else int(batch_size)
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return mode, size


def _lm_loss(model: torch.nn.Module, ids: torch.Tensor, accepts_use_cache: bool) -> torch.Tensor:
    """Σ over the batch of each sequence's mean token loss (HF's batch mean times the batch size)."""
    kwargs: dict[str, Any] = {"input_ids": ids, "labels": ids}
    if accepts_use_cache:
        kwargs["use_cache"] = False
    out = model(**kwargs)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise ValueError(
            f"{type(model).__name__} returned no loss for labels=input_ids; the Fisher estimate needs a "
            "model with a language-model head"
        )
    # Every sequence has seqlen-1 labels, so HF's mean over all tokens is the mean of the
    # per-sequence means; times B it is the sum of per-sequence losses.
    return loss * ids.shape[0]


def _accepts_use_cache(model: torch.nn.Module) -> bool:
    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@contextmanager
def _grad_state(model: torch.nn.Module, trainable: set[int]) -> Iterator[None]:
    """Only parameters whose id is in ``trainable`` require grad; eval mode; all restored on exit.

    Existing ``.grad`` tensors are set aside (so the estimate neither reads nor adds to them)
    and put back afterwards.
    """
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    was_training = model.training
    try:
        for p in params:
            p.grad = None
            p.requires_grad_(id(p) in trainable)
        model.eval()
        yield
    finally:
        for p, flag, grad in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)


@contextmanager
def _on_device(model: torch.nn.Module, device: str | torch.device | None) -> Iterator[torch.device]:
    """Run on ``device`` (moving the model there and back if needed), else the model's own device."""
    current = next(model.parameters()).device
    if device is None:
        yield current
        return
    target = torch.device(device)
    if target.type == current.type and (target.index is None or target.index == current.index):
        yield current
        return
    logger.info("moving %s from %s to %s for the Fisher pass", type(model).__name__, current, target)
    model.to(target)
    try:
        yield target
    finally:
        model.to(current)


def _check_finite(names: Sequence[str], accs: Sequence[torch.Tensor], first: int, end: int, loss: float) -> None:
    """Raise ValueError naming the targets whose accumulated squared gradient is NaN or inf.

    An accumulator of squares stays non-finite once any gradient added to it was, so checking
    the accumulators after some passes covers every gradient of those passes (a per-gradient
    check costs more than the accumulation itself on CPU).
    """
    flags = torch.stack([torch.isfinite(acc).all() for acc in accs]).cpu()
    if bool(flags.all()) and math.isfinite(loss):
        return
    bad = [names[i] for i in torch.nonzero(~flags).flatten().tolist()]
    where = f"in calibration sequences {first}..{end - 1}"
    if not bad:
        raise ValueError(f"non-finite loss ({loss}) {where}; check the model's weights and the tokens")
    shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    raise ValueError(
        f"non-finite (NaN or inf) Fisher gradient for target {bad[0]} {where} (targets affected: {shown}; "
        f"last loss {loss}); check the model's weights and the tokens, or run in float32"
    )


class _GradSquareHooks:
    """Post-accumulate-grad hooks: square each target weight's ``.grad`` into float32, then free it."""

    def __init__(self, weights: Sequence[torch.nn.Parameter], accs: Sequence[torch.Tensor]):
        self.handles = [w.register_post_accumulate_grad_hook(self._hook(acc)) for w, acc in zip(weights, accs)]

    @staticmethod
    def _hook(acc: torch.Tensor) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            grad = param.grad.float()
            acc.addcmul_(grad, grad)
            param.grad = None

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _PerSampleHooks:
    """Forward hooks keeping each target's input, output-gradient hooks forming per-sequence gradients.

    The per-sequence gradient of a Linear/Conv1D weight (in ``(out, in)`` orientation) is
    ``δᵀ x`` over that sequence's positions; it is squared and summed into a float32
    accumulator. State is kept per weight ("slot"): a weight used several times in one forward
    pass (a target called twice, or targets sharing a weight) has its per-sequence gradients
    summed over the uses before squaring (in :meth:`flush`).
    """

    def __init__(
        self,
        modules: Sequence[torch.nn.Module],
        slots: Sequence[int],
        accs: Sequence[torch.Tensor],
        names: Sequence[str],
    ):
        self.slots, self.accs, self.names = list(slots), accs, names
        self.batch = 0
        self.calls = [0] * len(accs)
        self.pending: dict[int, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._forward_hook(i)) for i, m in enumerate(modules)]

    def start(self, batch: int) -> None:
        self.batch = batch
        self.calls = [0] * len(self.calls)
        self.pending.clear()

    def _forward_hook(self, index: int) -> Callable[..., torch.Tensor | None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            if not torch.is_grad_enabled():
                return None
            if not args or not isinstance(args[0], torch.Tensor):
                raise _PerSampleUnsupported(
                    f"persample Fisher: target {self.names[index]} was not called with its input as first argument"
                )
            x = args[0].detach()
            if x.dim() < 2 or x.shape[0] != self.batch or output.shape[0] != self.batch:
                raise _PerSampleUnsupported(
                    f"persample Fisher: target {self.names[index]} sees inputs of shape {tuple(x.shape)}, whose "
                    f"first dimension is not the batch ({self.batch})"
                )
            slot = self.slots[index]
            self.calls[slot] += 1
            replaced = not output.requires_grad
            if replaced:  # nothing upstream needs a gradient: make the output a leaf to catch δ
                output = output.detach().requires_grad_(True)
            output.register_hook(lambda grad: self._grad_hook(slot, x, grad))
            return output if replaced else None

        return hook

    def _grad_hook(self, slot: int, x: torch.Tensor, grad: torch.Tensor) -> None:
        batch = self.batch
        xs = x.reshape(batch, -1, x.shape[-1])
        gs = grad.reshape(batch, -1, grad.shape[-1])
        acc = self.accs[slot]
        chunk = max(1, _PERSAMPLE_CHUNK_BYTES // (4 * acc.numel()))
        several = self.calls[slot] > 1
        for start in range(0, batch, chunk):
            g = gs[start : start + chunk].float().transpose(1, 2)
            per_sample = torch.bmm(g, xs[start : start + chunk].float())  # [b, out, in]
            if several:
                pending = self.pending.setdefault(slot, torch.zeros((batch, *acc.shape), device=acc.device))
                pending[start : start + chunk] += per_sample
            else:
                acc.add_(per_sample.square_().sum(0))

    def flush(self) -> None:
        """Square and add the per-sequence gradients of weights used more than once in the pass."""
        for slot, per_sample in self.pending.items():
            self.accs[slot].add_(per_sample.square_().sum(0))
        self.pending.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# --------------------------------------------------------------------------- estimation


def estimate_fisher(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    targets: Targets | None = None,
    *,
    mode: str = "exact",
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher ``Σ_i (∂L_i/∂W)²`` of each target weight over the sequences in ``tokens``.

    ``tokens`` is a ``LongTensor[n, seqlen]``; ``L_i`` is sequence ``i``'s mean token loss with
    ``labels = input_ids``. ``targets`` defaults to :func:`find_targets` of the model. ``mode``
    is ``"exact"`` (one sequence per pass), ``"persample"`` (exact, ``batch_size`` sequences
    per pass) or ``"batched"`` (biased squared batch gradient; see the module doc).
    ``batch_size`` defaults to 4 (ignored in exact mode). ``device`` None runs where the model
    is; another device moves the model there and back.

    ``persample`` falls back to ``exact`` (with a warning) for a model whose targets do not
    see the batch as their inputs' first dimension.

    Returns ``{name: float32 CPU tensor of shape (out, in)}`` (Conv1D weights transposed).
    Raises ValueError for empty or malformed tokens, and for a NaN/inf gradient, naming the target.
    """
    tokens = _check_tokens(tokens)
    mode, batch = resolve_mode(mode, batch_size)
    if targets is None:
        targets = find_targets(model)
    if not targets:
        raise ValueError("no targets to estimate the Fisher information of")
    names = [name for name, _ in targets]
    if len(set(names)) != len(names):
        raise ValueError("target names must be unique")
    model_params = {id(p) for p in model.parameters()}
    for name, module in targets:
        if id(module.weight) not in model_params:
            raise ValueError(f"target {name} is not a parameter of this model")
    if mode == "persample":
        try:
            return _estimate(model, tokens, targets, mode, batch, device, progress)
        except _PerSampleUnsupported as err:
            logger.warning("%s; falling back to exact mode (one sequence per pass)", err)
            mode, batch = "exact", 1
    return _estimate(model, tokens, targets, mode, batch, device, progress)


def _estimate(
    model: torch.nn.Module,
    tokens: torch.LongTensor,
    targets: Targets,
    mode: str,
    batch: int,
    device: str | torch.device | None,
    progress: bool,
) -> dict[str, torch.Tensor]:
    """The estimation loop of :func:`estimate_fisher`, on checked arguments."""
    names = [name for name, _ in targets]
    modules = [module for _, module in targets]
    n = tokens.shape[0]
    started = time.perf_counter()
    with _on_device(model, device) as dev:
        # One float32 accumulator per distinct weight, in (out, in); tied targets share one.
        accs_by_weight: dict[int, torch.Tensor] = {}
        for module in modules:
            if id(module.weight) not in accs_by_weight:
                accs_by_weight[id(module.weight)] = torch.zeros(
                    tuple(target_weight(module).shape), dtype=torch.float32, device=module.weight.device
                )
        accs = [accs_by_weight[id(m.weight)] for m in modules]
        persample = mode == "persample"
        first: dict[int, int] = {}  # weight id -> index of the first target holding it
        for index, module in enumerate(modules):
            first.setdefault(id(module.weight), index)
        slots = {key: k for k, key in enumerate(first)}
        slot_accs = [accs[i] for i in first.values()]
        slot_names = [names[i] for i in first.values()]
        accepts_use_cache = _accepts_use_cache(model)
        logger.info(
            "Fisher (%s): %d sequences x %d tokens, %d targets, batch %d, on %s",
            mode, n, tokens.shape[1], len(modules), batch, dev,
        )
        with _grad_state(model, set() if persample else set(first)), torch.enable_grad(), tqdm(
            total=n, desc=f"fisher ({mode})", unit="seq", disable=not progress
        ) as bar:
            hooks: _GradSquareHooks | _PerSampleHooks
            if persample:
                hooks = _PerSampleHooks(modules, [slots[id(m.weight)] for m in modules], slot_accs, names)
            else:
                # a hook sees the weight's own gradient: (in, out) for Conv1D, hence a transposed view
                native = [accs[i].t() if _is_conv1d(modules[i]) else accs[i] for i in first.values()]
                hooks = _GradSquareHooks([modules[i].weight for i in first.values()], native)
            try:
                checked = 0  # sequences [0, checked) are known to have finite gradients
                for index, start in enumerate(range(0, n, batch)):
                    ids = tokens[start : start + batch].to(dev)
                    if persample:
                        hooks.start(ids.shape[0])
                    loss = _lm_loss(model, ids, accepts_use_cache)
                    loss.backward()
                    if persample:
                        hooks.flush()
                    end = start + ids.shape[0]
                    value = float(loss.detach())
                    del loss
                    if not math.isfinite(value):  # this very pass went wrong
                        _check_finite(slot_names, slot_accs, start, end, value)
                    if (index + 1) % _CHECK_EVERY == 0 or end == n:
                        _check_finite(slot_names, slot_accs, checked, end, value)
                        checked = end
                    bar.update(ids.shape[0])
            finally:
                hooks.remove()
        # The accumulators themselves are returned (no second copy on CPU); tied targets get clones.
        result: dict[str, torch.Tensor] = {}
        handed_out: set[int] = set()
        for name, acc in zip(names, accs):
            on_cpu = acc.detach().to("cpu")
            result[name] = on_cpu.clone() if id(acc) in handed_out else on_cpu
            handed_out.add(id(acc))
    elapsed = time.perf_counter() - started
    logger.info("Fisher (%s) of %d targets in %.1f s (%.2f s per sequence)", mode, len(names), elapsed, elapsed / n)
    return result


def _is_conv1d(module: torch.nn.Module) -> bool:
    return isinstance(module, Conv1D)
