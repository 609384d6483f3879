"""Second moments of the target layers' inputs, ``H = E[x xᵀ]``, for the activation-aware error.

For a target weight ``W`` (``(out, in)``) and an error ``ΔW``, the activation-aware error is

    error_act = tr(ΔW H ΔWᵀ) = ‖X ΔWᵀ‖²_F / N

where ``X`` (``N x in``) stacks the layer's inputs over all ``N`` calibration tokens: the mean
squared change of the layer's output per token. :func:`estimate_input_moments` gets every
``H`` in one forward pass with hooks; targets that read the same input tensor (q/k/v, gate/up)
share one ``H``. Inputs wider than ``full_max`` keep only the diagonal of ``H`` (memory
``in²`` floats per distinct input otherwise).

:func:`calibration_moments` caches the estimate under ``cache_root()/act``, keyed like the
Fisher cache (model, its hash, calibration text, samples, seqlen, seed) plus ``full_max``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save
from tqdm.auto import tqdm

from bitalloc.atomic import atomic_write_bytes
from bitalloc.identity import cache_root
from bitalloc.models.calibration import Calibration, calibration_token_source
from bitalloc.models.causal import eval_mode

log = logging.getLogger(__name__)

#: Inputs up to this width keep the full ``H`` (4096 x 4096 float32 is 64 MiB), wider ones its
#: diagonal. The built-in model's widest input (1536) is well inside.
ACT_FULL_MAX = 4096
CACHE_FORMAT = "bitalloc-act"
CACHE_VERSION = 1


@dataclass(frozen=True)
class InputMoments:
    """``H = E[x xᵀ]`` per distinct target input: ``groups`` maps a group name (its first target)
    to a float32 ``(in, in)`` tensor, or ``(in,)`` holding the diagonal only; ``target_group``
    maps every target to its group; ``tokens`` is the token count N the mean is over."""

    groups: dict[str, torch.Tensor]
    target_group: dict[str, str]
    tokens: int
    full_max: int = ACT_FULL_MAX
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = sorted({g for g in self.target_group.values()} - set(self.groups))
        if missing:
            raise ValueError(f"input moments lack the groups {missing[:3]}")
        if self.tokens < 1:
            raise ValueError(f"input moments need at least one token, got {self.tokens}")

    def of(self, name: str) -> torch.Tensor:
        """``H`` (or its diagonal) of target ``name``."""
        try:
            return self.groups[self.target_group[name]]
        except KeyError:
            raise KeyError(f"no input moments for target {name!r}") from None


def act_error(delta: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(ΔW H ΔWᵀ)`` for ``delta`` ``(out, in)`` and ``H`` ``(in, in)`` or its diagonal ``(in,)``.

    The product ``ΔW H`` runs in float32 (float64 doubles the profile's cost on a CPU for a
    relative difference near 1e-7) and is summed in float64."""
    d = delta.float()
    h = H.to(device=d.device, dtype=torch.float32)
    if h.dim() == 1:
        return float((d.square() * h).sum(dtype=torch.float64))
    return float(((d @ h) * d).sum(dtype=torch.float64))


def _input_of(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for value in kwargs.values():
        if isinstance(value, torch.Tensor):
            return value
    raise ValueError("a target layer was called without a tensor input")


@torch.no_grad()
def estimate_input_moments(model: torch.nn.Module, tokens: torch.Tensor, targets: Sequence[tuple[str, torch.nn.Module]],
                           *, full_max: int = ACT_FULL_MAX, batch_size: int = 4,
                           device: str | torch.device | None = None, progress: bool = True) -> InputMoments:
    """``E[x xᵀ]`` of every target's input over all positions of ``tokens`` (``LongTensor[n, seqlen]``).

    One forward pass per ``batch_size`` sequences; sums are kept in float64. Targets fed the
    very same tensor share one group. ``device`` None runs where the model is.
    """
    if tokens.dim() != 2 or tokens.numel() == 0:
        raise ValueError(f"tokens must be a non-empty LongTensor[n, seqlen], got shape {tuple(tokens.shape)}")
    if full_max < 0:
        raise ValueError(f"full_max must be >= 0, got {full_max}")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    names = [n for n, _ in targets]
    sums: dict[str, torch.Tensor] = {}
    target_group: dict[str, str] = {}
    # one batch's input tensors -> (group, the tensor): holding it keeps its memory from being
    # reused by a later input of the same shape, which would then pass for the same tensor
    seen: dict[tuple[int, tuple[int, ...]], tuple[str, torch.Tensor]] = {}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = _input_of(args, kwargs)
            key = (x.data_ptr(), tuple(x.shape))
            hit = seen.get(key)
            if hit is None:
                group = target_group.setdefault(name, name)
                seen[key] = (group, x)
                x2 = x.reshape(-1, x.shape[-1]).double()
                part = x2.square().sum(0) if x2.shape[1] > full_max else x2.T @ x2
                if group in sums:
                    sums[group] += part
                else:
                    sums[group] = part
            else:
                target_group.setdefault(name, hit[0])

        return hook

    moved = next(model.parameters()).device
    if moved != dev:
        model.to(dev)
    handles = [m.register_forward_pre_hook(hook_for(n), with_kwargs=True) for n, m in targets]
    count = 0
    started = time.perf_counter()
    try:
        with eval_mode(model), tqdm(total=tokens.shape[0], desc="input moments", unit="seq",
                                    disable=not progress) as bar:
            for start in range(0, tokens.shape[0], batch_size):
                ids = tokens[start:start + batch_size].to(dev)
                seen.clear()
                model(input_ids=ids, use_cache=False)
                count += ids.numel()
                bar.update(ids.shape[0])
    finally:
        for h in handles:
            h.remove()
        if moved != dev:
            model.to(moved)
    absent = [n for n in names if n not in target_group]
    if absent:
        raise ValueError(f"target {absent[0]} was not called in the forward pass; no input moments for it")
    groups = {g: (s / count).float().cpu() for g, s in sums.items()}
    log.info("input moments of %d targets (%d distinct inputs) over %d tokens in %.1f s", len(names), len(groups),
             count, time.perf_counter() - started)
    return InputMoments(groups=groups, target_group=target_group, tokens=count, full_max=full_max)


def act_cache_key(calibration: Calibration, *, model_id: str, model_hash: str, seed: int,
                  full_max: int = ACT_FULL_MAX) -> str:
    """16 hex digits naming the input moments of a model on a calibration text (the Fisher key's
    fields without the Fisher mode, plus ``full_max``)."""
    fields = calibration.key_fields(model_id=model_id, model_hash=model_hash, seed=seed)
    fields.pop("mode", None)
    payload = json.dumps({"format": CACHE_FORMAT, "version": CACHE_VERSION, "full_max": full_max, **fields},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def act_cache_path(key: str) -> Path:
    """Where the input moments with this key are cached."""
    return cache_root() / "act" / f"act-{key}.safetensors"


def save_moments(moments: InputMoments, path: str | Path, key: str) -> None:
    """Write input moments atomically as safetensors (float32), the target map in its metadata."""
    meta = {"format": CACHE_FORMAT, "version": str(CACHE_VERSION), "key": key, "tokens": str(moments.tokens),
            "full_max": str(moments.full_max), "target_group": json.dumps(moments.target_group)}
    data = save({g: t.contiguous() for g, t in moments.groups.items()}, metadata=meta)
    atomic_write_bytes(Path(path), data)


def load_moments(path: str | Path, key: str) -> InputMoments:
    """Read :func:`save_moments`' file; ValueError when it is for another key or malformed."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
            raise ValueError(f"{path} holds input moments for other inputs")
    groups = load(Path(path).read_bytes())
    return InputMoments(groups=dict(groups), target_group=json.loads(meta["target_group"]), tokens=int(meta["tokens"]),
                        full_max=int(meta["full_max"]))


def calibration_moments(model: torch.nn.Module, tokenizer: Any, targets: Sequence[tuple[str, torch.nn.Module]],
                        calibration: Calibration, *, model_id: str, model_hash: str, seed: int,
                        device: str | torch.device | None, full_max: int = ACT_FULL_MAX, progress: bool = True,
                        tokens: Callable[[], torch.Tensor] | None = None) -> InputMoments:
    """The input moments of ``targets`` on ``calibration``'s text, from the cache when there.

    ``tokens`` gives the calibration tokens (default: drawn as the Fisher estimate draws them);
    it is called only on a cache miss. A cache entry that cannot be read is recomputed with a
    warning; one that cannot be written is a warning.
    """
    key = act_cache_key(calibration, model_id=model_id, model_hash=model_hash, seed=seed, full_max=full_max)
    path = act_cache_path(key)
    names = [n for n, _ in targets]
    if path.exists():
        try:
            moments = load_moments(path, key)
            if all(n in moments.target_group for n in names):
                log.info("input moments from cache %s", path)
                return moments
            log.warning("the input moments cache %s lacks some targets; recomputing", path.name)
        except Exception as exc:  # safetensors raises its own error types for malformed files
            log.warning("ignoring the input moments cache entry %s and recomputing: %s", path.name, exc)
    tokens_fn = tokens or calibration_token_source(calibration, model, tokenizer, seed=seed, progress=progress)
    moments = estimate_input_moments(model, tokens_fn(), targets, full_max=full_max, device=device,
                                     batch_size=calibration.batch_size or 4, progress=progress)
    try:
        save_moments(moments, path, key)
    except OSError as exc:
        log.warning("could not write the input moments cache %s: %s", path, exc)
    return moments
