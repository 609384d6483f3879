"""The one reading of a ``--device`` value."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (or None) -> CUDA when present, else CPU; ``cpu``/``cuda``/``cuda:i`` checked.

    Raises ValueError for a string torch does not read as a device, and for a CUDA device on a
    machine without CUDA.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"invalid --device {device!r}: use auto, cpu, cuda or cuda:i") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for, but no CUDA device is available; use --device cpu")
    return dev
