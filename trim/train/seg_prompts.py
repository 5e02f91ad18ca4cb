"""Prompts simulated from ground-truth masks for training, as SAM trains (appendix A, "Training algorithm").

* **box**: the object's box (from the annotation, in input pixels) with noise of standard deviation
  ``noise`` x the box side on each coordinate, at most ``max_noise`` pixels, clipped to the image;
* **first click**: a point drawn uniformly from the object's mask (SAM's foreground point);
* **later clicks**: a point drawn uniformly from the error region of the previous prediction,
  positive where the object was missed (false negative), negative where background was taken
  (false positive); a prediction with no error gets a "not a point" (label -1) instead.
  ``deepest`` instead places it as the evaluation does (RITM's clicker): at the deepest point of
  the larger error region, positive if that is the miss. It costs a distance transform per
  object and round on the CPU (cheap at 64 px, seconds per batch at 1024 px), and lifted the tiny
  recipe's 5-click mIoU from 0.61 to 0.70 (docs/training.md).

Evaluation uses the deterministic protocol of `trim.eval.metrics.seg` (deepest interior point,
RITM's next click); training draws at random so the model sees more than one click per object.
Points are integer pixel coordinates (x, y), as the evaluation's clicks; segment-anything's prompt
encoder moves them to the pixel centre. All draws use torch's generator, so a resumed run (whose
RNG state is restored) draws the same prompts.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def jitter_boxes(boxes: Tensor, image_size: int, *, noise: float, max_noise: float) -> Tensor:
    """(..., 4) xyxy boxes with SAM's noise; unchanged when ``noise`` is 0."""
    if noise <= 0:
        return boxes
    side = torch.stack([boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]] * 2, -1)
    offset = (torch.randn_like(boxes) * noise * side).clamp(-max_noise, max_noise)
    jittered = (boxes + offset).clamp(0, image_size)
    x0, x1 = torch.minimum(jittered[..., 0], jittered[..., 2]), torch.maximum(jittered[..., 0], jittered[..., 2])
    y0, y1 = torch.minimum(jittered[..., 1], jittered[..., 3]), torch.maximum(jittered[..., 1], jittered[..., 3])
    return torch.stack([x0, y0, x1, y1], -1)


def sample_points(region: Tensor) -> tuple[Tensor, Tensor]:
    """One pixel drawn uniformly from each (..., H, W) boolean region -> ((..., 2) xy, (...) found).

    An empty region gives (0, 0) and ``found`` False.
    """
    lead, (h, w) = region.shape[:-2], region.shape[-2:]
    flat = region.reshape(-1, h * w).float()
    found = flat.sum(-1) > 0
    # Empty rows draw from a uniform row: multinomial needs some mass, and the draw is discarded.
    weights = torch.where(found[:, None], flat, torch.ones_like(flat))
    index = torch.multinomial(weights, 1).squeeze(-1)
    xy = torch.stack([index % w, index // w], -1).float() * found[:, None]
    return xy.reshape(*lead, 2), found.reshape(lead)


def first_clicks(masks: Tensor) -> Tensor:
    """(B, K, H, W) object masks -> (B, K, 1, 2) one positive click inside each (padding objects: (0, 0))."""
    points, _ = sample_points(masks.bool())
    return points.unsqueeze(-2)


def error_clicks(pred: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """The next click from the error of ``pred`` (B, K, H, W bool) against ``masks`` -> ((B, K, 1, 2), (B, K, 1)).

    Uniform over the whole error region, labelled by the side it fell on: 1 in a false negative,
    0 in a false positive, -1 (not a point) when the prediction is exact.
    """
    gt = masks.bool()
    points, found = sample_points(pred ^ gt)
    b, k = points.shape[:2]
    ys, xs = points[..., 1].long(), points[..., 0].long()
    missed = gt.reshape(b * k, -1).gather(1, (ys * gt.shape[-1] + xs).reshape(b * k, 1)).reshape(b, k)
    labels = torch.where(found, missed.long(), torch.full_like(missed, -1, dtype=torch.long))
    return points.unsqueeze(-2), labels.unsqueeze(-1)


def deepest_error_clicks(pred: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """As `error_clicks`, the click at the deepest point of the larger error region (positive if the
    miss is deeper than the false alarm; ties negative), as the evaluation protocol clicks."""
    from trim.data.seg import deepest_point, interior_depth

    gt, pred = masks.bool().cpu().numpy(), pred.bool().cpu().numpy()
    b, k = gt.shape[:2]
    points = torch.zeros(b, k, 1, 2)
    labels = torch.full((b, k, 1), -1, dtype=torch.long)
    for i, j in np.ndindex(b, k):
        missed, taken = interior_depth(gt[i, j] & ~pred[i, j]), interior_depth(pred[i, j] & ~gt[i, j])
        if missed.max() == 0 and taken.max() == 0:
            continue
        positive = bool(missed.max() > taken.max())
        points[i, j, 0] = torch.tensor(deepest_point(missed if positive else taken))
        labels[i, j, 0] = int(positive)
    return points.to(masks.device), labels.to(masks.device)


REFINE_CLICKS = {"uniform": error_clicks, "deepest": deepest_error_clicks}
