"""The blind baseline: the same model, with every image replaced by one constant image.

The constant is zero after the loader's normalisation ``(x / 255 - mean) / std``, that is every
pixel in the normalisation's mean colour (``PIXEL_MEAN``: mid-grey, 127.5 of 255, for the
default 0.5 mean), not the data set's mean colour: it is the input the network is centred on,
and it needs no pass over the data. What a blind model answers comes from the text alone, so a
model that uses the image is far above it, and full ≈ blind means the image is ignored.

`trim eval CKPT --blind` (``evaluate(..., blind=True)``) runs the whole evaluation this way and
writes ``eval/<stem>_blind.json`` beside the full one; `compare_blind` puts the two side by side.
"""

from __future__ import annotations

from typing import Any

import torch

BLIND_NOTE = "every image replaced by a constant: zeros after normalisation (the normalisation's mean colour)"


def blind_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` with every image the constant, and without relevance masks: a constant image shows no object."""
    out = {k: v for k, v in batch.items() if k != "relevance"}
    out["pixel_values"] = torch.zeros_like(batch["pixel_values"])
    return out


def _rows(result: dict[str, Any]) -> dict[str, float]:
    """Accuracy (%) rows of one eval result: overall, then VQA's per answer / question type."""
    metrics = result.get("metrics")
    if metrics is None:
        raise ValueError(f"{result.get('path', 'the eval result')} has no metrics (an unlabelled split); "
                         "compare full and blind on a split with answers or labels")
    if result["task"] == "nlvr2":
        return {"accuracy": 100.0 * metrics["accuracy"], "consistency": 100.0 * metrics["consistency"]}
    return {"overall": metrics["overall"],
            **{f"answer type: {k}": v for k, v in sorted(metrics["perAnswerType"].items())},
            **{f"question type: {k}": v for k, v in sorted(metrics["perQuestionType"].items())}}


def compare_blind(full: dict[str, Any], blind: dict[str, Any]) -> str:
    """A text table of a full and a blind `trim eval` result of the same split: accuracy (%) of each
    and full - blind, overall and per type."""
    if (full["task"], full["split"]) != (blind["task"], blind["split"]) or full.get("images") == "blind" \
            or blind.get("images") != "blind":
        raise ValueError(f"compare_blind takes a full and a blind evaluation of one split; got "
                         f"{full.get('images')} {full['task']}/{full['split']} and "
                         f"{blind.get('images')} {blind['task']}/{blind['split']}")
    a, b = _rows(full), _rows(blind)
    width = max(len(k) for k in a) + 2
    lines = [f"{full['name']} {full['task']}/{full['split']}, {full['samples']} samples: accuracy (%)",
             f"{'':<{width}}{'full':>8}{'blind':>8}{'full-blind':>12}"]
    lines += [f"{k:<{width}}{a[k]:>8.2f}{b[k]:>8.2f}{a[k] - b[k]:>12.2f}" for k in a if k in b]
    return "\n".join(lines)
