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

Cache: :func:`load_or_estimate_fisher` stores an estimate as ``fisher-<key>.safetensors`` in
**bfloat16** plus a ``fisher-<key>.json`` sidecar (key fields, targets and shapes, the file's
SHA-256). bfloat16 has float32's exponent range, so Fisher values (squares of small gradients,
often below 1e-10, where float16 underflows: its smallest subnormal is 6e-8) keep their
magnitude, at a relative rounding error of at most 2⁻⁹ ≈ 0.2 %, far below the estimate's
sampling noise. Both files are written atomically (temporary file + ``os.replace``), the
sidecar last; a missing, truncated, corrupt or mismatching cache is recomputed with a warning.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bitalloc.atomic import atomic_write_bytes
from bitalloc.models.targets import find_targets, target_weight

logger = logging.getLogger(__name__)

FISHER_MODES = ("exact", "persample", "batched")
CACHE_FORMAT = 1
CACHE_DTYPE = torch.bfloat16
KEY_FIELDS = ("model_id", "model_hash", "data", "samples", "seqlen", "mode", "seed")
_PERSAMPLE_CHUNK_BYTES = 256 * 2**20  # per-sample gradients formed at most this many bytes at a time
_FINGERPRINT_VALUES = 4096
_CHECK_EVERY = 8  # passes between checks of the accumulators for NaN/inf (and after the last one)

Targets = Sequence[tuple[str, torch.nn.Module]]


class _PerSampleUnsupported(ValueError):
    """A model the persample mode cannot handle (a target's input does not lead with the batch)."""


class FisherCacheError(ValueError):
    """A Fisher cache file that cannot be used (missing, truncated, corrupt or for other inputs)."""


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


def _resolve_mode(mode: str, batch_size: int | None) -> tuple[str, int]:
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
    mode, batch = _resolve_mode(mode, batch_size)
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
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


# --------------------------------------------------------------------------- fingerprint and cache keys


def _config_dict(model: torch.nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}
    data = config.to_dict()
    dropped = ("transformers_version", "name_or_path")
    return {k: v for k, v in data.items() if not k.startswith("_") and k not in dropped}


def model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap, stable 16-hex-digit hash of a model: class, config, parameter names, shapes,
    dtypes, and a strided sample of at most 4096 values of every parameter.

    The same weights give the same fingerprint on any device; it does not read every value, so
    two models differing only off the sampled positions collide (good enough for cache keys).
    """
    digest = hashlib.sha256()
    digest.update(type(model).__name__.encode())
    digest.update(json.dumps(_config_dict(model), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, param in model.named_parameters():
            digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
            flat = param.detach().reshape(-1)
            step = max(1, flat.numel() // _FINGERPRINT_VALUES)
            sample = flat[::step][:_FINGERPRINT_VALUES].to("cpu", torch.float32).contiguous()
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def _key_fields(
    model_id: str,
    model_hash: str,
    data: str,
    samples: int,
    seqlen: int,
    mode: str,
    seed: int,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """The validated, canonical fields a cache key is made of (see :func:`fisher_cache_key`)."""
    if mode not in FISHER_MODES:
        raise ValueError(f"unknown Fisher mode {mode!r}; use one of {', '.join(FISHER_MODES)}")
    for field, value in (("samples", samples), ("seqlen", seqlen)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{field} must be a positive integer, got {value!r}")
    fields: dict[str, Any] = {
        "model_id": str(model_id),
        "model_hash": str(model_hash),
        "data": str(data),
        "samples": samples,
        "seqlen": seqlen,
        "mode": "batched" if mode == "batched" else "exact",  # persample computes the exact values
        "seed": int(seed),
    }
    if mode == "batched":
        fields["batch_size"] = _resolve_mode(mode, batch_size)[1]
    return fields


def fisher_cache_key(
    model_id: str,
    model_hash: str,
    data: str,
    samples: int,
    seqlen: int,
    mode: str,
    seed: int,
    *,
    batch_size: int | None = None,
) -> str:
    """A short (16 hex digits) stable hash of everything a Fisher estimate depends on.

    ``data`` names the calibration source (for a file, include its content hash in the string
    if it may change). ``exact`` and ``persample`` estimate the same values and share a key;
    ``batch_size`` changes the estimate only in ``batched`` mode, and is part of the key only there.
    """
    fields = _key_fields(model_id, model_hash, data, samples, seqlen, mode, seed, batch_size)
    payload = json.dumps({"format": CACHE_FORMAT, **fields}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- cache files


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_path(folder: Path, stem: str) -> Path:
    fd, name = tempfile.mkstemp(dir=folder, prefix=f".{stem}.", suffix=".tmp")
    os.close(fd)
    return Path(name)


def fisher_cache_paths(cache_dir: str | os.PathLike, key: str) -> tuple[Path, Path]:
    """``(tensors, sidecar)`` paths of the cache entry ``key`` in ``cache_dir``."""
    folder = Path(cache_dir)
    return folder / f"fisher-{key}.safetensors", folder / f"fisher-{key}.json"


def save_fisher(
    fisher: Mapping[str, torch.Tensor], path: str | os.PathLike, meta: Mapping[str, Any] | None = None
) -> Path:
    """Write a Fisher estimate as bfloat16 safetensors plus a JSON sidecar (``path`` with ``.json``).

    Both files are written to temporary files and moved into place with ``os.replace``, the
    sidecar (which holds the tensor file's SHA-256, the targets, their shapes and ``meta``) last.
    Returns the sidecar's path.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = path.with_suffix(".json")
    tensors = {name: value.detach().to("cpu", CACHE_DTYPE).contiguous() for name, value in fisher.items()}
    tmp = _temp_path(path.parent, path.stem)
    try:
        save_file(tensors, str(tmp), metadata={"format": "bitalloc-fisher", "version": str(CACHE_FORMAT)})
        _fsync(tmp)
        info = {
            "format": "bitalloc-fisher",
            "version": CACHE_FORMAT,
            "dtype": str(CACHE_DTYPE).removeprefix("torch."),
            "file": path.name,
            "sha256": _sha256_file(tmp),
            "targets": {name: list(t.shape) for name, t in tensors.items()},
            **dict(meta or {}),
        }
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_bytes(sidecar, (json.dumps(info, indent=2, sort_keys=True, default=str) + "\n").encode())
    return sidecar


def load_fisher(
    path: str | os.PathLike, names: Sequence[str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a Fisher estimate written by :func:`save_fisher`: ``({name: float32 tensor}, sidecar)``.

    ``names`` selects targets (all by default). Raises FisherCacheError when a file is missing,
    truncated or corrupt (SHA-256 mismatch), a target is absent or misshapen, or a value is
    not finite.
    """
    from safetensors import safe_open

    path = Path(path)
    sidecar = path.with_suffix(".json")
    try:
        info = json.loads(sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise FisherCacheError(f"no Fisher sidecar {sidecar}") from err
    except (OSError, ValueError) as err:
        raise FisherCacheError(f"unreadable Fisher sidecar {sidecar}: {err}") from err
    if not isinstance(info, dict) or info.get("format") != "bitalloc-fisher" or info.get("version") != CACHE_FORMAT:
        raise FisherCacheError(f"{sidecar} is not a bitalloc Fisher sidecar of format version {CACHE_FORMAT}")
    if not path.is_file():
        raise FisherCacheError(f"Fisher file {path} is missing")
    if _sha256_file(path) != info.get("sha256"):
        raise FisherCacheError(
            f"Fisher file {path} is truncated or corrupt (its SHA-256 does not match {sidecar.name})"
        )
    shapes = info.get("targets") or {}
    wanted = list(shapes) if names is None else list(names)
    missing = [n for n in wanted if n not in shapes]
    if missing:
        raise FisherCacheError(f"{path} lacks {len(missing)} requested target(s), e.g. {missing[0]}")
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in wanted:
                tensor = f.get_tensor(name)
                if list(tensor.shape) != list(shapes[name]):
                    raise FisherCacheError(
                        f"{path}: {name} has shape {tuple(tensor.shape)}, the sidecar says {shapes[name]}"
                    )
                out[name] = tensor.float()
    except FisherCacheError:
        raise
    except Exception as err:  # safetensors raises its own error types for malformed files
        raise FisherCacheError(f"cannot read Fisher file {path}: {err}") from err
    for name, tensor in out.items():
        if not bool(torch.isfinite(tensor).all()):
            raise FisherCacheError(f"{path}: {name} holds non-finite values")
    return out, info


def _round_trip(fisher: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The values as the cache stores them (bfloat16), back in float32."""
    return {name: value.to(CACHE_DTYPE).float() for name, value in fisher.items()}


def load_or_estimate_fisher(
    model: torch.nn.Module,
    tokens_fn: Callable[[], torch.Tensor],
    targets: Targets | None = None,
    *,
    cache_dir: str | os.PathLike | None,
    key_fields: Mapping[str, Any],
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """The Fisher estimate for ``key_fields``, from ``cache_dir`` when cached, else estimated and cached.

    ``key_fields`` holds the arguments of :func:`fisher_cache_key` (``model_id``,
    ``model_hash``, ``data``, ``samples``, ``seqlen``, ``mode``, ``seed``, optionally
    ``batch_size``); its ``mode`` (and ``batch_size``) drive the estimate. ``tokens_fn()``
    gives the calibration tokens and is called only on a cache miss. ``cache_dir`` None
    disables the cache. A cache entry that is truncated, corrupt, for other key fields or
    lacking a requested target is recomputed with a warning; a cache that cannot be written
    gives a warning, not an error.

    Returns ``{name: float32 (out, in) tensor}`` holding the values as stored (rounded to
    bfloat16), whether they came from the cache or were just computed.
    """
    fields = dict(key_fields)
    unknown = sorted(set(fields) - set(KEY_FIELDS) - {"batch_size"})
    absent = [f for f in KEY_FIELDS if f not in fields]
    if unknown or absent:
        raise ValueError(
            f"key_fields must hold {', '.join(KEY_FIELDS)} (and optionally batch_size); "
            f"missing: {absent or 'none'}, unknown: {unknown or 'none'}"
        )
    if batch_size is not None and "batch_size" not in fields:
        fields["batch_size"] = batch_size
    key = fisher_cache_key(**fields)
    stored_fields = _key_fields(**fields)
    if targets is None:
        targets = find_targets(model)
    names = [name for name, _ in targets]

    path = sidecar = None
    if cache_dir is not None:
        path, sidecar = fisher_cache_paths(cache_dir, key)
        if path.exists() or sidecar.exists():
            try:
                fisher, info = load_fisher(path, names)
                if info.get("key") != key or info.get("key_fields") != stored_fields:
                    raise FisherCacheError(f"{sidecar} was written for other inputs (key {info.get('key')!r})")
                expected = {n: list(target_weight(m).shape) for n, m in targets}
                if any(list(fisher[n].shape) != expected[n] for n in names):
                    raise FisherCacheError(f"{path} holds shapes that do not match this model's targets")
                logger.info("Fisher estimate from cache %s", path)
                return fisher
            except FisherCacheError as err:
                logger.warning("ignoring the Fisher cache entry %s and recomputing: %s", path.name, err)
        else:
            logger.info("no cached Fisher estimate for key %s in %s; estimating", key, cache_dir)

    tokens = tokens_fn()
    if tuple(tokens.shape) != (fields["samples"], fields["seqlen"]):
        logger.warning(
            "calibration tokens have shape %s, not (samples, seqlen) = (%d, %d) as the key says",
            tuple(tokens.shape), fields["samples"], fields["seqlen"],
        )
    started = time.perf_counter()
    fisher = estimate_fisher(
        model,
        tokens,
        targets,
        mode=fields["mode"],
        batch_size=fields.get("batch_size"),
        device=device,
        progress=progress,
    )
    elapsed = time.perf_counter() - started
    if path is not None:
        meta = {
            "key": key,
            "key_fields": stored_fields,
            "tokens_shape": list(tokens.shape),
            "elapsed_s": round(elapsed, 3),
            "torch": torch.__version__,
        }
        try:
            save_fisher(fisher, path, meta)
            logger.info("cached the Fisher estimate in %s", path)
        except OSError as err:
            logger.warning("could not write the Fisher cache %s: %s", path, err)
    return _round_trip(fisher)
