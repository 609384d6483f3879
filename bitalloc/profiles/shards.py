"""Shard specs (``--shard i/n``) and merging shard profiles into one."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from bitalloc.atomic import check_output
from bitalloc.profiles.kl_factors import merge_kl_factors
from bitalloc.profiles.store import (
    ProfileError,
    load_profile,
    write_meta,
    write_table,
)

log = logging.getLogger(__name__)

_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")

#: meta.json fields that every shard of one profile must agree on.
SHARD_KEYS = ("model", "model_hash", "targets", "configs", "fisher", "calibration", "seed")


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """Parse ``"i/n"`` (1 <= i <= n) into ``(i, n)``; None stays None."""
    if spec is None:
        return None
    m = _SHARD_RE.match(str(spec))
    if m is None:
        raise ValueError(f"invalid --shard {spec!r}: expected i/n with 1 <= i <= n, e.g. 1/4")
    i, n = int(m[1]), int(m[2])
    if n < 1 or not 1 <= i <= n:
        raise ValueError(f"invalid --shard {spec!r}: the shard index must lie in 1..{n} (i/n, e.g. 1/{max(n, 1)})")
    return i, n


def shard_indices(n_targets: int, shard: tuple[int, int] | None) -> list[int]:
    """Target indices of a shard: every n-th matrix, starting at the (i-1)-th."""
    if shard is None:
        return list(range(n_targets))
    i, n = shard
    return list(range(i - 1, n_targets, n))


def merge_profiles(sources: Sequence[str | Path], out: str | Path, *, force: bool = False) -> Path:
    """Join shard profiles into one profile at ``out``.

    The shards must describe the same model, targets, configs and calibration, and together
    cover every target exactly once. Their KL factors (``kl_factors.json``) are joined too
    (see :func:`bitalloc.profiles.kl_factors.merge_kl_factors`).
    """
    if not sources:
        raise ValueError("merge needs at least one profile directory")
    frames: list[pd.DataFrame] = []
    metas: list[dict[str, Any]] = []
    for src in sources:
        df, meta = load_profile(src)
        frames.append(df)
        metas.append(meta)
    first = metas[0]
    for src, meta in zip(sources[1:], metas[1:]):
        differ = [k for k in SHARD_KEYS if meta.get(k) != first.get(k)]
        if differ:
            raise ProfileError(
                f"{src} does not belong with {sources[0]}: they differ in {', '.join(differ)}"
            )
    n_targets = len(first["targets"])
    seen: dict[int, str] = {}
    for src, meta in zip(sources, metas):
        for index in meta["work"]:
            if index in seen:
                name = first["targets"][index]["name"]
                raise ProfileError(f"matrix {name} (index {index}) is in both {seen[index]} and {src}")
            seen[index] = str(src)
    missing = sorted(set(range(n_targets)) - set(seen))
    if missing:
        names = [first["targets"][i]["name"] for i in missing[:5]]
        raise ProfileError(
            f"the shards cover {len(seen)} of {n_targets} matrices; missing e.g. {names}: "
            "profile the missing shards and merge again"
        )
    out = check_output(out, force=force, kind="dir", what="--out")
    if force and out.is_dir() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    table = pd.concat(frames, ignore_index=True).sort_values("index", kind="stable")
    meta = dict(first)
    meta.update(shard=None, work=list(range(n_targets)), merged_from=[str(s) for s in sources], complete=False)
    meta["seconds"] = sum(float(m.get("seconds", 0.0)) for m in metas)
    write_meta(out, meta)
    merge_kl_factors(sources, out)
    write_table(out, table.reset_index(drop=True), meta)
    log.info("merged %d shards into %s (%d rows)", len(sources), out, len(table))
    return out
