"""`bitalloc profile`: the error of every config for every target matrix, resumable and shardable."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from bitalloc import __version__
from bitalloc.atomic import output_lock
from bitalloc.configs import QuantConfig, config_space, parse_ranks, resolve_ranks
from bitalloc.errors import InputError, UnavailableError
from bitalloc.identity import model_fingerprint, model_id
from bitalloc.lowrank import decompose_many
from bitalloc.models import Calibration, calibration_fisher, find_targets, load_model, resolve_device, target_weight
from bitalloc.models.activations import ACT_FULL_MAX, act_error, calibration_moments
from bitalloc.models.calibration import calibration_token_source
from bitalloc.models.fisher import FISHER_MODES
from bitalloc.models.kl_probe import ProbeSettings
from bitalloc.models.loading import check_finite
from bitalloc.models.targets import float_target_weight
from bitalloc.models.text import CALIBRATION_PARTS
from bitalloc.preflight import check_model_spec, check_text_source
from bitalloc.profiles.jobs import resolve_jobs
from bitalloc.profiles.kl_factors import add_error_kl, kl_basis, measure_kl_factors
from bitalloc.profiles.shards import parse_shard, shard_indices
from bitalloc.profiles.store import (
    META_FILE,
    PROFILE_FORMAT,
    PROFILE_VERSION,
    CorruptMetaError,
    ProfileError,
    done_indices,
    read_meta,
    read_parts,
    rebuild_meta,
    write_meta,
    write_part,
    write_table,
)

log = logging.getLogger(__name__)


class WorkerDiedError(UnavailableError):
    """A worker process of a ``--jobs`` profile died; the finished matrices are kept for a resume."""

#: meta.json fields that must match for a run to resume an existing directory.
RESUME_KEYS = ("model_hash", "targets", "configs", "fisher", "calibration", "seed", "shard")


@dataclass(frozen=True)
class ProfileRequest:
    """Everything that defines a profile run (the CLI's flags), checked when made.

    ``calib``, ``samples``, ``seqlen`` and ``fisher_mode`` left None take the device's
    defaults (see :meth:`calibration`); ``calib_part`` is the part of a calibration text the
    windows come from (see :func:`bitalloc.models.calibration_tokens`). ``act`` records ``error_act`` (the activation-aware
    error, see :mod:`bitalloc.models.activations`) from the same calibration text; ``kl``
    records ``error_kl`` from per-matrix KL factors measured on ``kl_windows`` calibration
    sequences at the relative noise levels ``kl_levels`` (see :mod:`bitalloc.profiles.kl_factors`).
    ``ranks`` is a sequence of ranks, ``"0,8"`` or ``"auto"``; ``shard`` is ``"i/n"`` or
    None; ``jobs`` None or 0 lets the profiler choose.
    """

    model: str | None = None
    out: str | os.PathLike[str] = "profile"
    calib: str | None = None
    samples: int | None = None
    seqlen: int | None = None
    calib_part: str = "second-half"
    fisher: bool = True
    fisher_mode: str | None = None
    act: bool = True
    kl: bool = True
    kl_windows: int = ProbeSettings.windows
    kl_levels: Sequence[float] = ProbeSettings.levels
    space: str | os.PathLike[str] = "default"
    ranks: Sequence[int] | str = "auto"
    include: str | None = None
    exclude: str | None = None
    device: str = "auto"
    shard: str | None = None
    resume: bool = False
    seed: int = 0
    progress: bool = True
    jobs: int | None = None
    allow_unusual_config: bool = False

    def __post_init__(self) -> None:
        for name in ("samples", "seqlen"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.calib_part not in CALIBRATION_PARTS:
            raise ValueError(f"unknown calibration part {self.calib_part!r}; use one of {', '.join(CALIBRATION_PARTS)}")
        if self.fisher_mode is not None and self.fisher_mode not in FISHER_MODES:
            raise ValueError(f"unknown Fisher mode {self.fisher_mode!r}; use one of {', '.join(FISHER_MODES)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.jobs is not None and (isinstance(self.jobs, bool) or not isinstance(self.jobs, int)):
            raise ValueError(f"--jobs must be an integer >= 0 (0 = one per CPU core), got {self.jobs!r}")
        # "0,8" and "auto" as --ranks writes them; a sequence of ints as it is
        ranks = parse_ranks(self.ranks) if isinstance(self.ranks, str) else tuple(int(r) for r in self.ranks)
        object.__setattr__(self, "ranks", ranks)
        parse_shard(self.shard)  # a clear error now rather than after the model is loaded
        object.__setattr__(self, "kl_levels", self.probe_settings.levels)  # checked, as a tuple

    @property
    def probe_settings(self) -> ProbeSettings:
        """The KL probe settings of this run."""
        return ProbeSettings(windows=self.kl_windows, levels=tuple(self.kl_levels), seed=self.seed)

    @property
    def model_id(self) -> str:
        """The model's name in meta.json and in the Fisher cache key."""
        return model_id(self.model)

    def to_dict(self) -> dict[str, Any]:
        """The request as JSON data (paths as strings, ranks as a list or ``"auto"``)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["out"] = os.fspath(self.out)
        data["space"] = os.fspath(self.space)
        data["ranks"] = self.ranks if isinstance(self.ranks, str) else list(self.ranks)
        data["kl_levels"] = list(self.kl_levels)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProfileRequest:
        """Read :meth:`to_dict`'s form; ValueError for unknown keys."""
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown profile request fields: {', '.join(unknown)}")
        return cls(**data)

    def calibration(self, device: torch.device | str) -> Calibration:
        """The calibration settings of this run on ``device`` (the device's defaults where unset)."""
        return Calibration.for_device(device, source=self.calib, samples=self.samples, seqlen=self.seqlen,
                                      mode=self.fisher_mode, part=self.calib_part)


def _matrix_rows(index: int, name: str, W: torch.Tensor, configs: Sequence[QuantConfig],
                 decompositions: Sequence[Any], seconds: float, H: torch.Tensor | None = None) -> pd.DataFrame:
    rows, cols = W.shape
    norm_sq = float(W.double().pow(2).sum())
    per_config = seconds / max(len(decompositions), 1)
    records = []
    for cfg, dec in zip(configs, decompositions):
        ef = getattr(dec, "error_fisher", None)
        ea = math.nan if H is None else act_error(W - dec.reconstruct().to(W.device), H)
        records.append({
            "matrix": name, "index": index, "rows": rows, "cols": cols, "config": cfg.name,
            "bits": cfg.bits, "block": cfg.block, "scale_bits": cfg.scale_bits,
            "scale_block": cfg.scale_block, "scale_dtype": cfg.scale_dtype, "rank": cfg.rank,
            "lowrank_bits": cfg.lowrank_bits, "storage_bits": cfg.storage_bits(rows, cols),
            "bits_per_param": cfg.bits_per_param(rows, cols), "error": float(dec.error),
            "error_fisher": math.nan if ef is None else float(ef), "error_act": ea, "error_kl": math.nan,
            "weight_norm_sq": norm_sq,
            "iterations": int(dec.iterations), "seconds": float(getattr(dec, "seconds", per_config)),
        })
    return pd.DataFrame.from_records(records)


def check_ranks_fit(targets, shapes, configs: Sequence[QuantConfig]) -> None:
    """Every matrix needs at least one config whose rank fits its shape."""
    lowest = min(c.rank for c in configs)
    for (name, _), (rows, cols) in zip(targets, shapes):
        if lowest > min(rows, cols):
            raise ValueError(
                f"matrix {name} ({rows}x{cols}) has no config with rank <= {min(rows, cols)} "
                f"(lowest rank in the space: {lowest}); add a smaller rank to --ranks, e.g. 0"
            )


def describe_meta_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two profiles' meta.json in the keys a resume needs equal (``""`` when nothing)."""
    parts = []
    for key in RESUME_KEYS:
        if key == "calibration" and (old.get(key) is None or new.get(key) is None):
            continue  # one run without calibration text: the "fisher" key tells whether they differ
        if old.get(key) != new.get(key):
            if key == "targets":
                parts.append("targets (matrix names or shapes)")
            elif key == "configs":
                parts.append(f"configs (space {old.get('space')!r} vs {new.get('space')!r}, ranks {old.get('ranks')} vs {new.get('ranks')})")
            elif key == "model_hash":
                parts.append(f"model ({old.get('model')!r} vs {new.get('model')!r}: the weights differ)")
            elif key == "calibration" and old[key].get("part") != new[key].get("part"):
                parts.append(f"calibration windows (from the {old[key].get('part', 'whole')} of the text in the profile, "
                             f"the {new[key].get('part', 'whole')} here: --calib-part {old[key].get('part', 'whole')} "
                             "resumes it)")
            else:
                parts.append(f"{key} ({old.get(key)!r} vs {new.get(key)!r})")
    return "; ".join(parts)


def _prepare_directory(out: Path, meta: dict[str, Any], resume: bool) -> set[int]:
    """Check or create the output directory; return the target indices already done."""
    if (out / "meta.json").exists():
        try:
            old = read_meta(out)
        except CorruptMetaError:  # --resume: rebuilt from the command line when the parts fit it
            if not resume:
                raise
            old = rebuild_meta(out, meta)
        differ = describe_meta_difference(old, meta)
        if differ:
            raise ProfileError(
                f"{out} holds a profile made differently, so it cannot be resumed: {differ}. "
                "Choose another --out or delete that directory."
            )
        done = done_indices(out, meta, repair=True)
        log.info("resuming %s: %d of %d matrices already done", out, len(done & set(meta["work"])), len(meta["work"]))
        return done
    if resume:
        raise ProfileError(f"--resume given but {out} holds no profile to resume (no meta.json)")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give the path of a directory")
    if out.exists() and any(out.iterdir()):
        raise ProfileError(f"output {out} exists, is not empty and is not a bitalloc profile; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_meta(out, meta)
    return set()


def _versions() -> dict[str, str]:
    import transformers

    return {"bitalloc": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def profile(request: ProfileRequest,
            decompose_fn: Callable[..., Sequence[Any]] | None = None) -> Path:
    """Run (or resume) a profile as ``request`` says and return its directory.

    Every finished matrix is flushed atomically to ``parts/``; the table ``profile.csv`` is
    written once all matrices of the run (or shard) are done. ``decompose_fn(W, configs,
    fisher=F)`` defaults to :func:`bitalloc.lowrank.decompose_many`. While it runs, the lock
    file ``.OUT.lock`` next to ``out`` names its process: a second run on the same ``out`` is
    refused with OutputBusyError.
    """
    with output_lock(request.out):
        return _run_profile(request, decompose_fn)


def _run_profile(request: ProfileRequest, decompose_fn: Callable[..., Sequence[Any]] | None) -> Path:
    decompose_fn = decompose_fn or decompose_many
    out = Path(request.out)
    shard = parse_shard(request.shard)
    # a bad space or rank list fails here, before the model is loaded ("auto" is resolved below)
    config_space(request.space, ranks=(0,) if isinstance(request.ranks, str) else tuple(request.ranks),
                 allow_unusual=request.allow_unusual_config)
    check_model_spec(request.model, flag="--model")
    if request.fisher or request.act or request.kl:
        check_text_source(request.calib, flag="--calib")
    device = resolve_device(request.device)
    started = time.perf_counter()

    # without Fisher only the targets' weights are used: NaN elsewhere (an --exclude'd layer) is a warning
    model, tokenizer = load_model(request.model, require_finite=request.fisher)
    targets = find_targets(model, include=request.include, exclude=request.exclude)
    check_finite(model, [name for name, _ in targets])
    shapes = [tuple(target_weight(m).shape) for _, m in targets]
    ranks = resolve_ranks(request.ranks, shapes)
    configs = config_space(request.space, ranks=ranks, allow_unusual=request.allow_unusual_config)
    work = shard_indices(len(targets), shard)
    check_ranks_fit(targets, shapes, configs)
    calibration = request.calibration(device) if request.fisher or request.act or request.kl else None
    basis = kl_basis(request.act, request.fisher)
    meta: dict[str, Any] = {
        "format": PROFILE_FORMAT, "format_version": PROFILE_VERSION,
        "model": request.model_id, "model_hash": model_fingerprint(model),
        "targets": [{"name": n, "rows": r, "cols": c} for (n, _), (r, c) in zip(targets, shapes)],
        "include": request.include, "exclude": request.exclude,
        "space": str(request.space), "ranks": list(ranks),
        "configs": [c.name for c in configs],
        "fisher": bool(request.fisher), "calibration": None if calibration is None else calibration.to_dict(),
        "act": {"full_max": ACT_FULL_MAX} if request.act else False,
        "kl": {**request.probe_settings.to_dict(), "basis": basis} if request.kl else False,
        "seed": request.seed, "shard": None if shard is None else f"{shard[0]}/{shard[1]}",
        "work": work, "device": str(device), "versions": _versions(), "complete": False,
    }
    fresh, created = not (out / META_FILE).exists(), not out.exists()
    done = _prepare_directory(out, meta, request.resume)
    todo = [i for i in work if i not in done]

    tokens = None if calibration is None else calibration_token_source(calibration, model, tokenizer,
                                                                        seed=request.seed, progress=request.progress)
    try:
        fisher = (request_fisher(request, model, tokenizer, targets, calibration, meta["model_hash"], device, tokens)
                  if request.fisher and (todo or basis == "fisher" and request.kl) else None)
        moments = (calibration_moments(model, tokenizer, targets, calibration, model_id=request.model_id,
                                       model_hash=meta["model_hash"], seed=request.seed, device=device,
                                       progress=request.progress, tokens=tokens)
                   if request.act and (todo or request.kl) else None)
    except BaseException:  # e.g. a missing --calib file: leave no meta-only directory that blocks the next run
        if fresh:
            (out / META_FILE).unlink(missing_ok=True)
            if created and not any(out.iterdir()):
                out.rmdir()
        raise
    numels = [shapes[i][0] * shapes[i][1] for i in todo]
    jobs = (resolve_jobs(request.jobs, device, len(todo), sum(numels) * len(configs), max(numels, default=0))
            if decompose_fn is decompose_many else 1)
    bar = tqdm(total=len(work), initial=len(set(work) & done), unit="matrix",
               desc=f"profile ({len(configs)} configs each)" if jobs == 1 else f"profile ({jobs} processes)",
               disable=not request.progress)

    def task(index: int) -> tuple[int, str, torch.Tensor, torch.Tensor | None, list[QuantConfig], torch.Tensor | None]:
        name, module = targets[index]
        W = float_target_weight(name, module, device)
        F = None if fisher is None else fisher[name].to(device=device, dtype=torch.float32)
        H = None if moments is None else moments.of(name).to(device=device, dtype=torch.float32)
        return index, name, W, F, [c for c in configs if c.rank <= min(W.shape)], H

    try:
        if jobs == 1:
            with _one_cpu_thread(device):
                for index in todo:
                    index_, name, W, F, cfgs, H = task(index)
                    write_part(out, index, _profile_matrix(index_, name, W, F, cfgs, request.seed, decompose_fn, H))
                    bar.update(1)
        else:
            # largest matrices first: the last to finish are then small ones, so that no worker
            # waits long for another at the end (the order within a size is the model's)
            order = sorted(todo, key=lambda i: -shapes[i][0] * shapes[i][1])
            _profile_in_processes(order, task, jobs, request.seed, out, lambda: bar.update(1))
    finally:
        bar.close()

    table = read_parts(out, work)
    if not request.act and table["error_act"].notna().any() and table["error_act"].isna().any():
        log.warning("error_act is known for only some matrices (profiled with and without it): left out")
        table["error_act"] = math.nan
    table = table.assign(error_kl=math.nan)
    if request.kl and tokens is not None:
        names = [targets[i][0] for i in work]
        factors = measure_kl_factors(out, model, targets, names, request.probe_settings, basis, tokens(),
                                     moments=moments, fisher=fisher, device=device, progress=request.progress)
        table = add_error_kl(table, factors, basis)
    meta["seconds"] = float(read_meta(out).get("seconds", 0.0)) + time.perf_counter() - started
    write_table(out, table, meta)
    log.info("profile %s: %d rows for %d matrices x %d configs", out, len(table), len(work), len(configs))
    return out


#: With ``jobs`` unset, worker processes pay off only above this many (parameter x config)
#: entries: starting one costs seconds (it imports torch), a tiny model's profile less.
def _profile_matrix(index: int, name: str, W: torch.Tensor, F: torch.Tensor | None, configs: list[QuantConfig],
                    seed: int, decompose_fn: Callable[..., Sequence[Any]], H: torch.Tensor | None = None) -> pd.DataFrame:
    """The profile rows of one matrix (seeded by the profile's seed and the matrix index);
    ``H``: its input moments, for ``error_act``."""
    torch.manual_seed(seed * 100003 + index)
    t0 = time.perf_counter()
    decs = decompose_fn(W, configs, fisher=F)
    seconds = time.perf_counter() - t0
    return _matrix_rows(index, name, W, configs, decs, seconds, H)


def _profile_arrays(index: int, name: str, W: np.ndarray, F: np.ndarray | None, configs: list[QuantConfig],
                    seed: int, H: np.ndarray | None = None) -> pd.DataFrame:
    """:func:`_profile_matrix` of a worker process, on the arrays it was sent."""
    return _profile_matrix(index, name, torch.from_numpy(W), None if F is None else torch.from_numpy(F), configs,
                           seed, decompose_many, None if H is None else torch.from_numpy(H))


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """On the CPU, profile with one torch thread, as each worker process does.

    The BLAS sums in another order with another thread count, and the loop amplifies that:
    SmolLM2's layer-0 gate_proj moved by up to 7% (all 24 `default` configs changed) between
    1 and 2 threads. With one thread everywhere the table does not depend on ``--jobs``, and
    a resumed profile (whose ``--jobs auto`` may choose differently) equals an uninterrupted one.
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _worker_init() -> None:
    import multiprocessing as mp
    import threading

    # each worker process owns one core: a second torch thread would only contend
    torch.set_num_threads(1)
    parent = mp.parent_process()
    if parent is not None:  # a killed profile must not leave its workers behind

        def exit_with_parent() -> None:
            parent.join()
            os._exit(1)

        threading.Thread(target=exit_with_parent, daemon=True).start()


def _profile_in_processes(todo: Sequence[int], task: Callable[[int], tuple], jobs: int, seed: int,
                          out: Path, done_one: Callable[[], None]) -> None:
    """Profile ``todo`` in ``jobs`` single-threaded worker processes, each part written as it arrives.

    At most two matrices per worker are in flight, so the float32 copies waiting to be worked
    on stay a few matrices, never the model. An interrupt or a failed matrix stops the pool;
    the parts already written stay for a resume.
    """
    import concurrent.futures as cf
    import multiprocessing as mp

    pending = list(todo)
    running: dict[cf.Future, int] = {}
    with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init) as pool:
        try:
            while pending or running:
                while pending and len(running) < 2 * jobs:
                    index, name, W, F, configs, H = task(pending.pop(0))
                    # numpy arrays pickle as plain bytes; tensors would pass file descriptors, and a
                    # worker killed mid-transfer would print a traceback from the parent's sharing thread
                    fut = pool.submit(_profile_arrays, index, name, W.cpu().numpy(),
                                      None if F is None else F.cpu().numpy(), configs, seed,
                                      None if H is None else H.cpu().numpy())
                    running[fut] = index
                finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    write_part(out, running.pop(fut), fut.result())
                    done_one()
        except cf.process.BrokenProcessPool as exc:
            for fut in running:
                fut.cancel()
            raise WorkerDiedError(
                f"a profiling worker process died (killed, or out of memory) with {len(running)} matrices in "
                f"flight; the finished ones are kept in {out}: rerun the same command to resume (with fewer "
                "--jobs if memory is short)"
            ) from exc
        except BaseException:
            for fut in running:
                fut.cancel()
            raise


def request_fisher(request: ProfileRequest, model: torch.nn.Module, tokenizer: Any,
                   targets: Sequence[tuple[str, torch.nn.Module]], calibration: Calibration, model_hash: str,
                   device: torch.device, tokens: Callable[[], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The Fisher estimate of a profile run (cached by model, data, samples, seqlen, mode, seed)."""
    return calibration_fisher(model, tokenizer, targets, calibration, model_id=request.model_id,
                              model_hash=model_hash, seed=request.seed, device=device, progress=request.progress,
                              tokens=tokens)


def prepare_fisher(request: ProfileRequest) -> dict[str, Any] | None:
    """Estimate (or find cached) the Fisher estimate a profile run with ``request`` will use.

    Run it once before starting ``--shard i/n`` processes so that they all read the cache
    instead of each estimating it. Returns ``{"calibration"`` (a :class:`Calibration`),
    ``"model_hash", "files", "seconds"}`` (``files``: the cache's tensor and sidecar paths),
    or None with ``--no-fisher``.
    """
    if not request.fisher:
        return None
    device = resolve_device(request.device)
    model, tokenizer = load_model(request.model)
    targets = find_targets(model, include=request.include, exclude=request.exclude)
    calibration = request.calibration(device)
    model_hash = model_fingerprint(model)
    started = time.perf_counter()
    request_fisher(request, model, tokenizer, targets, calibration, model_hash, device)
    files = calibration.cache_files(model_id=request.model_id, model_hash=model_hash, seed=request.seed)
    return {"calibration": calibration, "model_hash": model_hash, "files": files,
            "seconds": time.perf_counter() - started}
