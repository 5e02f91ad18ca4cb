"""Relevance recall: do the patches a trimmer keeps cover what the question asks about?

For one trimmed layer, over N images of P patches, ``kept`` and ``relevant`` bool (N, P)
(relevant: trim.data.relevance, the patches of the objects the answer depends on)::

    recall = sum(kept & relevant) / sum(relevant)              micro-average over the set
    kept   = sum(kept) / sum(P)         over the images that have a relevant patch
    chance = sum_i relevant_i * kept_i / P / sum(relevant)     the recall of a trimmer that keeps
             the same number of patches in each image, at random places
    lift   = recall / chance            1.0: where the kept patches sit ignores the question

When every image keeps the same number of patches, chance = kept and lift = recall / kept.
Chance rather than kept is the reference because a per-input trimmer keeps more patches in
some images than in others: one that keeps more where the objects are large would otherwise
show a lift above 1 without choosing the objects' patches. Images without a relevant patch
(a "no" answer, a count of 0) say nothing about recall and count in no sum.

`relevance_recall` is the whole metric on masks; `relevance_counts` and `summarize` split it
into additive per-image sums, so per-sample results can be merged across ranks first.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from trim.data.relevance import PATCH_RULE
from trim.models.streams import per_image

# The additive sums behind the metric, one row per image (the last axis of `relevance_counts`).
COUNT_FIELDS = ("relevant", "kept_relevant", "chance_relevant", "kept", "patches", "images")
RELEVANCE_NOTE = ("recall: kept relevant patches / relevant patches (summed over the set); kept: kept patches / "
                  "patches of the same images; lift: recall / chance, chance being the recall of keeping the same "
                  "number of patches per image at random places (1.0: the trimmer ignores what the question asks); "
                  "images without a relevant patch are left out")


def relevance_counts(kept: Tensor, relevant: Tensor) -> Tensor:
    """float64 (N, len(COUNT_FIELDS)): each image's sums; all zero for an image with no relevant patch."""
    if kept.shape != relevant.shape or kept.dim() != 2:
        raise ValueError(f"kept {tuple(kept.shape)} and relevant {tuple(relevant.shape)} must both be (images, "
                         "patches)")
    kept, relevant = kept.bool(), relevant.bool()
    patches = kept.shape[1]
    n_relevant = relevant.sum(1, dtype=torch.float64)
    n_kept = kept.sum(1, dtype=torch.float64)
    counted = (n_relevant > 0).double()
    return torch.stack([n_relevant, (kept & relevant).sum(1, dtype=torch.float64), n_relevant * n_kept / patches,
                        n_kept * counted, patches * counted, counted], 1)


def summarize(counts: Tensor | np.ndarray) -> dict[str, Any]:
    """The metric from summed counts (``len(COUNT_FIELDS)``,); None where nothing relevant was seen."""
    total = dict(zip(COUNT_FIELDS, (float(v) for v in counts)))
    seen = total["relevant"] > 0
    recall = total["kept_relevant"] / total["relevant"] if seen else None
    chance = total["chance_relevant"] / total["relevant"] if seen else None
    return {"recall": _round(recall), "kept": _round(total["kept"] / total["patches"] if seen else None),
            "chance": _round(chance), "lift": _round(recall / chance if seen and chance > 0 else None),
            "relevant_patches": int(total["relevant"]), "images": int(total["images"])}


def relevance_recall(kept: Tensor, relevant: Tensor) -> dict[str, Any]:
    """Recall, kept fraction, chance and lift of one layer's ``kept`` (N, P) against ``relevant`` (N, P)."""
    return summarize(relevance_counts(kept, relevant).sum(0))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def patch_alive(alive: Tensor, grid: int) -> Tensor:
    """(B, grid * grid) of a record's alive positions (B, N0): an image stream's tokens end with its patches."""
    return alive[:, -grid * grid:]


def layer_counts(records: dict[str, list[Any]], relevance: Tensor, layers: list[tuple[str, int]],
                 grid: int) -> Tensor:
    """float64 (B, len(layers), len(COUNT_FIELDS)): each sample's counts at each (image stream, layer),
    summed over its images. ``relevance``: bool (B, P) or (B, images, P), as the batch carries it."""
    per_sample = relevance[:, None] if relevance.dim() == 2 else relevance
    columns = []
    for stream, layer in layers:
        total = torch.zeros(per_sample.shape[0], len(COUNT_FIELDS), dtype=torch.float64)
        for k in range(per_sample.shape[1]):
            name = stream if relevance.dim() == 2 else per_image(stream, k)
            alive = records[name][layer].alive
            if alive is None:
                raise ValueError(f"record {name!r} layer {layer} has no alive positions; run the model with "
                                 "track_alive=True to measure relevance")
            total += relevance_counts(patch_alive(alive, grid).cpu(), per_sample[:, k].cpu())
        columns.append(total)
    return torch.stack(columns, 1)


def relevance_summary(counts: np.ndarray, layers: list[tuple[str, int]]) -> dict[str, Any]:
    """The eval JSON's ``relevance``: per layer, at the last (deepest) layer, and the mean over layers.

    ``counts``: (N, len(layers), len(COUNT_FIELDS)) per-sample counts; ``layers``: (image stream,
    layer) of each column, in forward order.
    """
    rows = [{"stream": stream, "layer": layer, **summarize(counts[:, j].sum(0))}
            for j, (stream, layer) in enumerate(layers)]
    mean = {}
    for key in ("recall", "kept", "lift"):
        values = [r[key] for r in rows if r[key] is not None]
        mean[key] = _round(float(np.mean(values))) if values else None
    return {"layers": rows, "last": rows[-1] if rows else None, "mean": mean, "rule": PATCH_RULE,
            "note": RELEVANCE_NOTE}
