"""The profile directory on disk: ``meta.json``, per-matrix parts, and the final table.

Layout::

    PROFILE/
      meta.json          what was profiled (model and hash, targets, configs, calibration, ...)
      parts/00012.csv    one file per finished matrix, written atomically (resume unit)
      profile.csv        the whole table, written when every matrix of the run is done

``meta.json`` records the table's row count and SHA-256 once complete, so a truncated or
edited table is refused with a clear message instead of being read half.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from bitalloc.atomic import atomic_write_bytes, atomic_write_json
from bitalloc.errors import IntegrityError

log = logging.getLogger(__name__)

PROFILE_FORMAT = "bitalloc-profile"
PROFILE_VERSION = 1
META_FILE = "meta.json"
TABLE_FILE = "profile.csv"
PARTS_DIR = "parts"

#: Columns of the profile table, in order.
COLUMNS = [
    "matrix", "index", "rows", "cols", "config",
    "bits", "block", "scale_bits", "scale_block", "scale_dtype", "rank", "lowrank_bits",
    "storage_bits", "bits_per_param", "error", "error_fisher", "error_act", "error_kl", "weight_norm_sq",
    "iterations", "seconds",
]
#: Columns a table may lack (it was written before they existed): read as NaN.
OPTIONAL_COLUMNS = ("error_act", "error_kl")
_DTYPES = {
    "matrix": str, "index": "int64", "rows": "int64", "cols": "int64", "config": str,
    "bits": "int64", "block": "int64", "scale_bits": "int64", "scale_block": "int64",
    "scale_dtype": str, "rank": "int64", "lowrank_bits": "int64", "storage_bits": "int64",
    "bits_per_param": "float64", "error": "float64", "error_fisher": "float64",
    "error_act": "float64", "error_kl": "float64", "weight_norm_sq": "float64", "iterations": "int64", "seconds": "float64",
}


class ProfileError(IntegrityError):
    """A profile directory that cannot be used as asked (corrupt, foreign, incomplete)."""


def _csv_bytes(df: pd.DataFrame) -> bytes:
    buf = io.StringIO()
    df = df.assign(**{c: float("nan") for c in OPTIONAL_COLUMNS if c not in df.columns})
    df[COLUMNS].to_csv(buf, index=False, float_format="%.17g")
    return buf.getvalue().encode()


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype={"matrix": str, "config": str, "scale_dtype": str})
    except Exception as exc:  # pandas raises several parser error types
        raise ProfileError(f"{path} is not a readable profile table ({exc}); delete it and rerun") from exc
    for column in OPTIONAL_COLUMNS:
        if column not in df.columns:
            df[column] = float("nan")
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ProfileError(f"{path} lacks profile columns {missing}; is it a bitalloc profile table?")
    try:
        return df[COLUMNS].astype(_DTYPES)
    except (ValueError, TypeError) as exc:
        raise ProfileError(f"{path} has malformed values ({exc}); delete it and rerun") from exc


# ----- meta --------------------------------------------------------------------------------
def read_meta(directory: Path) -> dict[str, Any]:
    """Read and check ``meta.json`` of a profile directory."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise ProfileError(f"{directory} is not a bitalloc profile: {META_FILE} is missing")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(
            f"{path} is corrupt, not JSON ({exc}); without it the finished matrices in {PARTS_DIR}/ cannot be "
            f"checked: remove {directory} and rerun the `bitalloc profile` command"
        ) from exc
    if not isinstance(meta, dict) or meta.get("format") != PROFILE_FORMAT:
        raise ProfileError(f"{path} is not a bitalloc profile meta file (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if not isinstance(meta.get("format_version", 0), int) or not isinstance(meta.get("targets", []), list):
        raise ProfileError(f"{path} has mistyped entries (format_version {meta.get('format_version')!r}); it was not "
                           f"written by bitalloc: remove {directory} and rerun the `bitalloc profile` command")
    if int(meta.get("format_version", 0)) > PROFILE_VERSION:
        raise ProfileError(
            f"{path} has format version {meta.get('format_version')}, newer than this bitalloc "
            f"reads ({PROFILE_VERSION}); upgrade bitalloc"
        )
    return meta


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    """Atomically write ``meta.json``."""
    atomic_write_json(Path(directory) / META_FILE, meta)


# ----- parts and table ---------------------------------------------------------------------
def part_path(directory: Path, index: int) -> Path:
    """Where the rows of the matrix with this target index are kept."""
    return Path(directory) / PARTS_DIR / f"{index:05d}.csv"


def write_part(directory: Path, index: int, rows: pd.DataFrame) -> None:
    """Atomically write the finished rows of one matrix."""
    atomic_write_bytes(part_path(directory, index), _csv_bytes(rows))


def part_problem(path: Path, index: int, meta: dict[str, Any] | None = None) -> str | None:
    """Why the part at ``path`` cannot be used for target ``index``, or None when it is whole.

    A whole part holds one row per config of ``meta["configs"]``, in order, all for the matrix
    ``meta["targets"][index]``: so a part cut on a line boundary (fewer rows) is caught as well
    as an unreadable one. Without ``meta`` only readability and the index are checked."""
    try:
        df = _read_csv(path)
    except ProfileError as exc:
        return str(exc)
    if len(df) == 0 or (df["index"] != index).any():
        return "rows of another matrix or none"
    if meta is None:
        return None
    configs = meta.get("configs") or []
    if list(df["config"]) != list(configs):
        return f"{len(df)} rows, {len(configs)} expected (one per config, in the order of {META_FILE})"
    if meta.get("act") and df["error_act"].isna().all():
        return "no error_act (profiled without it)"
    targets = meta.get("targets") or []
    if index < len(targets) and (df["matrix"] != targets[index].get("name")).any():
        return f"rows of another matrix than {targets[index].get('name')}"
    return None


def done_indices(directory: Path, meta: dict[str, Any] | None = None, *, repair: bool = False) -> set[int]:
    """Target indices whose part file is whole (see :func:`part_problem`).

    Reading never changes the directory; ``repair=True`` (the profiler, which redoes them)
    removes the parts that are not whole, with a warning."""
    found: set[int] = set()
    folder = Path(directory) / PARTS_DIR
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob("*.csv")):
        try:
            index = int(path.stem)
        except ValueError:
            problem = "not a part name"
        else:
            problem = part_problem(path, index, meta)
        if problem is None:
            found.add(index)
        elif repair:
            log.warning("discarding part %s (%s); it will be profiled again", path, problem)
            path.unlink(missing_ok=True)
    return found


def read_parts(directory: Path, indices: Iterable[int]) -> pd.DataFrame:
    """Concatenate the parts of these target indices, in index order."""
    frames = [_read_csv(part_path(directory, i)) for i in sorted(indices)]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=_DTYPES[c] if _DTYPES[c] is not str else object) for c in COLUMNS})
    return pd.concat(frames, ignore_index=True)


def write_table(directory: Path, df: pd.DataFrame, meta: dict[str, Any]) -> dict[str, Any]:
    """Write the final table atomically and record its row count and hash in meta."""
    data = _csv_bytes(df)
    atomic_write_bytes(Path(directory) / TABLE_FILE, data)
    meta = dict(meta)
    meta["table"] = {"file": TABLE_FILE, "rows": int(len(df)), "sha256": hashlib.sha256(data).hexdigest()}
    meta["complete"] = True
    write_meta(directory, meta)
    return meta


def load_profile(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read a finished profile: ``(table as a DataFrame, meta dict)``.

    The table has (at least) the columns ``matrix``, ``rows``, ``cols``, ``config``,
    ``storage_bits``, ``bits_per_param``, ``error``, ``error_fisher`` (NaN without Fisher),
    ``error_act`` and ``error_kl`` (NaN when not profiled, and in tables written before
    they existed) and ``seconds``. A truncated, edited or unfinished table is refused.
    """
    directory = Path(path)
    if directory.is_file() and directory.name in (META_FILE, TABLE_FILE):
        directory = directory.parent
    if not directory.exists():
        raise ProfileError(f"profile {directory} does not exist; run `bitalloc profile --out {directory}` first")
    meta = read_meta(directory)
    table = directory / TABLE_FILE
    if not meta.get("complete") or not table.is_file():
        raise ProfileError(
            f"profile {directory} is not finished ({len(done_indices(directory, meta))} of "
            f"{len(meta.get('work', meta.get('targets', [])))} matrices done); rerun the same "
            "`bitalloc profile` command to resume it"
        )
    data = table.read_bytes()
    expect = meta.get("table", {})
    if hashlib.sha256(data).hexdigest() != expect.get("sha256"):
        raise ProfileError(
            f"{table} does not match its meta.json (truncated or edited: expected "
            f"{expect.get('rows')} rows with sha256 {str(expect.get('sha256'))[:12]}...); "
            "rerun `bitalloc profile` (finished matrices are kept in parts/) or restore the file"
        )
    df = _read_csv(table)
    return df, meta
