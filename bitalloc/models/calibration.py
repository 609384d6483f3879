"""Calibration settings of a Fisher estimate, and the estimate a profile (and apply) uses.

A :class:`Calibration` says which text the Fisher estimate is computed on and how: the text
source, the number of sequences and their length, the Fisher mode and its batch size. It is
stored as the ``calibration`` entry of a profile's ``meta.json`` (and, through the
allocation's provenance, of an applied directory's ``bitalloc.json``), with the keys
``source``, ``samples``, ``seqlen``, ``mode``, ``batch_size`` and, for windows read from the
second half of a text (the default, see :func:`bitalloc.models.calibration_tokens`), ``part``;
settings without ``part`` spread their windows over the whole text.

:func:`calibration_fisher` gives the estimate for a model, from the cache under
:func:`bitalloc.identity.cache_root` when there: ``bitalloc apply`` reuses the estimate its
profile computed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bitalloc.identity import cache_root
from bitalloc.models.fisher import FISHER_MODES, default_fisher_settings
from bitalloc.models.fisher_cache import fisher_cache_key, fisher_cache_paths, load_or_estimate_fisher
from bitalloc.models.sampling import SAMPLER_VERSION
from bitalloc.models.text import CALIBRATION_PARTS, calibration_tokens, is_self_source


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"calibration {what} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class Calibration:
    """The text and settings of a Fisher estimate.

    ``source`` is a text source as :func:`bitalloc.models.calibration_tokens` reads it
    (``wikitext2``, ``c4``, a file, ``self:N``); ``samples`` sequences of ``seqlen`` tokens;
    ``mode`` one of :data:`bitalloc.models.fisher.FISHER_MODES`; ``batch_size`` sequences per
    pass (None: the mode's default; files written before it was recorded lack it); ``part``
    the part of a text source the windows come from (:data:`CALIBRATION_PARTS`; text sampled
    from the model has no parts and is always ``whole``).
    """

    source: str
    samples: int
    seqlen: int
    mode: str
    batch_size: int | None = None
    part: str = "second-half"

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError(f"calibration source must be a non-empty string, got {self.source!r}")
        _positive_int(self.samples, "samples")
        _positive_int(self.seqlen, "seqlen")
        if self.mode not in FISHER_MODES:
            raise ValueError(f"unknown Fisher mode {self.mode!r}; use one of {', '.join(FISHER_MODES)}")
        if self.batch_size is not None:
            _positive_int(self.batch_size, "batch_size")
        if self.part not in CALIBRATION_PARTS:
            raise ValueError(f"unknown calibration part {self.part!r}; use one of {', '.join(CALIBRATION_PARTS)}")
        if is_self_source(self.source):
            object.__setattr__(self, "part", "whole")  # a sample has no halves

    @classmethod
    def for_device(cls, device: str | torch.device | None, *, source: str | None = None, samples: int | None = None,
                   seqlen: int | None = None, mode: str | None = None, part: str = "second-half") -> Calibration:
        """The given settings, the rest from :func:`default_fisher_settings` of ``device``.

        ``source`` defaults to ``self:<samples>`` (text sampled from the model itself).
        """
        defaults = default_fisher_settings(device)
        count = int(samples or defaults["samples"])
        return cls(source=source or f"self:{count}", samples=count, seqlen=int(seqlen or defaults["seqlen"]),
                   mode=mode or defaults["mode"], batch_size=int(defaults.get("batch_size") or 1), part=part)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``meta.json``'s ``calibration``); ``batch_size`` only when known, ``part``
        only when not ``whole``."""
        data: dict[str, Any] = {"source": self.source, "samples": self.samples, "seqlen": self.seqlen,
                                "mode": self.mode}
        if self.batch_size is not None:
            data["batch_size"] = self.batch_size
        if self.part != "whole":
            data["part"] = self.part
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        """Read :meth:`to_dict`'s form; ValueError naming what is missing or wrong."""
        if not isinstance(data, Mapping):
            raise ValueError(f"calibration settings must be a JSON object, got {type(data).__name__}")
        missing = [k for k in ("source", "samples", "seqlen", "mode") if k not in data]
        if missing:
            raise ValueError(f"calibration settings lack {', '.join(missing)}: {dict(data)!r}")
        return cls(source=data["source"], samples=data["samples"], seqlen=data["seqlen"], mode=data["mode"],
                   batch_size=data.get("batch_size"), part=data.get("part", "whole"))

    def key_fields(self, *, model_id: str, model_hash: str, seed: int) -> dict[str, Any]:
        """The Fisher cache key fields of an estimate with these settings (see :func:`fisher_cache_key`)."""
        # text sampled from the model is named with its sampler's version: another sampler's estimate is not reused
        data = f"{self.source}@sampler{SAMPLER_VERSION}" if is_self_source(self.source) else self.source
        if self.part != "whole":
            data = f"{data}#{self.part}"
        return {"model_id": model_id, "model_hash": model_hash, "data": data, "samples": self.samples,
                "seqlen": self.seqlen, "mode": self.mode, "seed": seed}

    def cache_files(self, *, model_id: str, model_hash: str, seed: int) -> tuple[Path, Path]:
        """``(tensors, sidecar)``: where the Fisher estimate with these settings is cached."""
        fields = self.key_fields(model_id=model_id, model_hash=model_hash, seed=seed)
        return fisher_cache_paths(fisher_cache_dir(), fisher_cache_key(**fields, batch_size=self.batch_size))


def fisher_cache_dir() -> Path:
    """The folder of cached Fisher estimates."""
    return cache_root() / "fisher"


def calibration_token_source(calibration: Calibration, model: torch.nn.Module, tokenizer: Any, *, seed: int,
                             progress: bool = True) -> Callable[[], torch.Tensor]:
    """A function giving the calibration tokens of ``calibration`` (drawn on the first call, then kept),
    so that the estimates of one profile run (Fisher, input moments, KL probes) share one draw."""
    drawn: list[torch.Tensor] = []

    def tokens() -> torch.Tensor:
        if not drawn:
            drawn.append(calibration_tokens(calibration.source, model, tokenizer, calibration.seqlen,
                                            calibration.samples, seed=seed, part=calibration.part,
                                            progress=progress))
        return drawn[0]

    return tokens


def calibration_fisher(model: torch.nn.Module, tokenizer: Any, targets: Sequence[tuple[str, torch.nn.Module]],
                       calibration: Calibration, *, model_id: str, model_hash: str, seed: int,
                       device: str | torch.device | None,
                       progress: bool = True,
                       tokens: Callable[[], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The Fisher estimate of ``targets`` with ``calibration``, from the cache when there.

    The cache key is ``model_id``, ``model_hash``, the calibration settings and ``seed`` (the
    seed that draws the calibration sequences): a profile and an ``apply`` of its allocation
    name the same estimate. ``tokens`` gives the calibration tokens (default:
    :func:`calibration_token_source`); it is called only on a cache miss. Returns
    ``{target name: float32 (out, in) tensor}``.
    """
    if tokens is None:
        tokens = calibration_token_source(calibration, model, tokenizer, seed=seed, progress=progress)
    key_fields = calibration.key_fields(model_id=model_id, model_hash=model_hash, seed=seed)
    return load_or_estimate_fisher(model, tokens, targets, cache_dir=fisher_cache_dir(), key_fields=key_fields,
                                   batch_size=calibration.batch_size, device=device, progress=progress)
