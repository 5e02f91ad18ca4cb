"""What the trimmed model paid over the set: the per-sample cost ratio and the kept tokens/heads per layer."""

from __future__ import annotations

from typing import Any

import numpy as np

from trim.models.streams import TRIM_KEYS, split_record_name

HISTOGRAM_BINS = 20
COST_NOTE = ("per-sample FLOPs of the physical trim='eval' forward / FLOPs of the full model; padding to the "
             "batch maximum is counted, so it depends on which samples share a batch")
KEPT_NOTE = "mean over the set of the tokens each layer processed (alive, padding excluded) and heads kept"


def describe(values: np.ndarray) -> dict[str, float]:
    return {"mean": float(values.mean()), "median": float(np.median(values)), "std": float(values.std()),
            "min": float(values.min()), "max": float(values.max())}


def cost_summary(costs: np.ndarray) -> dict[str, Any]:
    """Mean, median, std, min, max and a histogram over [0, max(1, largest cost)]."""
    counts, edges = np.histogram(costs, bins=HISTOGRAM_BINS, range=(0.0, max(1.0, float(costs.max()))))
    return {**{k: round(v, 6) for k, v in describe(costs).items()},
            "histogram": {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]},
            "note": COST_NOTE}


def kept_summary(trim_cfg: Any, merged: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Record name -> one row per layer: mean tokens processed, mean heads kept, which trimmers sit there."""
    kept: dict[str, list[dict[str, Any]]] = {}
    if not merged["ids"]:
        return kept
    tokens, heads = merged["tokens"].mean(0), merged["heads"].mean(0)
    for j, (name, layer) in enumerate(merged["layout"]):
        token_key, head_key = TRIM_KEYS[split_record_name(name)[0]]
        kept.setdefault(name, []).append({
            "layer": layer, "tokens": round(float(tokens[j]), 4), "heads": round(float(heads[j]), 4),
            "token_trimmer": layer in getattr(trim_cfg, token_key),
            "head_trimmer": layer in getattr(trim_cfg, head_key)})
    return kept
