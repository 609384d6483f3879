"""Run a profile as shards on a Ray cluster and merge them (``bitalloc profile --executor ray``).

The driver (the process that calls :func:`profile_with_ray`) connects to a Ray cluster and

1. runs one *prepare* task: it loads the model, lists the targets, resolves the calibration
   settings for the workers' device and, when the profile uses a Fisher, estimates it
   **once** (or finds it in that node's cache). The Fisher cache files come back as a Ray
   object that the driver never fetches itself;
2. splits the targets into N shards (``--shard i/N`` of the plain profiler) and submits one
   task per shard, one GPU each when the cluster has GPUs (else one CPU each). A shard task
   first makes sure its node's Fisher cache holds the estimate of step 1 (fetching the
   object only when that node lacks it), then runs :func:`bitalloc.profiles.profile` in a
   temporary directory and returns that directory's files (``meta.json``, ``parts/``,
   ``profile.csv``: a few MB even for large models) as bytes;
3. writes each shard's files under ``<out>.shards/shard-i-of-N`` on the driver's disk as
   soon as the shard finishes, and merges the shards into ``<out>`` with
   :func:`bitalloc.profiles.merge_profiles`.

So the workers need not share a filesystem with the driver: only bytes travel. They do need
bitalloc installed, and the model, a ``--space`` file and a ``--calib`` file readable at the
same path (a hub id or the built-in model, or a shared filesystem; a local Ray instance sees
the driver's files).

Resuming: finished shards on the driver are not run again; a shard that failed with a
Python error sends back the matrices it finished, so the rerun continues where it stopped.
A shard whose worker died (node lost, killed for memory) loses only its unfinished matrices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from bitalloc.atomic import atomic_write_bytes
from bitalloc.configs import BUILTIN_SPACES, config_space, resolve_ranks
from bitalloc.errors import UnavailableError
from bitalloc.identity import BUILTIN_ALIAS, model_fingerprint
from bitalloc.models import Calibration, find_targets, load_model, resolve_device, target_weight
from bitalloc.models.calibration import fisher_cache_dir
from bitalloc.profiles.runner import ProfileRequest, check_ranks_fit, describe_meta_difference, profile, request_fisher
from bitalloc.profiles.shards import merge_profiles
from bitalloc.profiles.store import META_FILE, ProfileError, load_profile, read_meta

log = logging.getLogger(__name__)

INSTALL_HINT = "install ray: pip install 'bitalloc[ray]'"
SHARDS_SUFFIX = ".shards"
_SHARD_DIR_RE = re.compile(r"^shard-(\d+)-of-(\d+)$")


class RayNotInstalledError(UnavailableError, ImportError, ValueError):
    """``--executor ray`` without the ``ray`` package (a ValueError too, so the CLI prints one line)."""


class ShardFailedError(ProfileError):
    """One or more shard tasks failed; the finished shards are kept for a rerun."""


def import_ray():
    """The ``ray`` module, or :class:`RayNotInstalledError` with the install command."""
    try:
        import ray
    except ImportError as exc:
        raise RayNotInstalledError(f"--executor ray needs the ray package, which is not installed; {INSTALL_HINT}") from exc
    return ray


def shards_root(out: str | os.PathLike[str]) -> Path:
    """Where the shard directories of the profile ``out`` are kept: ``<out>.shards``."""
    out = Path(out)
    return out.with_name(out.name + SHARDS_SUFFIX)


def shard_dir(root: Path, i: int, n: int) -> Path:
    return Path(root) / f"shard-{i}-of-{n}"


# ----- files as bytes ----------------------------------------------------------------------
def read_tree(folder: Path) -> dict[str, bytes]:
    """Every plain file under ``folder`` as ``{relative posix path: bytes}`` (temp files skipped)."""
    folder = Path(folder)
    files: dict[str, bytes] = {}
    if not folder.is_dir():
        return files
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith(".") and not path.name.endswith(".tmp"):
            files[path.relative_to(folder).as_posix()] = path.read_bytes()
    return files


def _safe_relative(name: str) -> Path:
    rel = Path(name)
    if rel.is_absolute() or not rel.parts or any(p in ("", ".", "..") for p in rel.parts):
        raise ProfileError(f"refusing to write a shard file with an unsafe path {name!r}")
    return rel


def write_tree(folder: Path, files: Mapping[str, bytes]) -> None:
    """Write ``{relative path: bytes}`` under ``folder`` (each file atomically, meta.json last)."""
    folder = Path(folder)
    for name in sorted(files, key=lambda n: n == META_FILE):
        atomic_write_bytes(folder / _safe_relative(name), files[name])


def _replace_tree(folder: Path, files: Mapping[str, bytes]) -> None:
    """Make ``folder`` hold exactly ``files``: written beside it, then swapped in by renames."""
    folder = Path(folder)
    incoming = folder.with_name(folder.name + ".incoming")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(incoming, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    write_tree(incoming, files)
    if folder.exists():
        os.replace(folder, old)
    os.replace(incoming, folder)
    shutil.rmtree(old, ignore_errors=True)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----- the Fisher estimate, shipped once --------------------------------------------------
def _fisher_dir() -> Path:
    return fisher_cache_dir()


def _fisher_snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """``{sidecar name: (mtime_ns, size)}`` of the Fisher cache, to see whether a task estimated one."""
    if not folder.is_dir():
        return {}
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.glob("fisher-*.json")}


def install_fisher_files(digests: Mapping[str, str], fetch: Callable[[], Mapping[str, bytes]],
                         folder: Path | None = None) -> bool:
    """Make the Fisher cache ``folder`` hold the files named in ``digests`` (name -> SHA-256).

    Files already present with the right digest are kept (a shared or warm cache); otherwise
    ``fetch()`` gives ``{name: bytes}`` and the missing or different files are written
    atomically, the tensor file before its ``.json`` sidecar. Returns whether it fetched.
    """
    folder = _fisher_dir() if folder is None else Path(folder)
    stale = [n for n in digests if not (folder / n).is_file() or _sha256((folder / n).read_bytes()) != digests[n]]
    if not stale:
        return False
    data = fetch()
    for name in sorted(stale, key=lambda n: n.endswith(".json")):
        blob = data[name]
        if _sha256(blob) != digests[name]:
            raise ProfileError(f"the shipped Fisher file {name} does not match its digest")
        atomic_write_bytes(folder / _safe_relative(name), blob)
    return True


# ----- the tasks (run on the workers) -----------------------------------------------------
def _error_record(exc: BaseException) -> dict[str, str]:
    return {"type": type(exc).__name__, "message": str(exc), "is_value_error": isinstance(exc, ValueError),
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))}


def _prepare_task(request: ProfileRequest) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Targets, configs, calibration and (when asked) the Fisher cache files of ``request``."""
    try:
        return _prepare(request)
    except Exception as exc:  # sent back whole, re-raised on the driver with its message
        return {"error": _error_record(exc), "host": socket.gethostname()}, {}


def _prepare(request: ProfileRequest) -> tuple[dict[str, Any], dict[str, bytes]]:
    device = resolve_device(request.device)
    model, tokenizer = load_model(request.model)
    targets = find_targets(model, include=request.include, exclude=request.exclude)
    shapes = [tuple(target_weight(m).shape) for _, m in targets]
    ranks = resolve_ranks(request.ranks, shapes)
    configs = config_space(request.space, ranks=ranks, allow_unusual=request.allow_unusual_config)
    check_ranks_fit(targets, shapes, configs)
    model_hash = model_fingerprint(model)
    info: dict[str, Any] = {
        "host": socket.gethostname(), "device": str(device), "model_hash": model_hash,
        "targets": [{"name": n, "rows": r, "cols": c} for (n, _), (r, c) in zip(targets, shapes)],
        "configs": [c.name for c in configs], "ranks": list(ranks), "calibration": None, "fisher_files": {},
    }
    files: dict[str, bytes] = {}
    if request.fisher:
        calibration = request.calibration(device)
        info["calibration"] = calibration.to_dict()
        started = time.perf_counter()
        request_fisher(request, model, tokenizer, targets, calibration, model_hash, device)
        info["fisher_seconds"] = time.perf_counter() - started
        tensors, sidecar = calibration.cache_files(model_id=request.model_id, model_hash=model_hash, seed=request.seed)
        if tensors.is_file() and sidecar.is_file():
            files = {tensors.name: tensors.read_bytes(), sidecar.name: sidecar.read_bytes()}
            info["fisher_files"] = {name: _sha256(blob) for name, blob in files.items()}
        else:
            log.warning("the Fisher estimate was not cached at %s; each shard will estimate its own", tensors)
    return info, files


def _shard_task(request: ProfileRequest, seed_files: Mapping[str, bytes], fisher: Mapping[str, Any],
                decompose_fn: Callable[..., Sequence[Any]] | None = None) -> dict[str, Any]:
    """Profile one shard in a temporary directory and return its files (and any error)."""
    started = time.perf_counter()
    result: dict[str, Any] = {"host": socket.gethostname(), "error": None, "files": {}, "fisher_fetched": False,
                              "fisher_estimated": []}
    tmp = Path(tempfile.mkdtemp(prefix="bitalloc-shard-"))
    try:
        out = tmp / "profile"
        try:
            if fisher.get("digests"):
                ref = fisher["ref"][0]  # inside a list, so Ray did not fetch it with the arguments
                result["fisher_fetched"] = install_fisher_files(fisher["digests"], lambda: _ray_get(ref))
            before = _fisher_snapshot(_fisher_dir())
            write_tree(out, seed_files)
            profile(dataclasses.replace(request, out=out), decompose_fn=decompose_fn)
            after = _fisher_snapshot(_fisher_dir())
            result["fisher_estimated"] = sorted(n for n in after if before.get(n) != after[n])
        except Exception as exc:  # keep the finished matrices: the rerun resumes from them
            result["error"] = _error_record(exc)
        result["files"] = read_tree(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["seconds"] = time.perf_counter() - started
    return result


def _ray_get(ref):
    import ray

    return ray.get(ref)


# ----- the driver -------------------------------------------------------------------------
def _absolute_if_local(value: str | None, keywords: Sequence[str] = ()) -> str | None:
    """A path that exists here, made absolute (workers do not share the driver's cwd);
    names the loaders read as keywords (``default``, ``wikitext2``, ``self:16``...) stay."""
    if value is None or value.strip().lower() in keywords or re.fullmatch(r"self(:\d+)?", value.strip().lower()):
        return value
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def _worker_device(device: str | None, cluster_gpus: float) -> str:
    """``cuda`` when the tasks get a GPU each, else ``cpu``."""
    text = "auto" if device in (None, "") else str(device)
    if text == "cpu":
        return "cpu"
    if text == "auto":
        return "cuda" if cluster_gpus >= 1 else "cpu"
    if re.fullmatch(r"cuda(:\d+)?", text):
        if cluster_gpus < 1:
            raise ValueError(f"--device {text} asked for, but the Ray cluster has no GPUs; use --device cpu or auto")
        if text != "cuda":
            log.warning("--device %s: with --executor ray each task uses the GPU Ray gives it", text)
        return "cuda"
    raise ValueError(f"invalid --device {text!r}: use auto, cpu, cuda or cuda:i")


def _existing_shard_count(root: Path) -> int | None:
    counts = {int(m[2]) for p in root.glob("shard-*-of-*") if p.is_dir() and (m := _SHARD_DIR_RE.match(p.name))}
    return counts.pop() if len(counts) == 1 else None


def _expected_meta(request: ProfileRequest, info: Mapping[str, Any], i: int, n: int) -> dict[str, Any]:
    return {"model": request.model_id, "model_hash": info["model_hash"], "targets": info["targets"],
            "space": str(request.space), "ranks": info["ranks"], "configs": info["configs"],
            "fisher": bool(request.fisher), "calibration": info["calibration"], "seed": request.seed,
            "shard": f"{i}/{n}"}


def _shard_state(folder: Path, expected: dict[str, Any]) -> tuple[bool, dict[str, bytes]]:
    """``(finished, files to resume from)`` of the driver's copy of one shard."""
    if not folder.exists():
        return False, {}
    if not (folder / META_FILE).is_file():
        if any(folder.iterdir()):
            raise ProfileError(f"{folder} is not a bitalloc shard profile (no {META_FILE}); delete it and rerun")
        return False, {}
    differ = describe_meta_difference(read_meta(folder), expected)
    if differ:
        raise ProfileError(
            f"{folder} holds a shard made differently, so it cannot be resumed: {differ}. "
            f"Delete {folder.parent} or choose another --out."
        )
    try:
        load_profile(folder)
        return True, {}
    except ProfileError:
        return False, read_tree(folder)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _describe(error: Mapping[str, Any]) -> str:
    return f"{error['type']}: {error['message']}"


def profile_with_ray(
    request: ProfileRequest,
    *,
    address: str | None = None,
    shards: int | None = None,
    decompose_fn: Callable[..., Sequence[Any]] | None = None,
    task_options: Mapping[str, Any] | None = None,
) -> Path:
    """Profile ``request`` as shards on a Ray cluster, merge them into ``request.out``, return it.

    ``address`` goes to ``ray.init`` (None: ``$RAY_ADDRESS``, else a cluster started with
    ``ray start`` on this machine, else a new local instance; ``"auto"`` requires an existing
    cluster). When Ray is already initialized in this process, that connection is used and
    left open. ``shards`` defaults to the shard count of an earlier run of the same ``out``,
    else the cluster's GPUs (or CPUs when it has none or ``request.device`` is ``cpu``), and
    is capped at the number of target matrices. Each task asks for one GPU (or one CPU);
    ``task_options`` adds options to every task (e.g. ``{"memory": 8e9}`` or a
    ``runtime_env``). ``decompose_fn`` is passed to each shard's :func:`profile` (it must
    pickle). Raises :class:`ShardFailedError` naming the failed shards after every shard
    has finished or failed; finished work is kept under ``<out>.shards`` for the rerun.
    """
    ray = import_ray()
    if request.shard is not None:
        raise ValueError("--shard cannot be combined with --executor ray, which makes its own shards (see --shards)")
    if shards is not None and int(shards) < 1:
        raise ValueError(f"--shards must be a positive integer, got {shards}")
    out = Path(request.out)
    root = shards_root(out)
    if out.exists() and any(out.iterdir()):
        raise ProfileError(f"output {out} exists and is not empty; choose another --out or delete it "
                           f"(finished shards under {root} are reused either way)")
    if request.resume and not root.is_dir():
        raise ProfileError(f"--resume given but there are no shards to resume in {root}")
    base = dataclasses.replace(
        request, model=_absolute_if_local(request.model, (BUILTIN_ALIAS,)),
        calib=_absolute_if_local(request.calib, ("wikitext2", "wikitext-2", "wikitext", "c4")),
        space=_absolute_if_local(str(request.space), tuple(BUILTIN_SPACES)), progress=False, resume=False,
        shard=None, jobs=1,  # a task has one CPU (or GPU): no worker processes inside it
    )

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address)
    try:
        resources = ray.cluster_resources()
        gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 0))
        device = _worker_device(request.device, gpus)
        base = dataclasses.replace(base, device=device)
        options: dict[str, Any] = {"num_gpus": 1} if device == "cuda" else {"num_cpus": 1}
        options.update(task_options or {})
        log.info("Ray cluster: %g CPUs, %g GPUs; tasks on %s", cpus, gpus, device)

        t0 = time.perf_counter()
        info_ref, fisher_ref = ray.remote(_prepare_task).options(num_returns=2, **options).remote(base)
        try:
            info = ray.get(info_ref)
        except ray.exceptions.RayError as exc:  # the worker died, bitalloc missing on the node, ...
            raise ShardFailedError(f"preparing the profile on the Ray cluster failed: {_first_line(exc)}") from exc
        if info.get("error"):
            error = info["error"]
            log.error("preparing the profile on %s failed:\n%s", info.get("host"), error["traceback"])
            if error["is_value_error"]:  # bad input (model, space, ranks...): the same message as a local run
                raise ValueError(f"{error['message']} (on Ray node {info.get('host')})")
            raise ShardFailedError(f"preparing the profile on Ray node {info.get('host')} failed: {_describe(error)}")
        n_targets = len(info["targets"])
        log.info("prepared on %s in %.1f s: %d targets, %d configs%s", info["host"], time.perf_counter() - t0,
                 n_targets, len(info["configs"]),
                 ", Fisher estimate ready" if info["fisher_files"] else "")
        base = dataclasses.replace(base, ranks=tuple(info["ranks"]))  # "auto" resolved once, for every shard
        if info["calibration"] is not None:  # the shards must use exactly these settings
            cal = Calibration.from_dict(info["calibration"])
            base = dataclasses.replace(base, samples=cal.samples, seqlen=cal.seqlen, fisher_mode=cal.mode)

        n = shards or _existing_shard_count(root) or int(gpus if device == "cuda" else cpus) or 1
        if n > n_targets:
            if shards:
                log.warning("--shards %d capped at the %d target matrices", n, n_targets)
            n = n_targets
        dirs = [shard_dir(root, i, n) for i in range(1, n + 1)]
        fisher = {"digests": info["fisher_files"], "ref": [fisher_ref]}
        remote_shard = ray.remote(_shard_task).options(**options)
        pending: dict[Any, int] = {}
        for i, folder in enumerate(dirs, start=1):
            finished, seed = _shard_state(folder, _expected_meta(base, info, i, n))
            if finished:
                log.info("shard %d/%d already finished in %s", i, n, folder)
                continue
            if seed:
                log.info("shard %d/%d resumes from %s", i, n, folder)
            pending[remote_shard.remote(dataclasses.replace(base, shard=f"{i}/{n}"), seed, fisher, decompose_fn)] = i
        log.info("%d of %d shards to run on the Ray cluster", len(pending), n)
        failures = _collect(ray, pending, dirs, n)
    finally:
        if started_here:
            ray.shutdown()

    if failures:
        kept = sum(1 for d in dirs if _is_finished(d))
        lines = "; ".join(f"shard {i}/{n} ({msg})" for i, msg in sorted(failures.items()))
        raise ShardFailedError(
            f"{len(failures)} of {n} shards failed: {lines}. The {kept} finished shards (and the finished "
            f"matrices of the failed ones) are kept in {root}; rerun the same command to resume."
        )
    return merge_profiles(dirs, out)


def _is_finished(folder: Path) -> bool:
    try:
        load_profile(folder)
        return True
    except ProfileError:
        return False


def _collect(ray, pending: dict[Any, int], dirs: Sequence[Path], n: int) -> dict[int, str]:
    """Wait for the shard tasks, writing each one's files as it finishes; return the failures."""
    failures: dict[int, str] = {}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                i = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as exc:  # the worker died, the node was lost, ...
                    failures[i] = _first_line(exc)
                    log.error("shard %d/%d: Ray task failed: %s", i, n, exc)
                    continue
                if result["files"]:
                    _replace_tree(dirs[i - 1], result["files"])
                if result["error"]:
                    failures[i] = _describe(result["error"]) + f" on {result['host']}"
                    log.error("shard %d/%d failed on %s:\n%s", i, n, result["host"], result["error"]["traceback"])
                    continue
                if result["fisher_estimated"]:
                    log.warning("shard %d/%d estimated a Fisher itself (%s) instead of using the shipped one",
                                i, n, ", ".join(result["fisher_estimated"]))
                log.info("shard %d/%d done on %s in %.1f s%s", i, n, result["host"], result["seconds"],
                         " (Fisher fetched)" if result["fisher_fetched"] else "")
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return failures
