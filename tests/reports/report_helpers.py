"""Helpers of the report tests (PNG header parsing, evals lines)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def eval_lines(*records: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)
