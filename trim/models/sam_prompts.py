"""segment-anything's prompt encoder + mask decoder on a whole batch of images at once, and how
training and evaluation prompt a SAM whose encoder may trim.

segment-anything's ``MaskDecoder`` takes one image and its P prompts per call: it repeats the
image embedding P times inside. `decode_batch` does the same computation for B images with P
prompts each in one call (the embedding of image i repeated for its own prompts), so training and
evaluation pay one decoder call per prompt round instead of B. The modules and their weights are
segment-anything's own; only the batching is trim's. Equal to the per-image calls up to float
rounding (tests/test_seg.py).
"""

from __future__ import annotations

from typing import Any

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder
from torch import Tensor


def decode_batch(prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder, image_embeddings: Tensor, *,
                 boxes: Tensor | None, points: Tensor | None, labels: Tensor | None,
                 multimask_output: bool) -> tuple[Tensor, Tensor]:
    """(B, C, h, w) embeddings + P prompts per image -> masks (B, P, M, 4h, 4w), IoU predictions (B, P, M).

    ``boxes`` (B, P, 4), ``points`` (B, P, N, 2) with ``labels`` (B, P, N), as `trim.models.sam.Sam.predict`.
    """
    b = image_embeddings.shape[0]
    p = (boxes if boxes is not None else points).shape[1]
    flat_points = None if points is None else (points.flatten(0, 1), labels.flatten(0, 1))
    flat_boxes = None if boxes is None else boxes.flatten(0, 1)
    sparse, dense = prompt_encoder(points=flat_points, boxes=flat_boxes, masks=None)
    decoder = mask_decoder
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse), dim=1)
    src = torch.repeat_interleave(image_embeddings, p, dim=0) + dense
    pos_src = prompt_encoder.get_dense_pe().expand(src.shape[0], -1, -1, -1)
    n, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos_src, tokens)
    iou_token_out, mask_tokens_out = hs[:, 0, :], hs[:, 1 : 1 + decoder.num_mask_tokens, :]
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(n, c, h, w))
    hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
                           dim=1)  # fmt: skip
    _, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.reshape(n, c, h * w)).reshape(n, -1, h, w)
    iou = decoder.iou_prediction_head(iou_token_out)
    chosen = slice(1, None) if multimask_output else slice(0, 1)  # mask 0: the single-mask output
    masks, iou = masks[:, chosen], iou[:, chosen]
    return masks.reshape(b, p, *masks.shape[1:]), iou.reshape(b, p, -1)


def encoder_trims(sam: Any) -> bool:
    """Whether the SAM's image encoder has token trimmers or big.LITTLE routers (``model.sam.trim``):
    only then do the cost and distillation terms and a full-vs-trimmed timing mean anything."""
    encoder = sam.image_encoder
    return bool(len(getattr(encoder, "token_trimmers", ())) or len(getattr(encoder, "routers", ())))


def prompt_round(sam: Any, images: Tensor, image_embeddings: Tensor, *, trim: str, tau: float = 1.0,
                 **prompts: Any) -> Any:
    """Another set of prompts for images already encoded: the mask decoder on their embeddings, or,
    when the encoder trims per prompt (prompt-aware trimming), a new encoder pass per prompt."""
    if getattr(sam.image_encoder, "prompt_aware", False) and trim != "off":
        return sam(images, trim=trim, tau=tau, **prompts)
    return sam.predict(image_embeddings, **prompts)
