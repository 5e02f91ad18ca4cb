"""Segmentation samples as SAM reads them: letterboxed images and masks, checked RLE, per-image objects.

SAM's preprocessing (segment-anything ``ResizeLongestSide`` + ``Sam.preprocess``): the image is
resized so its longest side is the model's ``image_size`` (aspect ratio kept), then padded at the
bottom and right to a square; the padding is zero *after* normalisation (`Collate` fills it).
Masks go through the same resize (nearest, sampling pixel centres) and padding, so a mask and its
image stay aligned pixel for pixel; boxes and points are scaled per axis.

Training reads a fixed number of objects per image (``seg_objects``): chosen at random among the
image's usable objects (a non-empty mask after the resize), seeded by (seed, epoch, sample key) so
a resumed run reads the same ones, and padded to that number with ``object_valid`` False.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

# ImageNet statistics, as fractions of 255: SAM normalises with them (segment-anything's
# pixel_mean 123.675, 116.28, 103.53 / pixel_std 58.395, 57.12, 57.375), so seg batches do too.
SAM_PIXEL_MEAN = (0.485, 0.456, 0.406)
SAM_PIXEL_STD = (0.229, 0.224, 0.225)


def letterbox_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after resizing the longest side to ``size`` (rounded as segment-anything rounds)."""
    scale = size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def letterbox_image(data: bytes, size: int) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Image bytes -> (uint8 (3, size, size) padded with zeros, resized (h, w), original (h, w)).

    Raises ``OSError`` / ``ValueError`` (PIL's) for bytes that do not decode.
    """
    image = Image.open(io.BytesIO(data))
    original = (image.height, image.width)
    resized = letterbox_shape(*original, size)
    image = image.convert("RGB")
    if (image.height, image.width) != resized:
        image = image.resize((resized[1], resized[0]), Image.BICUBIC)
    out = torch.zeros(3, size, size, dtype=torch.uint8)
    out[:, : resized[0], : resized[1]] = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    return out, resized, original


def letterbox_masks(masks: torch.Tensor, resized: tuple[int, int], size: int) -> torch.Tensor:
    """uint8 (N, h, w) -> (N, size, size): nearest resize to ``resized`` (pixel centres), zero padding."""
    out = torch.zeros(masks.shape[0], size, size, dtype=torch.uint8)
    if masks.shape[0] == 0:
        return out
    if tuple(masks.shape[1:]) != resized:
        masks = torch.nn.functional.interpolate(masks[None].float(), size=resized, mode="nearest-exact")[0]
    out[:, : resized[0], : resized[1]] = masks.to(torch.uint8)
    return out


def rle_total(counts: str | bytes | Sequence[int]) -> int | None:
    """Pixels a COCO RLE covers: the sum of its run lengths; None if the counts are malformed.

    Compressed counts (COCO's string form) store each run as 5-bit groups in characters 48..111,
    the 0x20 bit meaning "more groups follow" and the 0x10 bit of the last group the sign; runs
    after the second are stored as the difference to the run two before. pycocotools decodes a
    damaged string without complaint, so this is how a corrupt mask is told from a valid one.
    """
    if isinstance(counts, (list, tuple)):
        runs = [int(c) for c in counts]
        return sum(runs) if all(c >= 0 for c in runs) else None
    text = counts.encode("ascii", "replace") if isinstance(counts, str) else bytes(counts)
    runs: list[int] = []
    p = 0
    while p < len(text):
        value, shift, more = 0, 0, True
        while more:
            if p >= len(text) or not 48 <= text[p] < 112:
                return None
            c = text[p] - 48
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            p += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            return None
        runs.append(value)
    return sum(runs)


def choose_objects(usable: Sequence[int], count: int, *, shuffle: bool, seed: int, epoch: int, key: str) -> list[int]:
    """``count`` of the ``usable`` object indexes: the first ones, or (``shuffle``) a seeded random choice."""
    chosen = list(usable)
    if shuffle:
        rng = np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])
        chosen = [chosen[i] for i in rng.permutation(len(chosen))]
    return chosen[:count]


def pad_objects(samples: list[dict], count: int) -> dict[str, torch.Tensor]:
    """The chosen objects of each sample padded to ``count`` per image (``object_valid`` marks real ones)."""
    b = len(samples)
    size = samples[0]["masks"].shape[-1]
    masks = torch.zeros(b, count, size, size, dtype=torch.uint8)
    boxes = torch.zeros(b, count, 4)
    areas = torch.zeros(b, count)
    valid = torch.zeros(b, count, dtype=torch.bool)
    for i, s in enumerate(samples):
        n = s["masks"].shape[0]
        masks[i, :n], boxes[i, :n], areas[i, :n], valid[i, :n] = s["masks"], s["boxes"], s["areas"], True
    return {"object_masks": masks, "object_boxes": boxes, "object_areas": areas, "object_valid": valid}


def interior_depth(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of each pixel of a bool (H, W) mask to the nearest pixel outside it, the
    image border counted as outside (0 off the mask)."""
    from scipy.ndimage import distance_transform_edt

    return distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]


def deepest_point(depth: np.ndarray) -> tuple[float, float]:
    """(x, y) of the first maximum of ``depth`` in row-major order."""
    y, x = np.unravel_index(np.argmax(depth), depth.shape)
    return float(x), float(y)


def deepest_points(masks: torch.Tensor) -> torch.Tensor:
    """(..., H, W) masks -> (..., 2) xy of each mask's deepest interior point (`interior_depth`,
    `deepest_point`): the 1-click prompt of the evaluation protocol (trim.eval.metrics.seg)."""
    flat = masks.reshape(-1, *masks.shape[-2:]).bool().cpu().numpy()
    out = torch.zeros(flat.shape[0], 2)
    for i, mask in enumerate(flat):
        if mask.any():
            out[i] = torch.tensor(deepest_point(interior_depth(mask)))
    return out.reshape(*masks.shape[:-2], 2).to(masks.device)
