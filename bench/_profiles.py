"""Helpers the benchmarks share (files starting with ``_`` are not run by ``make bench``)."""

from __future__ import annotations

from pathlib import Path


def finished_profile(path: Path) -> bool:
    """Whether ``path`` holds a complete profile, which a benchmark reuses instead of rerunning."""
    from bitalloc.profiles import load_profile

    try:
        _, meta = load_profile(path)
    except Exception:  # noqa: BLE001 - absent or partial: (re)run, resuming
        return False
    return bool(meta.get("complete", True))
