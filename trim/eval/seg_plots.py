"""The figure of `trim eval --task seg`: true vs predicted masks, overlaid on their images.

One row per image: the image, its ground-truth masks, and the masks predicted from each object's
box prompt, each object in its own colour (the same colour in both panels), with its box IoU.
Drawn like `trim.eval.plots` (a ``Figure`` on the Agg canvas, no pyplot).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from trim.eval.plots import _save

# Distinct, saturated colours; objects beyond them cycle.
OBJECT_COLOURS = np.array([(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                           (70, 240, 240), (240, 50, 230), (210, 245, 60)], dtype=np.float32) / 255.0


def mask_overlay(image: np.ndarray, masks: Sequence[np.ndarray], alpha: float = 0.55) -> np.ndarray:
    """(H, W, 3) uint8 image with each (H, W) bool mask painted over it in its colour -> float RGB in [0, 1]."""
    out = image.astype(np.float32) / 255.0
    for k, mask in enumerate(masks):
        colour = OBJECT_COLOURS[k % len(OBJECT_COLOURS)]
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
    return out


def plot_seg_overlays(items: Sequence[dict[str, Any]], path: str | os.PathLike, *, title: str) -> Path:
    """``items``: dicts with ``image`` (H, W, 3) uint8, ``true`` and ``predicted`` lists of (H, W) bool
    masks (same object order), ``box_ious``. Writes the PNG and returns its path."""
    rows = len(items)
    fig = Figure(figsize=(7.5, 2.6 * rows))
    fig.suptitle(title, fontsize=10)
    for r, item in enumerate(items):
        panels = [("image", item["image"].astype(np.float32) / 255.0),
                  ("true masks", mask_overlay(item["image"], item["true"])),
                  ("predicted (box prompts)", mask_overlay(item["image"], item["predicted"]))]
        for c, (name, picture) in enumerate(panels):
            ax = fig.add_subplot(rows, 3, r * 3 + c + 1)
            ax.imshow(picture, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 2:
                name += "\nIoU " + " ".join(f"{v:.2f}" for v in item["box_ious"])
            ax.set_title(name, fontsize=8)
    return _save(fig, path)
