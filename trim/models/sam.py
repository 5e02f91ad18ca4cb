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

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import Tensor, nn

from trim.models.config import ModelConfig, SamDecoderConfig, SamEncoderConfig, SamTrimConfig, TrimConfig
from trim.models.sam_prompts import decode_batch
from trim.nn import WindowBlock, WindowGeometry, WindowSlots
from trim.prune import BigLittleRouter, WindowTokenTrimmer, little_from_big
from trim.prune.cost import conv_flops, router_flops, token_trimmer_flops, window_block_flops
from trim.prune.stack import check_mode, trimmer_decision


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


@dataclass
class EncoderOutput:
    embeddings: Tensor  # (B, out_chans, grid, grid)
    cost_ratio: Tensor  # (B,) encoder FLOPs vs the untrimmed encoder; expected (differentiable) with trim="train"


class SamImageEncoder(nn.Module):
    """SAM's ViT image encoder: pixels (B, C, S, S) -> image embedding (B, out_chans, S / patch, S / patch).

    With ``trim`` (`SamTrimConfig`) it also holds window-wise token trimmers
    (`trim.prune.WindowTokenTrimmer`, in ``token_trimmers``, keyed by the block they precede) and
    big.LITTLE routers (`trim.prune.BigLittleRouter`, in ``routers``, keyed by the block they
    route). The blocks keep their names, so SAM checkpoints load into a trimmed encoder unchanged;
    after loading pretrained blocks, `init_little_from_big` rebuilds the E-blocks from them.

    ``forward(pixels, trim=...)``: ``off`` runs SAM's encoder as it is. Otherwise the blocks
    before the first trimmer or router run on the grid, and from there on the tokens travel in
    the window-slot layout (`trim.nn.WindowSlots`): masked in ``train`` / ``masked``, gathered in
    ``eval``; pruned tokens rejoin the grid before the neck.
    """

    def __init__(self, cfg: SamEncoderConfig, trim: SamTrimConfig | None = None, trimmers: TrimConfig | None = None,
                 prompt_dim: int | None = None) -> None:
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
        self.geometry = WindowGeometry(cfg.grid, cfg.grid, cfg.window_size)
        trim, trimmers = trim or SamTrimConfig(), trimmers or TrimConfig()
        self.token_trimmers = nn.ModuleDict({
            str(i): WindowTokenTrimmer(cfg.width, prompt_dim if trim.prompt_aware else None, hidden=trimmers.hidden,
                                       min_keep=trimmers.min_keep_tokens, init_logit=trimmers.init_keep_logit)
            for i in trim.token_layers})
        for trimmer in self.token_trimmers.values():
            trimmer.forced_ratio = trim.token_keep
        self.routers = nn.ModuleDict({
            str(i): BigLittleRouter(self.blocks[i], keep=trim.route_keep, width=trim.little_width,
                                    gamma_init=trim.gamma_init) for i in trim.route_layers})

    @property
    def prompt_aware(self) -> bool:
        return any(t.cross is not None for t in self.token_trimmers.values())

    def init_little_from_big(self) -> None:
        """Rebuild every router's E-block from its (now loaded) P-block (`trim.prune.little_from_big`)."""
        for key, router in self.routers.items():
            little_from_big(router.little, self.blocks[int(key)])

    def embed(self, pixels: Tensor) -> Tensor:
        """Patch tokens as a (B, grid, grid, width) map, position embedding added."""
        size = self.cfg.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (self.cfg.channels, size, size):
            raise ValueError(f"pixels of shape {tuple(pixels.shape)}; this encoder takes (B, {self.cfg.channels}, "
                             f"{size}, {size}) (resize and pad images to image_size={size})")
        x = self.patch_embed(pixels).permute(0, 2, 3, 1)
        return x if self.pos_embed is None else x + self.pos_embed.to(x.dtype)

    # -- cost ---------------------------------------------------------------------------
    def plain_block_flops(self, block: WindowBlock) -> int:
        """FLOPs of a block on the whole grid as SAM runs it (windowed attention over padded windows)."""
        g = self.geometry
        if block.window_size:
            return window_block_flops(block, g.count, g.size, mlp_tokens=g.height * g.width)
        return window_block_flops(block, 1, g.height * g.width)

    def full_flops(self) -> int:
        """FLOPs of the untrimmed encoder on one image: patch embedding, blocks, neck."""
        g = self.cfg.grid
        ends = [conv_flops(conv, g, g) for conv in (self.patch_embed, self.neck.conv1, self.neck.conv2)]
        return sum(ends) + sum(self.plain_block_flops(block) for block in self.blocks)

    # -- forward ------------------------------------------------------------------------
    def forward(self, pixels: Tensor, *, trim: str = "off", tau: float = 1.0,
                prompt: Tensor | None = None) -> EncoderOutput:
        """``prompt`` (B, out_chans): the pooled prompt embedding prompt-aware trimmers read."""
        check_mode(trim)
        x = self.embed(pixels)
        b = x.shape[0]
        special = [] if trim == "off" else sorted(int(i) for i in [*self.token_trimmers, *self.routers])
        if not special:
            for block in self.blocks:
                x = block(x)
            return EncoderOutput(self.neck(x), x.new_ones(b))
        full = self.full_flops()
        spent: Tensor | float = full - sum(self.plain_block_flops(block) for block in self.blocks[special[0]:])
        for block in self.blocks[:special[0]]:
            x = block(x)
        slots = WindowSlots.start(x, self.geometry, physical=trim == "eval", soft=trim == "train")
        g = self.geometry
        real_per_window = g.real_per_window(x.device).to(x.dtype)
        per_window = x.new_full((b,), float(g.size))  # alive slots per window, as the cost counts them
        for i in range(special[0], len(self.blocks)):
            block, key = self.blocks[i], str(i)
            if key in self.token_trimmers:
                trimmer = self.token_trimmers[key]
                spent = spent + token_trimmer_flops(trimmer, per_window * g.count)
                step = trimmer(slots, prompt, decision=trimmer_decision(trim), tau=tau)
                slots = slots.prune(step.keep)
                per_window = step.cost_count if trim != "eval" else x.new_full((b,), float(slots.x.shape[2]))
            groups = slots.windows() if block.window_size else slots.image()
            count, n = (g.count, per_window) if block.window_size else \
                (1, torch.minimum(per_window[:, None], real_per_window).sum(1))
            if trim == "eval" and not block.window_size:
                n = x.new_full((b,), float(groups.x.shape[1]))  # what ran: padded to the batch's largest
            if key in self.routers:
                y = self.routers[key](block, groups)
                spent = spent + router_flops(self.routers[key], block, count, n)
            else:
                y = block.forward_groups(groups.x, positions=groups.positions, keys=groups.keys,
                                         padding=groups.padding, update=groups.update)
                spent = spent + window_block_flops(block, count, n)
            slots = slots.put(groups, y)
        return EncoderOutput(self.neck(slots.to_grid()), spent / full)


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
    image_embeddings: Tensor  # (B, out_chans, grid, grid); prompt-aware trimming: (B * P, ...), image-major
    cost_ratio: Tensor  # (B,) encoder FLOPs vs the untrimmed encoder (1 with trim="off"); expected with "train"


class Sam(nn.Module):
    """SAM-style model: ``forward(images, boxes=..., points=..., point_labels=..., trim=..., tau=...) -> SamOutput``.

    ``trim``: ``"off"`` (SAM as it is: the teacher), ``"train"`` (Gumbel decisions, masked
    layout, expected cost with gradients), ``"masked"`` (deterministic decisions, masked layout)
    or ``"eval"`` (deterministic decisions, kept tokens gathered: the fast path); ``tau``: the
    Gumbel temperature in ``"train"``. Trimmers and routers are placed by ``model.sam.trim``
    (`SamTrimConfig`); without any, every mode is ``"off"``.

    What the segmentation objective reads: ``masks`` / ``iou`` (the decoder's), ``cost_ratio``
    (per image, for the cost loss) and ``image_embeddings`` (the encoder's features: distil them
    toward a trim="off" pass of the same model with `trim.prune.feature_distillation`).

    Prompt-aware trimming (``model.sam.trim.prompt_aware``): the trimmers read the pooled prompt
    embedding (the mean of the prompt encoder's sparse embeddings of a box and/or points), so the
    image embedding depends on the prompt: each of an image's P prompts gets its own encoder pass
    (``image_embeddings`` is then (B * P, ...), image-major, and ``cost_ratio`` the mean of the
    image's passes, each relative to one full pass). Worth it for interactive, one prompt per image
    use; many prompts per image pay P encoder passes where prompt-free trimming pays one.
    """

    # Budget calibration (`trim.prune.calibrate`): not fitted for the sam family yet.
    calibration = None

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.image_encoder = SamImageEncoder(cfg.sam.encoder, cfg.sam.trim, cfg.trim,
                                             prompt_dim=cfg.sam.encoder.out_chans)
        self.prompt_encoder, self.mask_decoder = prompt_modules(cfg.sam.encoder, cfg.sam.decoder)

    def image_embeddings(self, images: Tensor) -> Tensor:
        """Normalised pixels (B, C, S, S) -> image embeddings (B, out_chans, grid, grid), untrimmed."""
        return self.image_encoder(images).embeddings

    def forward(self, images: Tensor, *, boxes: Tensor | None = None, points: Tensor | None = None,
                point_labels: Tensor | None = None, multimask_output: bool = False, trim: str = "off",
                tau: float = 1.0) -> SamOutput:
        prompts = dict(boxes=boxes, points=points, point_labels=point_labels, multimask_output=multimask_output)
        if trim == "off" or not self.image_encoder.prompt_aware:
            encoded = self.image_encoder(images, trim=trim, tau=tau)
            out = self.predict(encoded.embeddings, **prompts)
            return replace(out, cost_ratio=encoded.cost_ratio)
        # One encoder pass per prompt, conditioned on it; then each pass decodes its own prompt.
        b = images.shape[0]
        labels = _check_prompts(b, boxes, points, point_labels)
        p = (boxes if boxes is not None else points).shape[1]
        pooled = self.pooled_prompts(boxes, points, labels)
        encoded = self.image_encoder(images.repeat_interleave(p, 0), trim=trim, tau=tau, prompt=pooled.flatten(0, 1))
        one_each = {k: None if v is None else v.flatten(0, 1)[:, None]
                    for k, v in dict(boxes=boxes, points=points, point_labels=labels).items()}
        out = self.predict(encoded.embeddings, **one_each, multimask_output=multimask_output)
        return SamOutput(out.masks.view(b, p, *out.masks.shape[2:]), out.iou.view(b, p, -1), encoded.embeddings,
                         encoded.cost_ratio.view(b, p).mean(1))

    def pooled_prompts(self, boxes: Tensor | None, points: Tensor | None, labels: Tensor | None) -> Tensor:
        """(B, P, out_chans): each prompt's sparse embeddings (box corners, points) averaged."""
        b = (boxes if boxes is not None else points).shape[0]
        pooled = [self.prompt_encoder(points=None if points is None else (points[i], labels[i]),
                                      boxes=None if boxes is None else boxes[i], masks=None)[0].mean(1)
                  for i in range(b)]
        return torch.stack(pooled)

    def predict(self, image_embeddings: Tensor, *, boxes: Tensor | None = None, points: Tensor | None = None,
                point_labels: Tensor | None = None, multimask_output: bool = False) -> SamOutput:
        """Masks for P prompts per image from precomputed image embeddings (B, out_chans, grid, grid).

        ``boxes`` (B, P, 4) as (x0, y0, x1, y1) and/or ``points`` (B, P, N, 2) as (x, y), in pixels
        of the encoder's input image; ``point_labels`` (B, P, N): 1 foreground, 0 background, -1 not
        a point (default all 1). With both, each prompt is its points plus its box.
        ``multimask_output``: the 3 ambiguity masks instead of the single one.
        """
        labels = _check_prompts(image_embeddings.shape[0], boxes, points, point_labels)
        masks, ious = decode_batch(self.prompt_encoder, self.mask_decoder, image_embeddings, boxes=boxes, points=points,
                                   labels=labels, multimask_output=multimask_output)  # fmt: skip
        return SamOutput(masks, ious, image_embeddings, image_embeddings.new_ones(image_embeddings.shape[0]))


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
