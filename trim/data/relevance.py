"""Relevance masks: which pixels, then which patches, a question or statement depends on.

Stored per image as a 1-bit PNG beside the sample's image (``relevance.png`` for VQA,
``left.relevance.png`` / ``right.relevance.png`` for NLVR2): the union of the instance masks
of the objects the answer depends on, at the stored image's resolution. Only the synthetic
world writes them; real shards have none, and then no relevance is decoded or reported.

A PNG keeps the shard format what it was (one more file per sample, read only when asked
for) and keeps the mask independent of any model: the patch grid is chosen at decode time.

Patch rule: a patch of a ``grid x grid`` patch grid is relevant when at least one pixel of a
relevant object lies in the part of the image that patch covers. The patch embedding is a
linear map of every pixel of its patch, so such a patch carries part of the object; a
coverage threshold would leave small objects (a small triangle straddling four 8-px patches)
with no relevant patch at all.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

RELEVANCE_FILE = "relevance.png"  # the suffix of the mask file in a sample (``<key>.relevance.png``)
PATCH_RULE = "a patch is relevant when >= 1 pixel of a relevant object lies in it"


def relevance_png(masks: np.ndarray, objects: tuple[int, ...] | list[int]) -> bytes:
    """1-bit PNG of the union of ``masks[i]`` (bool (n, H, W)) over ``objects`` (empty: all False)."""
    union = masks[list(objects)].any(0) if len(objects) else np.zeros(masks.shape[1:], dtype=bool)
    buffer = io.BytesIO()
    Image.fromarray(union).save(buffer, format="PNG")  # a bool array saves as mode "1"
    return buffer.getvalue()


def read_relevance_png(data: bytes) -> torch.Tensor:
    """bool (H, W) of a relevance PNG; ``ValueError`` / ``OSError`` if it does not decode."""
    image = Image.open(io.BytesIO(data))
    return torch.from_numpy(np.array(image.convert("L"), dtype=np.uint8) > 127)


def patch_relevance(mask: torch.Tensor, grid: int) -> torch.Tensor:
    """bool (grid * grid,) in row-major patch order (the order of the vision tokens) from a bool
    (H, W) pixel mask, by `PATCH_RULE`. The mask may have any size: each patch covers the same
    fraction of the image at any resolution, so no resize to the model's image size is needed."""
    if grid < 1:
        raise ValueError(f"grid={grid}: the patch grid needs at least one patch per side")
    pooled = F.adaptive_max_pool2d(mask[None, None].float(), grid)
    return pooled.reshape(grid * grid) > 0
