"""Wall-clock measurement the way design invariant 5 asks for it.

Candidates are timed in the same run on the same inputs, interleaved (full, trimmed, full,
trimmed, ...) so that drift in machine load hits them alike, after warm-up, and each is
summarised by the median of its repeats. `time_interleaved` is the one timing loop: `trim eval`
(`measure_speed`), `trim bench core` and `trim bench CHECKPOINT` all use it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

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


def measure_speed(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device, *, warmup: int,
                  repeats: int, budget: float | None = None) -> dict[str, Any]:
    """Full (trim="off") vs trimmed (trim="eval", at ``budget`` when given) wall clock on ``batch``
    (throughput) and on its first sample (latency), as `trim eval` reports them."""
    batch = {k: v.to(device) for k, v in batch.items()}
    result: dict[str, Any] = {
        "method": (f"same weights and inputs, trim='off' (full) and trim='eval' (trimmed) called alternately by "
                   f"trim.eval.speed.time_interleaved after {warmup} warm-up calls each; median of {repeats} "
                   "repeats. Fixed batch: the first batch of the set read by rank 0; latency uses its first sample"),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(), "warmup": warmup, "repeats": repeats,
    }
    one = {k: v[:1] for k, v in batch.items()}
    knob = {} if budget is None else {"budget": budget}  # models without the budget knob keep working
    if budget is not None:
        result["budget"] = budget
    for name, inputs in (("throughput", batch), ("latency", one)):
        times = time_interleaved({"full": lambda x=inputs: model(x, trim="off"),
                                  "trimmed": lambda x=inputs: model(x, trim="eval", **knob)},
                                 warmup=warmup, repeats=repeats, device=device)
        result[name] = _speed_entry(name, model, inputs, times, knob)
    return result


def _speed_entry(name: str, model: torch.nn.Module, inputs: dict[str, torch.Tensor],
                 times: dict[str, list[float]], knob: dict[str, Any]) -> dict[str, Any]:
    full, trimmed = median(times["full"]), median(times["trimmed"])
    with torch.inference_mode():
        ratio = float(model(inputs, trim="eval", **knob).cost_ratio.float().mean())
    n = int(inputs["pixel_values"].shape[0])
    entry: dict[str, Any] = {"batch_size": n, "cost_ratio": round(ratio, 4), "speedup": round(full / trimmed, 4)}
    if name == "throughput":
        entry |= {"trimmed_samples_per_s": round(n / trimmed, 2), "full_samples_per_s": round(n / full, 2)}
    else:
        entry |= {"trimmed_ms": round(1e3 * trimmed, 3), "full_ms": round(1e3 * full, 3)}
    entry["seconds"] = {"trimmed": [round(t, 6) for t in times["trimmed"]], "full": [round(t, 6) for t in times["full"]]}
    return entry
