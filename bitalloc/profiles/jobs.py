"""How many worker processes a CPU profile runs: one per core when the work is large enough,
as many as the available memory holds."""

from __future__ import annotations

import math
import os

import torch

AUTO_JOBS_MIN_WORK = 50_000_000


#: Memory one worker process needs, for --jobs auto: the interpreter with torch and the memory
#: the allocator keeps, plus this many float32 copies of its largest matrix (W, F, the iterates
#: and the quantizer's temporaries). Measured (peak RSS of decompose_many, default space, ranks
#: 0 and 8, with Fisher): 370 MB after imports; +1.5 GB (24 copies beyond W and F) for a 4096 x
#: 4096 matrix; +330 MB for 1536 x 576, mostly freed memory glibc keeps for reuse.
WORKER_BASE_BYTES = 700 * 2**20
WORKER_MATRIX_COPIES = 32


def available_memory() -> int | None:
    """Bytes of memory available to new processes (Linux ``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def resolve_jobs(jobs: int | None, device: torch.device, matrices: int, work: float = math.inf,
                 largest: int = 0, memory: int | None = None) -> int:
    """Worker processes for a profile: ``jobs``, or with None/0 one per CPU core when the work
    (parameters x configs left to do) is large enough, as many as ``memory`` (default: what the
    machine has available) holds with the ``largest`` matrix's (elements) working set; always 1
    on CUDA and never more than the matrices left to do."""
    if jobs is not None and jobs < 0:
        raise ValueError(f"--jobs must be >= 0 (0 = one per CPU core), got {jobs}")
    if device.type != "cpu":
        return 1
    if not jobs:
        jobs = (os.cpu_count() or 1) if work >= AUTO_JOBS_MIN_WORK else 1
        memory = available_memory() if memory is None else memory
        if memory is not None and jobs > 1:
            per_worker = WORKER_BASE_BYTES + WORKER_MATRIX_COPIES * 4 * largest
            jobs = min(jobs, int(0.8 * memory) // per_worker)
    return max(1, min(jobs, matrices))
