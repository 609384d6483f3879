"""The on-disk cache of Fisher estimates (see :mod:`bitalloc.models.fisher` for the estimate).

:func:`load_or_estimate_fisher` stores an estimate as ``fisher-<key>.safetensors`` in
**bfloat16** plus a ``fisher-<key>.json`` sidecar (key fields, targets and shapes, the file's
SHA-256). bfloat16 has float32's exponent range, so Fisher values (squares of small gradients,
often below 1e-10, where float16 underflows: its smallest subnormal is 6e-8) keep their
magnitude, at a relative rounding error of at most 2⁻⁹ ≈ 0.2 %, far below the estimate's
sampling noise. Both files are written atomically (temporary file + ``os.replace``), the
sidecar last; a missing, truncated, corrupt or mismatching cache is recomputed with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bitalloc.atomic import atomic_write_bytes, current_umask
from bitalloc.errors import IntegrityError
from bitalloc.models.fisher import FISHER_MODES, Targets, estimate_fisher, resolve_mode
from bitalloc.models.targets import find_targets, target_weight

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
CACHE_DTYPE = torch.bfloat16
KEY_FIELDS = ("model_id", "model_hash", "data", "samples", "seqlen", "mode", "seed")


class FisherCacheError(IntegrityError):
    """A Fisher cache file that cannot be used (missing, truncated, corrupt or for other inputs)."""


# --------------------------------------------------------------------------- cache keys

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
        fields["batch_size"] = resolve_mode(mode, batch_size)[1]
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
    os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; the umask decides
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
