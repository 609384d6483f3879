"""The adapter profile: every LoRA module of every adapter x every config, error and storage bits.

Layout (same conventions as the model profile: atomic writes, hashes in ``meta.json``)::

    PROFILE/
      meta.json      what was profiled: adapters (path, weights hash, base model), space, totals
      modules.csv    one row per module: adapter, module, shape, rank, scale, singular values
      profile.csv    one row per (module, config): storage bits, codes-only bits, error

A module is named ``ADAPTER/MODULE`` (``MODULE`` as PEFT saves it without ``base_model.model.``);
``error`` is ``‖ΔW − ΔŴ‖²_F`` computed exactly from Gram matrices (:mod:`bitalloc.adapters.split`).
Modules of one shape and rank are profiled together as one batch.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from bitalloc import __version__
from bitalloc.adapters.activations import check_fit, input_moments
from bitalloc.adapters.config import AdapterQuantConfig, AdapterSpace, adapter_space
from bitalloc.adapters.peft_io import LoraAdapter, LoraModule, read_adapters
from bitalloc.adapters.split import config_errors, svd_split
from bitalloc.atomic import atomic_write_bytes, atomic_write_json
from bitalloc.models import calibration_tokens, load_model
from bitalloc.models.text import is_self_source

log = logging.getLogger(__name__)

PROFILE_FORMAT = "bitalloc-adapter-profile"
PROFILE_VERSION = 1
META_FILE = "meta.json"
TABLE_FILE = "profile.csv"
MODULES_FILE = "modules.csv"

TABLE_COLUMNS = [
    "matrix", "adapter", "module", "index", "rows", "cols", "rank", "params", "config", "bits", "high",
    "group", "low_bits", "storage_bits", "code_bits", "bits_per_param", "bits_per_param_codes", "error",
    "error_act",
]
MODULE_COLUMNS = ["index", "matrix", "adapter", "module", "rows", "cols", "rank", "params", "scale",
                  "delta_norm_sq", "singular_values"]
#: float64 elements one batch may hold per factor copy; bounds the profiler's memory (~0.5 GiB peak).
BATCH_ELEMENTS = 1 << 22


class AdapterProfileError(ValueError):
    """An adapter profile directory that cannot be used (missing, corrupt, foreign)."""


@dataclass(frozen=True)
class AdapterProfile:
    """A loaded adapter profile: the table, the module list and ``meta.json``."""

    table: pd.DataFrame
    modules: pd.DataFrame
    meta: dict[str, Any]
    path: str


def matrix_name(adapter: str, module: str) -> str:
    """``ADAPTER/MODULE``, the name a module goes by in profiles and allocations."""
    return f"{adapter}/{module}"


def _csv(df: pd.DataFrame) -> bytes:
    buf = io.StringIO()
    df.to_csv(buf, index=False, float_format="%.17g")
    return buf.getvalue().encode()


def _batches(items: list[tuple[int, LoraModule]], rows: int, cols: int, rank: int) -> list[list[tuple[int, LoraModule]]]:
    size = max(1, BATCH_ELEMENTS // max(1, (rows + cols) * rank))
    return [items[i:i + size] for i in range(0, len(items), size)]


def profile_batch(
    lora_a: torch.Tensor, lora_b: torch.Tensor, scale: torch.Tensor, configs: Sequence[AdapterQuantConfig],
    moments: torch.Tensor | None = None,
) -> tuple[np.ndarray, torch.Tensor, np.ndarray | None]:
    """Errors (N x C), singular values (N x r) and, with ``moments`` (the layer's input ``E[x xᵀ]``),
    activation-weighted errors (N x C) of N modules of one shape and rank.

    ``lora_a``: (N, r, cols), ``lora_b``: (N, rows, r), ``scale``: (N,) float64. The kernel
    :func:`profile_modules` runs on each batch, public for streaming callers (benchmarks).
    """
    split = svd_split(lora_a, lora_b, scale)
    act = None if moments is None else config_errors(split, configs, weight=moments)
    return config_errors(split, configs), split.s, act


def profile_modules(
    adapters: Sequence[LoraAdapter], space: AdapterSpace, moments: dict[str, torch.Tensor] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The profile table and module list of ``adapters`` under ``space`` (in memory); with
    ``moments`` (layer name -> input ``E[x xᵀ]``) also the activation-weighted ``error_act``."""
    entries = [(a.name, m) for a in adapters for m in a.modules]
    shapes: dict[tuple[int, int, int, str], list[tuple[int, LoraModule]]] = {}
    for i, (_, m) in enumerate(entries):  # with moments, one batch per layer (its own H)
        shapes.setdefault((m.rows, m.cols, m.rank, m.name if moments else ""), []).append((i, m))
    singular = [None] * len(entries)
    frames = []
    for (rows, cols, rank, layer), items in shapes.items():
        configs = space.configs(rank)
        if not configs:
            raise ValueError(f"the config space has no config for rank {rank}")
        storage = np.array([c.storage_bits(rows, cols, rank) for c in configs], dtype=np.int64)
        codes = np.array([c.code_bits(rows, cols, rank) for c in configs], dtype=np.int64)
        params = rank * (rows + cols)
        for batch in _batches(items, rows, cols, rank):
            idx = np.array([i for i, _ in batch])
            a = torch.stack([m.lora_a for _, m in batch])
            b = torch.stack([m.lora_b for _, m in batch])
            scale = torch.tensor([m.scale for _, m in batch], dtype=torch.float64)
            error, sv, act = profile_batch(a, b, scale, configs, moments[layer] if moments else None)
            for k, i in enumerate(idx.tolist()):
                singular[i] = sv[k].tolist()
            n, c = error.shape
            frames.append(pd.DataFrame({
                "index": np.repeat(idx, c),
                "rows": rows, "cols": cols, "rank": rank, "params": params,
                "config": np.tile([cfg.name for cfg in configs], n),
                "bits": np.tile([cfg.bits for cfg in configs], n),
                "high": np.tile([cfg.high for cfg in configs], n),
                "group": np.tile([cfg.group for cfg in configs], n),
                "low_bits": np.tile([cfg.low_bits for cfg in configs], n),
                "storage_bits": np.tile(storage, n),
                "code_bits": np.tile(codes, n),
                "error": error.reshape(-1),
                "error_act": np.nan if act is None else act.reshape(-1),
            }))
    table = pd.concat(frames, ignore_index=True).sort_values("index", kind="stable", ignore_index=True)
    names = np.array([matrix_name(a, m.name) for a, m in entries], dtype=object)
    table.insert(0, "matrix", names[table["index"].to_numpy()])
    table.insert(1, "adapter", np.array([a for a, _ in entries], dtype=object)[table["index"].to_numpy()])
    table.insert(2, "module", np.array([m.name for _, m in entries], dtype=object)[table["index"].to_numpy()])
    table["bits_per_param"] = table["storage_bits"] / table["params"]
    table["bits_per_param_codes"] = table["code_bits"] / table["params"]
    modules = pd.DataFrame({
        "index": np.arange(len(entries)),
        "matrix": names,
        "adapter": [a for a, _ in entries],
        "module": [m.name for _, m in entries],
        "rows": [m.rows for _, m in entries],
        "cols": [m.cols for _, m in entries],
        "rank": [m.rank for _, m in entries],
        "params": [m.rank * (m.rows + m.cols) for _, m in entries],
        "scale": [m.scale for _, m in entries],
        "delta_norm_sq": [float(np.sum(np.square(s))) for s in singular],
        "singular_values": [" ".join(f"{v:.17g}" for v in s) for s in singular],
    })
    return table[TABLE_COLUMNS], modules[MODULE_COLUMNS]


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"--out {out} is not empty; choose a new directory or pass --force to replace its profile")


def profile_adapters(
    paths: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    space: str | os.PathLike[str] | AdapterSpace | None = None,
    groups: Sequence[int] | None = None,
    base_model: str | None = None,
    model: str | os.PathLike[str] | None = None,
    calib: str | None = None,
    samples: int = 16,
    seqlen: int = 256,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Profile every LoRA module of the adapters in ``paths`` into the directory ``out``.

    ``space``: ``"default"`` (b in {2,3,4,8}, every h, groups {32,64,128}), a JSON/YAML file or an
    :class:`AdapterSpace`; ``groups`` overrides its groups; ``base_model`` refuses adapters whose
    ``base_model_name_or_path`` differs. ``model`` (a model spec, as ``bitalloc.models.load_model``
    takes it) refuses adapters that do not fit its layers; with ``calib`` (a text source) it adds
    ``error_act`` from the layers' input second moments over ``samples`` x ``seqlen`` tokens.
    Every input is checked before anything is written.
    """
    t0 = time.perf_counter()
    out = Path(out)
    space = space if isinstance(space, AdapterSpace) else adapter_space(space, groups)
    if calib is not None and model is None:
        raise ValueError("--calib needs --model: the input second moments come from the base model")
    adapters = read_adapters(paths, base_model=base_model)
    _check_out(out, force)
    moments, calibration = None, None
    if model is not None:
        moments, calibration = _model_side(adapters, model, calib, samples, seqlen, seed)
    table, modules = profile_modules(adapters, space, moments)
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)  # a replaced profile is incomplete until its meta is back
    table_bytes, module_bytes = _csv(table), _csv(modules)
    atomic_write_bytes(out / MODULES_FILE, module_bytes)
    atomic_write_bytes(out / TABLE_FILE, table_bytes)
    meta = {
        "format": PROFILE_FORMAT,
        "format_version": PROFILE_VERSION,
        "base_model": next((a.base_model for a in adapters if a.base_model), base_model),
        "adapters": [
            {"name": a.name, "path": a.path, "sha256": a.sha256, "base_model": a.base_model,
             "modules": len(a.modules), "ranks": sorted({m.rank for m in a.modules}),
             "params": int(sum(m.rank * (m.rows + m.cols) for m in a.modules)),
             "use_rslora": bool(a.config.get("use_rslora", False))}
            for a in adapters
        ],
        "space": space.to_dict(),
        "error": "plain: ||dW - dW_hat||_F^2 (exact, from Gram matrices)",
        "error_act": None if moments is None else "tr(dE H dE^T), H = E[x x^T] of the layer's inputs",
        "model": None if model is None else str(model),
        "calibration": calibration,
        "n_modules": int(len(modules)),
        "seconds": seconds,
        "device": "cpu",
        "versions": {"bitalloc": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "table": {"file": TABLE_FILE, "rows": int(len(table)), "sha256": hashlib.sha256(table_bytes).hexdigest()},
        "modules_table": {"file": MODULES_FILE, "rows": int(len(modules)),
                          "sha256": hashlib.sha256(module_bytes).hexdigest()},
        "complete": True,
    }
    atomic_write_json(out / META_FILE, meta)
    log.info("profiled %d modules of %d adapters x %d-%d configs in %.1f s -> %s", len(modules), len(adapters),
             table.groupby("index").size().min(), table.groupby("index").size().max(), seconds, out)
    return out


def _model_side(adapters: Sequence[LoraAdapter], model: str | os.PathLike[str], calib: str | None,
                samples: int, seqlen: int, seed: int) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | None]:
    """Load the base model, check the adapters fit it, and with ``calib`` measure the input moments."""
    net, tokenizer = load_model(model)
    check_fit(adapters, net, str(model))
    if calib is None:
        return None, None
    tokens = calibration_tokens(calib, net, tokenizer, seqlen, samples, seed=seed)
    names = sorted({m.name for a in adapters for m in a.modules})
    t0 = time.perf_counter()
    moments = input_moments(net, tokens, names)
    log.info("input second moments of %d layers over %d tokens in %.1f s", len(names), tokens.numel(),
             time.perf_counter() - t0)
    info = {"source": str(calib), "samples": int(tokens.shape[0]), "seqlen": int(tokens.shape[1]), "seed": seed}
    if not is_self_source(str(calib)):
        info["part"] = "second-half"  # calibration_tokens' default: evaluation reads the first half
    return moments, info


def _read_checked(directory: Path, entry: dict[str, Any], what: str) -> pd.DataFrame:
    path = directory / str(entry.get("file", ""))
    if not path.is_file():
        raise AdapterProfileError(f"adapter profile {directory}: its {what} {path.name} is missing")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise AdapterProfileError(
            f"{path} does not match its meta.json (truncated or edited); rerun `bitalloc adapter profile`"
        )
    return pd.read_csv(io.BytesIO(data), dtype={"matrix": str, "adapter": str, "module": str, "config": str,
                                               "singular_values": str})


def load_adapter_profile(path: str | os.PathLike[str]) -> AdapterProfile:
    """Read and check an adapter profile directory written by :func:`profile_adapters`."""
    directory = Path(path)
    if directory.is_file() and directory.name in (META_FILE, TABLE_FILE, MODULES_FILE):
        directory = directory.parent
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise AdapterProfileError(
            f"{directory} is not an adapter profile ({META_FILE} is missing); run `bitalloc adapter profile --out {directory}`"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterProfileError(f"{meta_path} is corrupt ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != PROFILE_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        hint = " (a model profile: use `bitalloc solve`)" if found == "bitalloc-profile" else ""
        raise AdapterProfileError(f"{directory} is not an adapter profile (format {found!r}){hint}")
    if int(meta.get("format_version", 0)) > PROFILE_VERSION:
        raise AdapterProfileError(f"{meta_path} has format version {meta.get('format_version')}; upgrade bitalloc")
    table = _read_checked(directory, meta.get("table", {}), "table")
    modules = _read_checked(directory, meta.get("modules_table", {}), "module list")
    return AdapterProfile(table=table, modules=modules, meta=meta, path=str(directory))


def singular_values(modules: pd.DataFrame) -> list[list[float]]:
    """The singular values of each row of a module list."""
    return [[float(v) for v in str(text).split()] for text in modules["singular_values"]]

