"""Periodic evaluation of a SAM-style model during training: box and 1-click IoU of the val objects.

A quick, deterministic check of the run, on the val loader's first ``data.seg_objects`` objects per
image: the box prompt is the annotation's box, the click the mask's deepest interior point (the
protocol of `trim eval --task seg`, which adds N clicks, size buckets, every object and speed).
IoU is taken in the model's input frame, the decoder's low-resolution logits upsampled bilinearly
to it and thresholded at 0, as SAM post-processes its masks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trim.data.seg import deepest_points
from trim.models.sam_prompts import encoder_trims, prompt_round


def mask_ious(logits: Tensor, masks: Tensor) -> Tensor:
    """IoU of low-resolution logits (B, K, h, w), upsampled to the masks' (B, K, H, W) size, per object."""
    pred = F.interpolate(logits.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False) > 0
    gt = masks.bool()
    inter, union = (pred & gt).flatten(2).sum(-1).float(), (pred | gt).flatten(2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def seg_eval_sums(model: Any, batch: dict[str, Any], trim: str) -> dict[str, float]:
    """Sums over the batch's valid objects: box IoU, 1-click IoU, objects; and cost ratio over images.

    ``trim``: the mode the encoder runs in when it trims (``off`` otherwise)."""
    masks, valid = batch["object_masks"], batch["object_valid"]
    trim = trim if encoder_trims(model) else "off"
    out = model(batch["pixel_values"], boxes=batch["object_boxes"], trim=trim)
    box = mask_ious(out.masks[:, :, 0], masks)
    points = deepest_points(masks).unsqueeze(-2)
    labels = torch.ones(points.shape[:-1], dtype=torch.long, device=points.device)
    click = prompt_round(model, batch["pixel_values"], out.image_embeddings, trim=trim, points=points,
                         point_labels=labels, multimask_output=True)  # fmt: skip
    best = click.iou.argmax(-1)[..., None, None, None].expand(-1, -1, 1, *click.masks.shape[-2:])
    one_click = mask_ious(click.masks.gather(2, best)[:, :, 0], masks)
    w = valid.float()
    return {"box_iou": float((box * w).sum()), "click_iou": float((one_click * w).sum()), "objects": float(w.sum()),
            "cost": float(out.cost_ratio.float().sum())}
