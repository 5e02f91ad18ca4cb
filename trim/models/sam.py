"""SAM-style promptable segmentation: trim's image encoder + segment-anything's prompt encoder and mask decoder.

The image encoder (`SamImageEncoder`) is built from `trim.nn`, since it is what trimming
prunes: patch embedding, absolute position embedding, `WindowBlock`s (windowed attention with
padding to whole windows, global attention in the blocks ``global_attn_indexes``, decomposed
relative-position bias) and the conv neck. The prompt encoder and mask decoder are not pruned,
so they are segment-anything's own ``PromptEncoder`` / ``MaskDecoder`` modules, used as they are:
checkpoints of the official package load into them by name, and transformers' ``SamModel``
weights by a renaming (`trim.models.convert.sam`).

Inputs are normalised pixels at ``image_size`` (what transformers' ``SamProcessor`` and
segment-anything's ``Sam.preprocess`` produce) and prompts in that image's pixel frame, shaped
as transformers' ``SamModel`` takes them: P prompts per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import Tensor, nn

from trim.models.config import ModelConfig, SamDecoderConfig, SamEncoderConfig
from trim.nn import WindowBlock


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class Neck(nn.Module):
    """(B, H, W, width) tokens -> (B, out_chans, H, W) image embedding: 1x1 conv, norm, 3x3 conv, norm."""

    def __init__(self, width: int, out_chans: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, out_chans, kernel_size=1, bias=False)
        self.norm1 = LayerNorm2d(out_chans, eps=1e-6)
        self.conv2 = nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False)
        self.norm2 = LayerNorm2d(out_chans, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm2(self.conv2(self.norm1(self.conv1(x.permute(0, 3, 1, 2)))))


class SamImageEncoder(nn.Module):
    """SAM's ViT image encoder: pixels (B, C, S, S) -> image embedding (B, out_chans, S / patch, S / patch)."""

    def __init__(self, cfg: SamEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        grid = (cfg.grid, cfg.grid)
        self.patch_embed = nn.Conv2d(cfg.channels, cfg.width, cfg.patch_size, cfg.patch_size)
        # A from-scratch start as trim's ViT towers (SAM zero-initialises it; converted weights replace it).
        self.pos_embed = nn.Parameter(torch.randn(1, *grid, cfg.width) * 0.02) if cfg.use_abs_pos else None
        global_blocks = set(cfg.global_attn_indexes)
        self.blocks = nn.ModuleList(
            WindowBlock(cfg.width, cfg.heads, cfg.mlp_ratio, window_size=0 if i in global_blocks else cfg.window_size,
                        grid=grid, use_rel_pos=cfg.use_rel_pos, act=cfg.act, eps=cfg.eps, qkv_bias=cfg.qkv_bias)
            for i in range(cfg.depth))
        self.neck = Neck(cfg.width, cfg.out_chans)

    def embed(self, pixels: Tensor) -> Tensor:
        """Patch tokens as a (B, grid, grid, width) map, position embedding added."""
        size = self.cfg.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (self.cfg.channels, size, size):
            raise ValueError(f"pixels of shape {tuple(pixels.shape)}; this encoder takes (B, {self.cfg.channels}, "
                             f"{size}, {size}) (resize and pad images to image_size={size})")
        x = self.patch_embed(pixels).permute(0, 2, 3, 1)
        return x if self.pos_embed is None else x + self.pos_embed.to(x.dtype)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.embed(pixels)
        for block in self.blocks:
            x = block(x)
        return self.neck(x)


def prompt_modules(encoder: SamEncoderConfig, decoder: SamDecoderConfig) -> tuple[PromptEncoder, MaskDecoder]:
    """segment-anything's prompt encoder and mask decoder at these sizes."""
    dim = encoder.out_chans
    prompt = PromptEncoder(embed_dim=dim, image_embedding_size=(encoder.grid, encoder.grid),
                           input_image_size=(encoder.image_size, encoder.image_size),
                           mask_in_chans=decoder.mask_in_chans)
    two_way = TwoWayTransformer(depth=decoder.depth, embedding_dim=dim, num_heads=decoder.heads,
                                mlp_dim=decoder.mlp_dim, attention_downsample_rate=decoder.attention_downsample_rate)
    for layer in two_way.layers:
        for norm in (layer.norm1, layer.norm2, layer.norm3, layer.norm4):
            norm.eps = decoder.norm_eps
    mask = MaskDecoder(transformer_dim=dim, transformer=two_way, num_multimask_outputs=decoder.num_multimask_outputs,
                       iou_head_depth=decoder.iou_head_depth, iou_head_hidden_dim=decoder.iou_head_hidden_dim)
    return prompt, mask


@dataclass
class SamOutput:
    masks: Tensor  # (B, P, M, 4 * grid, 4 * grid) low-resolution mask logits; M = 1, or the multimask count
    iou: Tensor  # (B, P, M) predicted IoU of each mask
    image_embeddings: Tensor  # (B, out_chans, grid, grid)


class Sam(nn.Module):
    """SAM-style model: ``forward(images, boxes=..., points=..., point_labels=...) -> SamOutput``."""

    # Budget calibration (`trim.prune.calibrate`): none until the sam family has trimmers.
    calibration = None

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.image_encoder = SamImageEncoder(cfg.sam.encoder)
        self.prompt_encoder, self.mask_decoder = prompt_modules(cfg.sam.encoder, cfg.sam.decoder)

    def image_embeddings(self, images: Tensor) -> Tensor:
        """Normalised pixels (B, C, S, S) -> image embeddings (B, out_chans, grid, grid)."""
        return self.image_encoder(images)

    def forward(self, images: Tensor, *, boxes: Tensor | None = None, points: Tensor | None = None,
                point_labels: Tensor | None = None, multimask_output: bool = False) -> SamOutput:
        return self.predict(self.image_embeddings(images), boxes=boxes, points=points, point_labels=point_labels,
                            multimask_output=multimask_output)

    def predict(self, image_embeddings: Tensor, *, boxes: Tensor | None = None, points: Tensor | None = None,
                point_labels: Tensor | None = None, multimask_output: bool = False) -> SamOutput:
        """Masks for P prompts per image from precomputed image embeddings (B, out_chans, grid, grid).

        ``boxes`` (B, P, 4) as (x0, y0, x1, y1) and/or ``points`` (B, P, N, 2) as (x, y), in pixels
        of the encoder's input image; ``point_labels`` (B, P, N): 1 foreground, 0 background, -1 not
        a point (default all 1). With both, each prompt is its points plus its box.
        ``multimask_output``: the 3 ambiguity masks instead of the single one.
        """
        b = image_embeddings.shape[0]
        prompts = _check_prompts(b, boxes, points, point_labels)
        dense_pe = self.prompt_encoder.get_dense_pe()
        masks, ious = [], []
        for i in range(b):  # segment-anything's decoder takes one image and its prompts at a time
            sparse, dense = self.prompt_encoder(points=None if points is None else (points[i], prompts[i]),
                                                boxes=None if boxes is None else boxes[i], masks=None)
            m, iou = self.mask_decoder(image_embeddings=image_embeddings[i:i + 1], image_pe=dense_pe,
                                       sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                       multimask_output=multimask_output)
            masks.append(m)
            ious.append(iou)
        return SamOutput(torch.stack(masks), torch.stack(ious), image_embeddings)


def _check_prompts(batch: int, boxes: Tensor | None, points: Tensor | None, labels: Tensor | None) -> Tensor | None:
    """Check prompt shapes against a batch of ``batch`` images; the point labels (default all 1)."""
    if boxes is None and points is None:
        raise ValueError("give boxes (B, P, 4) and/or points (B, P, N, 2) to prompt the mask decoder")
    if boxes is not None and (boxes.dim() != 3 or boxes.shape[0] != batch or boxes.shape[2] != 4):
        raise ValueError(f"boxes of shape {tuple(boxes.shape)}; give (B={batch}, prompts per image, 4)")
    if points is None:
        return None
    if points.dim() != 4 or points.shape[0] != batch or points.shape[3] != 2:
        raise ValueError(f"points of shape {tuple(points.shape)}; give (B={batch}, prompts per image, points, 2)")
    if boxes is not None and boxes.shape[1] != points.shape[1]:
        raise ValueError(f"{boxes.shape[1]} boxes but {points.shape[1]} point prompts per image; each prompt pairs "
                         "its points with one box")
    if labels is None:
        return torch.ones(points.shape[:3], dtype=torch.long, device=points.device)
    if tuple(labels.shape) != tuple(points.shape[:3]):
        raise ValueError(f"point_labels of shape {tuple(labels.shape)}; give one per point {tuple(points.shape[:3])}")
    return labels
