"""Model configs: plain dataclasses that round-trip through ``config.json``.

A checkpoint's ``config.json`` holds a `ModelConfig`; `trim.models.load_model(dir)`
rebuilds the model from it with no other input.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from trim.errors import ConfigError
from trim.schema import build_dataclass

FAMILIES = ("dual", "vilt", "sam")
TASKS = ("vqa", "nlvr2", "itm", "seg")
STEMS = ("patch", "conv")


@dataclass
class VisionConfig:
    """ViT / CLIP vision tower (pre-norm)."""

    image_size: int = 64
    patch_size: int = 8
    channels: int = 3
    width: int = 64
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    act: str = "gelu"
    eps: float = 1e-6
    patch_bias: bool = True  # ViT/ViLT have a bias on the patch projection, CLIP does not
    ln_pre: bool = False  # CLIP normalises the embeddings before the first block
    ln_post: bool = True  # a final LayerNorm over every token
    # "patch": one patch_size x patch_size convolution (ViT / CLIP). "conv": a small
    # convolutional stem (log2(patch_size) stride-2 3x3 convs) with the same token grid; it
    # sees shapes inside a patch that a linear patch projection trained from scratch misses.
    stem: str = "patch"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2 + 1


@dataclass
class TextConfig:
    """BERT / RoBERTa text tower (post-norm)."""

    vocab_size: int = 512
    max_positions: int = 64
    type_vocab_size: int = 2
    width: int = 64
    layers: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    act: str = "gelu"
    eps: float = 1e-12
    pad_token_id: int = 0
    # RoBERTa numbers positions from pad_token_id + 1 and skips padding; BERT from 0.
    roberta_positions: bool = False


@dataclass
class SamEncoderConfig:
    """SAM's image encoder (ViTDet-style): a pre-norm ViT over the patch grid with windowed
    attention, global attention in the blocks ``global_attn_indexes``, and a conv neck to
    ``out_chans`` channels (the image embedding, which the mask decoder reads at that width)."""

    image_size: int = 64
    patch_size: int = 8
    channels: int = 3
    width: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    window_size: int = 3  # 0: every block attends globally
    global_attn_indexes: list[int] = field(default_factory=lambda: [1, 3])
    out_chans: int = 32
    use_rel_pos: bool = True  # decomposed relative-position bias in every block
    use_abs_pos: bool = True
    qkv_bias: bool = True
    act: str = "gelu"
    eps: float = 1e-6

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class SamDecoderConfig:
    """SAM's prompt encoder and mask decoder (segment-anything's own classes, used as they are).
    Their width, the prompt embedding dimension, is the encoder's ``out_chans``."""

    mask_in_chans: int = 16
    depth: int = 2  # two-way transformer blocks
    heads: int = 4
    mlp_dim: int = 64
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 32
    # The two-way blocks' LayerNorm eps: segment-anything's default 1e-5; transformers' SamModel
    # uses its mask_decoder_config.layer_norm_eps (1e-6) there, so a converted model keeps that.
    norm_eps: float = 1e-5


@dataclass
class SamTrimConfig:
    """Pruning of the SAM image encoder (docs/design.md, SAM section). Block indices are 0-based.

    The trimmers' width, minimum kept tokens and starting logit are model.trim's ``hidden``,
    ``min_keep_tokens`` (per window) and ``init_keep_logit``."""

    token_layers: list[int] = field(default_factory=list)  # a window-wise token trimmer before each of these blocks
    token_keep: float | None = None  # a fixed share of each window's tokens to keep; None: a learned count per image
    prompt_aware: bool = False  # token trimmers also read the pooled prompt embedding (image embedding per prompt)
    route_layers: list[int] = field(default_factory=list)  # big.LITTLE blocks (never block 0)
    route_keep: float = 0.25  # share of each window's tokens (an image's, in global blocks) the P-block updates
    little_width: float = 0.25  # E-block width / encoder width (in whole heads)
    gamma_init: float = 1e-4  # E-block fusion scale at the start: tiny, so a routed block starts near the full one


@dataclass
class SamConfig:
    encoder: SamEncoderConfig = field(default_factory=SamEncoderConfig)
    decoder: SamDecoderConfig = field(default_factory=SamDecoderConfig)
    trim: SamTrimConfig = field(default_factory=SamTrimConfig)


@dataclass
class TrimConfig:
    """Where trimmers sit. Layer indices are 0-based within each stack."""

    vision_token_layers: list[int] = field(default_factory=list)
    vision_head_layers: list[int] = field(default_factory=list)
    text_token_layers: list[int] = field(default_factory=list)
    text_head_layers: list[int] = field(default_factory=list)
    cross_token_layers: list[int] = field(default_factory=list)  # both streams of these cross layers
    cross_head_layers: list[int] = field(default_factory=list)  # self- and cross-attention heads
    min_keep_tokens: int = 1
    min_keep_heads: int = 1
    hidden: int | None = None  # trimmer width (default: width / 8)
    init_keep_logit: float = 3.0  # sigmoid(3) = 0.95: a fresh trimmer keeps (almost) everything
    # which trimmers sit there: SmartTrim's or a baseline's (trim.prune.policies); recipes set it
    # from objective.method, and the checkpoint keeps it so trim.load rebuilds the same trimmers
    policy: str = "smarttrim"


@dataclass
class ModelConfig:
    family: str = "dual"
    task: str = "vqa"
    num_labels: int = 16
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # dual-stream only: the co-attention layers and their width
    cross_layers: int = 2
    cross_width: int = 64
    cross_heads: int = 4
    # BridgeTower: uni-modal layers whose outputs feed the cross layers (empty = METER)
    bridge_layers: list[int] = field(default_factory=list)
    trim: TrimConfig = field(default_factory=TrimConfig)
    # ViLT: the sequence is one stack; vision.* gives its size and patches, text.* its embeddings
    max_images: int = 2
    # family "sam" (task "seg"): image encoder, prompt encoder and mask decoder; vision/text unused
    sam: SamConfig = field(default_factory=SamConfig)

    def _validate_stem(self) -> None:
        stem, patch = self.vision.stem, self.vision.patch_size
        if stem not in STEMS:
            raise ConfigError(f"model.vision.stem={stem!r}; choose one of {STEMS}")
        if stem == "conv" and (patch < 2 or patch & (patch - 1)):
            raise ConfigError(f"model.vision.stem='conv' halves the image log2(patch_size) times, so "
                              f"model.vision.patch_size={patch} must be a power of two (4, 8, 16, ...)")
        if stem == "conv" and self.family != "dual":
            raise ConfigError(f"model.vision.stem='conv' is built for the dual-stream family; "
                              f"model.family={self.family!r} embeds patches itself: use stem 'patch'")

    def validate(self) -> "ModelConfig":
        if self.family not in FAMILIES:
            raise ConfigError(f"model.family={self.family!r}; choose one of {FAMILIES}")
        if self.task not in TASKS:
            raise ConfigError(f"model.task={self.task!r}; choose one of {TASKS}")
        if (self.family == "sam") != (self.task == "seg"):
            raise ConfigError(f"model.family={self.family!r} with model.task={self.task!r}: the sam family predicts "
                              "masks (task 'seg'), and only it does")
        if self.family == "sam":
            self._validate_sam()
        if self.num_labels < 1:
            raise ConfigError(f"model.num_labels={self.num_labels} must be >= 1")
        if self.vision.image_size % self.vision.patch_size:
            raise ConfigError(f"model.vision.image_size={self.vision.image_size} is not a multiple of "
                              f"model.vision.patch_size={self.vision.patch_size}")
        self._validate_stem()
        depths = {"vision": self.vision.layers, "text": self.text.layers,
                  "cross": self.cross_layers if self.family == "dual" else 0}
        for stack, depth in depths.items():
            for kind in ("token", "head"):
                key = f"{stack}_{kind}_layers"
                for i, layer in enumerate(getattr(self.trim, key)):
                    if not 0 <= layer < depth:
                        where = f"the {stack} stack has {depth} layers" + (f" (0..{depth - 1})" if depth else "")
                        raise ConfigError(f"model.trim.{key}[{i}]={layer} but {where}")
        if self.family == "vilt":
            self._validate_vilt()
        if self.trim.min_keep_tokens < 1 or self.trim.min_keep_heads < 1:
            raise ConfigError("model.trim.min_keep_tokens and min_keep_heads must be >= 1")
        self._validate_policy()
        towers = min(self.vision.layers, self.text.layers)
        for i, layer in enumerate(self.bridge_layers):
            if not 0 <= layer < towers:
                raise ConfigError(f"model.bridge_layers[{i}]={layer} but the towers have {self.text.layers} (text) and "
                                  f"{self.vision.layers} (vision) layers; a bridge reads layer 0..{towers - 1} of both")
        if len(self.bridge_layers) not in (0, self.cross_layers):
            raise ConfigError(f"model.bridge_layers has {len(self.bridge_layers)} entries; give one uni-modal "
                              f"layer per cross layer ({self.cross_layers}) or none")
        return self

    def _validate_sam(self) -> None:
        enc, dec = self.sam.encoder, self.sam.decoder
        if enc.image_size % enc.patch_size:
            raise ConfigError(f"model.sam.encoder.image_size={enc.image_size} is not a multiple of "
                              f"model.sam.encoder.patch_size={enc.patch_size}")
        if enc.width % enc.heads:
            raise ConfigError(f"model.sam.encoder.width={enc.width} is not divisible by heads={enc.heads}")
        if enc.window_size < 0:
            raise ConfigError(f"model.sam.encoder.window_size={enc.window_size}; give a window size, or 0 for "
                              "global attention in every block")
        for i, layer in enumerate(enc.global_attn_indexes):
            if not 0 <= layer < enc.depth:
                raise ConfigError(f"model.sam.encoder.global_attn_indexes[{i}]={layer} but the encoder has "
                                  f"{enc.depth} blocks (0..{enc.depth - 1})")
        if enc.out_chans % 8:
            raise ConfigError(f"model.sam.encoder.out_chans={enc.out_chans}: the mask decoder upscales to "
                              "out_chans / 8 channels; give a multiple of 8")
        inner = enc.out_chans // dec.attention_downsample_rate
        if enc.out_chans % dec.heads or inner % dec.heads:
            raise ConfigError(f"model.sam.decoder.heads={dec.heads} must divide out_chans={enc.out_chans} and "
                              f"out_chans / attention_downsample_rate={inner}")
        if dec.mask_in_chans % 4:
            raise ConfigError(f"model.sam.decoder.mask_in_chans={dec.mask_in_chans} must be a multiple of 4")
        trimmed = [k for k, v in dataclasses.asdict(self.trim).items() if k.endswith("_layers") and v]
        if trimmed:
            raise ConfigError(f"model.trim.{trimmed[0]}={getattr(self.trim, trimmed[0])}: the sam family places its "
                              "trimmers in model.sam.trim (token_layers, route_layers); leave model.trim's layer "
                              "lists empty")
        self._validate_sam_trim()

    def _validate_sam_trim(self) -> None:
        enc, trim = self.sam.encoder, self.sam.trim
        for key in ("token_layers", "route_layers"):
            layers = getattr(trim, key)
            for i, layer in enumerate(layers):
                if not 0 <= layer < enc.depth:
                    raise ConfigError(f"model.sam.trim.{key}[{i}]={layer} but the encoder has {enc.depth} blocks "
                                      f"(0..{enc.depth - 1})")
            if len(set(layers)) != len(layers):
                raise ConfigError(f"model.sam.trim.{key}={layers} names a block twice; give each block once")
        if 0 in trim.route_layers:
            raise ConfigError("model.sam.trim.route_layers contains 0: the first block stays full (the predictor "
                              "scores features a full block made); route blocks 1 and later")
        if trim.token_keep is not None and not 0 < trim.token_keep <= 1:
            raise ConfigError(f"model.sam.trim.token_keep={trim.token_keep}: give a share in (0, 1], or null for a "
                              "learned count")
        if not 0 < trim.route_keep <= 1:
            raise ConfigError(f"model.sam.trim.route_keep={trim.route_keep}: give the share of tokens the P-block "
                              "updates, in (0, 1] (bLViT: 0.25)")
        heads = enc.heads * trim.little_width
        if not 0 < trim.little_width < 1 or abs(heads - round(heads)) > 1e-6 or round(heads) < 1:
            raise ConfigError(f"model.sam.trim.little_width={trim.little_width}: the E-block keeps whole heads, so "
                              f"give a share in (0, 1) with heads x share a whole number (heads={enc.heads}; e.g. "
                              f"{1 / enc.heads:g} per head)")
        if trim.gamma_init < 0:
            raise ConfigError(f"model.sam.trim.gamma_init={trim.gamma_init} must be >= 0 (tiny: 1e-4)")
        if trim.prompt_aware and not trim.token_layers:
            raise ConfigError("model.sam.trim.prompt_aware=true but model.sam.trim.token_layers is empty: the prompt "
                              "conditions token trimmers; place some")

    def _validate_policy(self) -> None:
        from trim.prune.policies import HEAD_POLICIES, POLICIES, TOKEN_ONLY_POLICIES

        policy, t = self.trim.policy, self.trim
        if policy not in POLICIES:
            raise ConfigError(f"model.trim.policy={policy!r}; choose one of {', '.join(POLICIES)} "
                              "(objective.method sets it in a recipe)")
        tokens = t.vision_token_layers or t.text_token_layers or t.cross_token_layers
        heads = t.vision_head_layers or t.text_head_layers or t.cross_head_layers
        if policy in TOKEN_ONLY_POLICIES and not tokens:
            raise ConfigError(f"model.trim.policy={policy!r} prunes tokens only (every head is kept), but model.trim "
                              "places no token trimmers; add layers to model.trim.vision_token_layers / "
                              "cross_token_layers / text_token_layers")
        if policy in HEAD_POLICIES and not heads:
            raise ConfigError(f"model.trim.policy={policy!r} replaces SmartTrim's head trimmers, but model.trim places "
                              "none; add layers to model.trim.cross_head_layers / vision_head_layers / text_head_layers")
        if policy == "evit" and self.bridge_layers:
            raise ConfigError("model.trim.policy='evit' with model.bridge_layers: BridgeTower's bridges read each cross "
                              "token's uni-modal value by its original position, and EViT's fused token has none; "
                              "use a METER-style model (model.bridge_layers: []) or another method")

    def _validate_vilt(self) -> None:
        if self.trim.text_token_layers or self.trim.text_head_layers:
            raise ConfigError("model.trim.text_*_layers: ViLT is one stack; put its trimmers in vision_*_layers")
        if self.text.width != self.vision.width:
            raise ConfigError(f"model.text.width={self.text.width} but model.vision.width={self.vision.width}: ViLT is "
                              "one stream, its text embeddings must have the stack's width")
        if self.task == "nlvr2" and self.max_images < 2:
            raise ConfigError(f"model.max_images={self.max_images}: ViLT for NLVR2 embeds two images; set it to 2")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "model") -> "ModelConfig":
        """Build and validate from plain data (``config.json``'s ``model`` section, a recipe's)."""
        return build_dataclass(cls, data, where).validate()
