"""Wall-clock measurement the way design invariant 5 asks for it.

Candidates are timed in the same run on the same inputs, interleaved (full, trimmed, full,
trimmed, ...) so that drift in machine load hits them alike, after warm-up, and each is
summarised by the median of its repeats.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(candidates: dict[str, Callable[[], object]], *, warmup: int = 2, repeats: int = 5,
                     device: torch.device | None = None) -> dict[str, list[float]]:
    """Seconds per call of each candidate, ``repeats`` samples each, interleaved."""
    with torch.inference_mode():
        for fn in candidates.values():
            for _ in range(warmup):
                fn()
        _sync(device)
        times: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(repeats):
            for name, fn in candidates.items():
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)
