"""Which process this is: the one place trim reads rank and world size, and splits a batch by rank.

Launchers (torchrun, ``accelerate launch``, the ``deepspeed`` launcher) set ``RANK`` /
``WORLD_SIZE``; under ``srun`` `trim.train.distributed.apply_launcher_env` maps ``SLURM_*``
onto them first. Once a process group exists it is the authority.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def rank_and_world() -> tuple[int, int]:
    """(rank, world size): torch.distributed if initialised, else RANK / WORLD_SIZE, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def rank_slice(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous, as-even-as-possible share ``[start, stop)`` of ``n`` rows for ``rank``."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def slice_batch(batch: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    """Rows ``start:stop`` of every tensor and list in a batch dict (other values as they are)."""
    return {k: v[start:stop] if isinstance(v, (torch.Tensor, list, tuple)) else v for k, v in batch.items()}
