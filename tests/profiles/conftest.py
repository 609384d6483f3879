"""Fixtures shared by the profile tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

#: A small space file: rank 0 and rank > 0 configs, NF2 to NF8. A module may define its own ``SPACE``.
SPACE = ["nf2-g16-s8x16-r0", "nf4-g16-s16-r0", "nf3-g32-s4x16-r4", "nf8-g16-s8x16-r8"]


@pytest.fixture
def space_file(tmp_path, request) -> Path:
    """The module's ``SPACE`` (else the one above) as a JSON space file."""
    path = tmp_path / "space.json"
    path.write_text(json.dumps(getattr(request.module, "SPACE", SPACE)))
    return path
