"""open_clip towers -> trim modules, proven equal to their source (invariant 2); and METER.

Loading goes through open_clip's own factory, ``open_clip.create_model(name,
pretrained=...)``, so a user's open_clip name, tag (downloaded once by open_clip, then its
cache) or local state-dict path means here exactly what it means in open_clip; ``local-dir:``
and ``hf-hub:`` names work too (open_clip ignores ``pretrained`` for those).

Public API
----------
``load_open_clip(name, pretrained=None, **create_kwargs)``
    the open_clip model itself, in eval mode.
``vision_tower_from_open_clip(visual) -> (VisionConfig, state_dict)``
    a `VisionTower` state dict from ``model.visual`` (no projection: see `ClipTowers`).
``clip_text_tower_from_open_clip(model) -> (ClipTextConfig, state_dict)``
    a `ClipTextTower` state dict from a ``CLIP`` or ``CustomTextCLIP`` model.
``convert_open_clip(name, *, pretrained=None, trim=None, image_size=None, text=True) -> ClipTowers``
    what ``trim.models.from_pretrained("open_clip:<name>", pretrained=...)`` returns: both
    towers plus the projections and logit scale, with ``encode_image`` / ``encode_text``
    matching open_clip's (1e-4) when ``trim="off"``. `ClipTowers` is an ``nn.Module``, not a
    VQA/NLVR2 `TrimModel`: CLIP has no task head. Build a VL model with `build_meter`.
``build_meter(vision="open_clip:ViT-B-16", text="roberta-base", ...) -> DualStreamModel``
    METER's recipe: a CLIP-ViT vision tower and a RoBERTa (or BERT) text tower converted
    from their checkpoints, co-attention layers, projections, poolers and head freshly
    initialised as METER initialises them.

Supported open_clip vision towers: ``VisionTransformer`` with a class token and learnable
(or fixed sin-cos, copied as a parameter) position embeddings, square images and patches,
default attention blocks, with or without ``ln_pre``; ``pool_type`` "tok" or "avg" and
``final_ln_after_pool`` (honoured by `ClipTowers`; `VisionTower` itself, as METER, applies
``ln_post`` to every token). Layer scale is folded into the output projections (exact).
``patch_dropout`` is a training-time regulariser that open_clip disables in eval mode, so
it is dropped (trim's token trimmers take its place). Refused with a `ConfigError` that
says why: attentional poolers (CoCa), ``pool_type="none"``, custom blocks (qk-norm, scaled
cosine attention, NormFormer scaling), ModifiedResNet and timm towers, non-square inputs.
Text towers: open_clip's ``TextTransformer`` (causal or not; pooled by argmax / eos /
first / last; linear projection with or without bias, or none); refused: HF text encoders
(convert those with `trim.models.convert.roberta`), CoCa's appended class token, key
padding masks (``use_pad_mask``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trim.errors import CheckpointError, ConfigError
from trim.models.clip_text import ClipTextConfig, ClipTextTower
from trim.models.config import ModelConfig, TrimConfig, VisionConfig
from trim.schema import build_dataclass
from trim.models.convert.common import square_size
from trim.models.io import load_weights, trimmer_keys
from trim.models.towers import VisionTower
from trim.nn.mlp import ACTIVATIONS
from trim.prune import CostMeter, LayerRecord, start_tokens

PREFIX = "open_clip:"
VISION_POOLS = ("tok", "avg")


# -- loading -----------------------------------------------------------------------------
def load_open_clip(name: str, pretrained: str | None = None, **create_kwargs: Any) -> nn.Module:
    """``open_clip.create_model(name, pretrained=pretrained, **create_kwargs)`` in eval mode.

    ``pretrained``: an open_clip tag (e.g. ``"openai"``, ``"laion2b_s34b_b88k"``; needs the
    network or open_clip's cache) or a local state-dict file. ``None`` gives random weights.
    """
    import open_clip

    name = name.removeprefix(PREFIX)
    try:
        model = open_clip.create_model(name, pretrained=pretrained, **create_kwargs)
    except RuntimeError as err:
        raise CheckpointError(f"open_clip could not create {name!r} with pretrained={pretrained!r}: {err}. "
                              f"Offline, pass a local state-dict path as pretrained (or a local-dir: name); "
                              f"a custom architecture needs open_clip.add_model_config(<json>) first") from err
    return model.eval()


# -- helpers -----------------------------------------------------------------------------
def _activation(module: nn.Module, where: str) -> str:
    from open_clip.transformer import QuickGELU

    if isinstance(module, QuickGELU):
        return "quick_gelu"
    if isinstance(module, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}[module.approximate]
    if isinstance(module, nn.ReLU):
        return "relu"
    raise ConfigError(f"{where}: activation {type(module).__name__} has no trim equivalent "
                      f"(trim.nn.mlp.ACTIVATIONS: {', '.join(sorted(ACTIVATIONS))})")


def mlp_ratio(width: int, hidden: int) -> float:
    """A ratio with int(width * ratio) == hidden, as trim's blocks size their MLP."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def _eps(norms: list[nn.Module], where: str) -> float:
    eps = {float(n.eps) for n in norms if isinstance(n, nn.LayerNorm)}
    if len(eps) != 1:
        raise ConfigError(f"{where}: LayerNorms with different eps {sorted(eps)}; trim's towers use one eps")
    return eps.pop()


def _blocks(transformer: nn.Module, where: str) -> list[nn.Module]:
    """open_clip's resblocks, checked to be the plain pre-norm block trim's PreNormBlock is."""
    from open_clip.transformer import ResidualAttentionBlock

    blocks = list(transformer.resblocks)
    for i, blk in enumerate(blocks):
        if not isinstance(blk, ResidualAttentionBlock):
            raise ConfigError(f"{where}.resblocks[{i}] is a {type(blk).__name__} (qk_norm / scaled cosine "
                              f"attention / scale_attn / scale_fc / scale_heads); trim converts the default "
                              f"CLIP block only")
        attn = blk.attn
        if (not attn._qkv_same_embed_dim or attn.in_proj_bias is None or attn.bias_k is not None
                or attn.add_zero_attn or attn.out_proj.bias is None):
            raise ConfigError(f"{where}.resblocks[{i}].attn is not a standard biased fused-qkv "
                              f"nn.MultiheadAttention; trim cannot convert it")
        if hasattr(blk, "ln_1_kv"):
            raise ConfigError(f"{where}.resblocks[{i}] is a cross-attention block; not a CLIP encoder tower")
    return blocks


def _block_state(blk: nn.Module, prefix: str) -> dict[str, Tensor]:
    """One open_clip ResidualAttentionBlock -> trim PreNormBlock parameters (layer scale folded in)."""
    from open_clip.transformer import LayerScale

    def gamma(ls: nn.Module) -> Tensor | None:
        return ls.gamma.detach() if isinstance(ls, LayerScale) else None

    out_w, out_b = blk.attn.out_proj.weight.detach(), blk.attn.out_proj.bias.detach()
    fc2_w, fc2_b = blk.mlp.c_proj.weight.detach(), blk.mlp.c_proj.bias.detach()
    # x + g * (W h + b) == x + (g W) h + g b: layer scale is a per-channel scale of the output projection.
    if (g := gamma(blk.ls_1)) is not None:
        out_w, out_b = out_w * g[:, None], out_b * g
    if (g := gamma(blk.ls_2)) is not None:
        fc2_w, fc2_b = fc2_w * g[:, None], fc2_b * g
    return {
        f"{prefix}norm1.weight": blk.ln_1.weight, f"{prefix}norm1.bias": blk.ln_1.bias,
        # nn.MultiheadAttention's in_proj is [q; k; v] with heads contiguous: trim's fused qkv layout.
        f"{prefix}attn.qkv.weight": blk.attn.in_proj_weight, f"{prefix}attn.qkv.bias": blk.attn.in_proj_bias,
        f"{prefix}attn.proj.weight": out_w, f"{prefix}attn.proj.bias": out_b,
        f"{prefix}norm2.weight": blk.ln_2.weight, f"{prefix}norm2.bias": blk.ln_2.bias,
        f"{prefix}mlp.fc1.weight": blk.mlp.c_fc.weight, f"{prefix}mlp.fc1.bias": blk.mlp.c_fc.bias,
        f"{prefix}mlp.fc2.weight": fc2_w, f"{prefix}mlp.fc2.bias": fc2_b,
    }


def _detached(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


# -- vision ------------------------------------------------------------------------------
def vision_tower_from_open_clip(visual: nn.Module) -> tuple[VisionConfig, dict[str, Tensor]]:
    """``model.visual`` (open_clip ``VisionTransformer``) -> `VisionTower` config and state dict.

    The state dict holds every `VisionTower` backbone parameter (no trimmers, no projection:
    ``visual.proj`` is `ClipTowers.visual_proj`).
    """
    from open_clip.transformer import VisionTransformer

    where = "open_clip visual"
    if not isinstance(visual, VisionTransformer):
        raise ConfigError(f"{where} is a {type(visual).__name__}; trim converts open_clip's ViT "
                          f"(VisionTransformer) towers, not ModifiedResNet or timm towers")
    if visual.attn_pool is not None:
        raise ConfigError(f"{where} has an attentional pooler (CoCa-style); trim's VisionTower pools the "
                          f"class token, so this tower cannot be converted")
    if visual.pool_type not in VISION_POOLS:
        raise ConfigError(f"{where}.pool_type={visual.pool_type!r}; trim converts 'tok' and 'avg' pooling")
    blocks = _blocks(visual.transformer, f"{where}.transformer")
    conv = visual.conv1
    image_size = square_size(visual.image_size, f"{where}.image_size")
    patch = square_size(visual.patch_size, f"{where}.patch_size")
    width = conv.out_channels
    norms = [visual.ln_pre, visual.ln_post] + [n for b in blocks for n in (b.ln_1, b.ln_2)]
    cfg = VisionConfig(
        image_size=image_size, patch_size=patch, channels=conv.in_channels, width=width, layers=len(blocks),
        heads=blocks[0].attn.num_heads, mlp_ratio=mlp_ratio(width, blocks[0].mlp.c_fc.out_features),
        act=_activation(blocks[0].mlp.gelu, f"{where} MLP"), eps=_eps(norms, where), patch_bias=False,
        ln_pre=isinstance(visual.ln_pre, nn.LayerNorm), ln_post=True)
    pos = visual.positional_embedding
    if pos.shape[0] != cfg.num_tokens:
        raise ConfigError(f"{where}: {pos.shape[0]} position embeddings for {cfg.num_tokens} tokens "
                          f"(class token + {cfg.grid}x{cfg.grid} patches); is there no class token?")
    state = {"embed.proj.weight": conv.weight, "embed.cls_token": visual.class_embedding.reshape(1, 1, width),
             "embed.pos_embed": pos.reshape(1, -1, width),
             "ln_post.weight": visual.ln_post.weight, "ln_post.bias": visual.ln_post.bias}
    if cfg.ln_pre:
        state.update({"ln_pre.weight": visual.ln_pre.weight, "ln_pre.bias": visual.ln_pre.bias})
    for i, blk in enumerate(blocks):
        state.update(_block_state(blk, f"stack.blocks.{i}."))
    return cfg, _detached(state)


# -- text --------------------------------------------------------------------------------
def clip_text_tower_from_open_clip(model: nn.Module) -> tuple[ClipTextConfig, dict[str, Tensor]]:
    """The text half of an open_clip ``CLIP`` / ``CustomTextCLIP`` -> `ClipTextTower` config and state."""
    from open_clip.transformer import TextTransformer

    where = "open_clip text tower"
    text = getattr(model, "text", None)
    if text is not None:  # CustomTextCLIP keeps a whole text module
        if not isinstance(text, TextTransformer):
            raise ConfigError(f"{where} is a {type(text).__name__} (a Hugging Face text encoder); convert its "
                              f"transformers checkpoint with trim.models.convert.roberta instead")
        if text.cls_emb is not None:
            raise ConfigError(f"{where} appends a class token (CoCa); trim's ClipTextTower does not")
        if text.use_pad_mask:
            raise ConfigError(f"{where} masks padding keys (use_pad_mask); trim's ClipTextTower does not")
        pool, eos_id = text.pool_type, text.eos_id
    else:  # CLIP flattens the text tower into the model
        text = model
        pool, eos_id = model.text_pool_type, getattr(model, "text_eos_id", 2)
    if pool not in ("argmax", "eos", "first", "last"):
        raise ConfigError(f"{where}.pool_type={pool!r}; trim pools one token (argmax / eos / first / last)")
    blocks = _blocks(text.transformer, f"{where}.transformer")
    width = text.token_embedding.embedding_dim
    proj = text.text_projection
    if isinstance(proj, nn.Linear):
        output_dim, proj_bias = proj.out_features, proj.bias is not None
    elif proj is None:
        output_dim, proj_bias = None, False
    else:
        output_dim, proj_bias = proj.shape[1], False
    norms = [text.ln_final] + [n for b in blocks for n in (b.ln_1, b.ln_2)]
    cfg = ClipTextConfig(
        vocab_size=text.token_embedding.num_embeddings, context_length=text.positional_embedding.shape[0],
        width=width, layers=len(blocks), heads=blocks[0].attn.num_heads,
        mlp_ratio=mlp_ratio(width, blocks[0].mlp.c_fc.out_features),
        act=_activation(blocks[0].mlp.gelu, f"{where} MLP"), eps=_eps(norms, where), output_dim=output_dim,
        proj_bias=proj_bias, causal=text.attn_mask is not None, pool=pool, eos_id=int(eos_id))
    state = {"token_embedding.weight": text.token_embedding.weight,
             "positional_embedding": text.positional_embedding,
             "ln_final.weight": text.ln_final.weight, "ln_final.bias": text.ln_final.bias}
    if isinstance(proj, nn.Linear):
        state["text_projection.weight"] = proj.weight
        if proj.bias is not None:
            state["text_projection.bias"] = proj.bias
    elif proj is not None:
        state["text_projection.weight"] = proj.t()  # open_clip computes x @ P
    for i, blk in enumerate(blocks):
        state.update(_block_state(blk, f"stack.blocks.{i}."))
    return cfg, _detached(state)


# -- both towers -------------------------------------------------------------------------
class ClipOutput(NamedTuple):
    features: Tensor  # (B, embed_dim): open_clip's encode_image / encode_text (unnormalised)
    pooled: Tensor  # (B, width): the pooled feature before the projection
    tokens: Tensor  # (B, N, width): every token, class / start token included (see encode_image)


class ClipTowers(nn.Module):
    """A converted open_clip model: ``visual`` (`VisionTower` + ``visual_proj``) and ``text`` (`ClipTextTower`).

    ``image_tower`` / ``text_tower`` run one tower in any trimming mode and return a
    `ClipOutput`; ``encode_image`` / ``encode_text`` / ``forward`` mirror open_clip's.
    Trimmers (``trim.vision_*`` / ``trim.text_*`` layers) are uni-modal here: each tower
    conditions on itself only, as CLIP encodes the two modalities independently.
    """

    def __init__(self, vision: VisionConfig, text: ClipTextConfig | None, embed_dim: int | None, *,
                 trim: TrimConfig | None = None, vision_pool: str = "tok", final_ln_after_pool: bool = False,
                 logit_bias: bool = False) -> None:
        super().__init__()
        if vision_pool not in VISION_POOLS:
            raise ConfigError(f"vision_pool={vision_pool!r}; choose one of {VISION_POOLS}")
        trim = trim or TrimConfig()
        self.vision_pool, self.final_ln_after_pool = vision_pool, final_ln_after_pool
        self.visual = VisionTower(vision, trim, text_dim=None)
        self.visual_proj = nn.Linear(vision.width, embed_dim, bias=False) if embed_dim else None
        self.text = ClipTextTower(text, trim) if text is not None else None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(0.0)) if logit_bias else None

    def image_tower(self, pixels: Tensor, *, trim: str = "off", tau: float = 1.0, meter: CostMeter | None = None,
                    records: list[LayerRecord] | None = None) -> ClipOutput:
        """``tokens`` are open_clip's (class token first): after ``ln_post`` unless ``final_ln_after_pool``.

        A token dropped by a trimmer carries its last value; "avg" pooling averages every patch.
        """
        x, protect = self.visual.embed_tokens(pixels)
        tokens = self.visual.stack(start_tokens(x, trim, protect=protect), mode=trim, tau=tau, meter=meter,
                                   records=records)
        x = tokens.restore()
        ln = self.visual.ln_post
        if not self.final_ln_after_pool:
            x = ln(x)
        pooled = x[:, 0] if self.vision_pool == "tok" else x[:, 1:].mean(1)
        if self.final_ln_after_pool:
            pooled = ln(pooled)
        features = pooled if self.visual_proj is None else self.visual_proj(pooled)
        return ClipOutput(features, pooled, x)

    def text_tower(self, input_ids: Tensor, *, trim: str = "off", tau: float = 1.0, meter: CostMeter | None = None,
                   records: list[LayerRecord] | None = None) -> ClipOutput:
        if self.text is None:
            raise ConfigError("this ClipTowers was converted without its text tower (text=False)")
        return ClipOutput(*self.text(input_ids, trim=trim, tau=tau, meter=meter, records=records))

    def encode_image(self, pixels: Tensor, normalize: bool = False, *, trim: str = "off") -> Tensor:
        features = self.image_tower(pixels, trim=trim).features
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, input_ids: Tensor, normalize: bool = False, *, trim: str = "off") -> Tensor:
        features = self.text_tower(input_ids, trim=trim).features
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, pixels: Tensor, input_ids: Tensor, *, trim: str = "off") -> tuple[Tensor, Tensor]:
        """(image-to-text logits, text-to-image logits), as open_clip's ``get_logits``."""
        image = self.encode_image(pixels, normalize=True, trim=trim)
        text = self.encode_text(input_ids, normalize=True, trim=trim)
        logits = self.logit_scale.exp() * image @ text.T
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        return logits, logits.T


def _load_converted(module: nn.Module, state: dict[str, Tensor], what: str) -> None:
    """Converted weights fill everything but the trimmers, which start fresh."""
    load_weights(module, state, source=f"converting {what}", fresh=trimmer_keys(module))


def towers_from_open_clip(model: nn.Module, *, trim: TrimConfig | dict | None = None,
                          text: bool = True) -> ClipTowers:
    """An open_clip model (already built) -> `ClipTowers` with the same outputs."""
    trim = _trim_config(trim)
    vcfg, vstate = vision_tower_from_open_clip(model.visual)
    tcfg, tstate = clip_text_tower_from_open_clip(model) if text else (None, {})
    proj = model.visual.proj
    towers = ClipTowers(vcfg, tcfg, proj.shape[1] if proj is not None else None, trim=trim,
                        vision_pool=model.visual.pool_type, final_ln_after_pool=model.visual.final_ln_after_pool,
                        logit_bias=getattr(model, "logit_bias", None) is not None)
    _load_converted(towers.visual, vstate, "the open_clip vision tower")
    if proj is not None:
        towers.visual_proj.weight.data.copy_(proj.detach().t())  # open_clip computes x @ proj
    if towers.text is not None:
        _load_converted(towers.text, tstate, "the open_clip text tower")
    with torch.no_grad():
        towers.logit_scale.copy_(model.logit_scale.detach().reshape(()))
        if towers.logit_bias is not None:
            towers.logit_bias.copy_(model.logit_bias.detach().reshape(()))
    return towers.eval()


def convert_open_clip(name: str, *, pretrained: str | None = None, trim: TrimConfig | dict | None = None,
                      image_size: int | None = None, text: bool = True, **create_kwargs: Any) -> ClipTowers:
    """``open_clip:<name>`` for the dispatcher: both CLIP towers as trim modules (`ClipTowers`).

    ``image_size`` resizes the vision tower (open_clip's ``force_image_size``: position
    embeddings are interpolated from the checkpoint's grid). ``text=False`` skips the text tower.
    """
    if image_size is not None:
        create_kwargs["force_image_size"] = image_size
    return towers_from_open_clip(load_open_clip(name, pretrained, **create_kwargs), trim=trim, text=text)


def _trim_config(trim: TrimConfig | dict | None) -> TrimConfig:
    if trim is None:
        return TrimConfig()
    return trim if isinstance(trim, TrimConfig) else build_dataclass(TrimConfig, trim, "trim")


# -- METER -------------------------------------------------------------------------------
def _meter_init(module: nn.Module) -> None:
    """METER's ``objectives.init_weights`` (BERT's init): N(0, 0.02) weights, zero biases, unit norms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


# The parts of a DualStreamModel that METER does not take from a pretrained uni-modal encoder.
METER_FRESH = ("text_transform", "image_transform", "token_type_embeddings", "text_layers", "image_layers",
               "text_pooler", "image_pooler", "head")


def build_meter(vision: str = "open_clip:ViT-B-16", vision_pretrained: str | None = None,
                text: str = "roberta-base", *, task: str = "vqa", num_labels: int = 3129, cross_layers: int = 6,
                cross_width: int = 768, cross_heads: int = 12, image_size: int | None = None,
                trim: TrimConfig | dict | None = None):
    """METER (Dou et al., CVPR 2022): CLIP-ViT + RoBERTa encoders, co-attention fusion, trimmers.

    ``vision``: ``open_clip:<name>`` (the prefix may be left out), loaded with
    ``vision_pretrained`` (an open_clip tag or a local state-dict path; ``None``: random).
    ``image_size`` resizes it (position embeddings interpolated by open_clip, as METER runs
    CLIP-ViT-B/16 at 288 / 384). ``text``: a transformers RoBERTa or BERT name or directory.
    The vision tower keeps every token after ``ln_post`` (METER drops CLIP's pooling and
    projection); the text tower is the encoder without its pooler.

    Initialisation of the rest follows METER's code: the cross-modal transforms, token-type
    embeddings, co-attention layers, poolers and classifier are *randomly* initialised with
    BERT's scheme (``objectives.init_weights``: N(0, 0.02), zero bias, unit LayerNorm) — METER
    does not copy BERT/RoBERTa weights into its co-attention layers, and gives those fresh
    parts a larger learning rate (5x) instead. METER's published VQA / NLVR2 numbers also rely
    on its 4M-image vision-language pre-training (MLM + ITM) of this model; this function gives
    the model before that stage. Trimmers keep their identity-at-start init (invariant 3).
    """
    from trim.models.convert.roberta import text_tower_from_transformers
    from trim.models.dual import DualStreamModel

    trim = _trim_config(trim)
    create_kwargs = {} if image_size is None else {"force_image_size": image_size}
    clip = load_open_clip(vision, vision_pretrained, **create_kwargs)
    vcfg, vstate = vision_tower_from_open_clip(clip.visual)
    del clip
    tcfg, tstate = text_tower_from_transformers(text)
    cfg = ModelConfig(family="dual", task=task, num_labels=num_labels, vision=vcfg, text=tcfg,
                      cross_layers=cross_layers, cross_width=cross_width, cross_heads=cross_heads, trim=trim)
    model = DualStreamModel(cfg)
    for name in METER_FRESH:
        getattr(model, name).apply(_meter_init)
    _load_converted(model.vision, vstate, f"{vision} (vision tower)")
    _load_converted(model.text, tstate, f"{text} (text tower)")
    return model
