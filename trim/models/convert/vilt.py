"""transformers ViLT -> trim's single-stream `ViltModel`, proven equal to its source (invariant 2).

Which checkpoint becomes which trim model (read from ``config.architectures``):

==========================================  ======  ============================================
transformers class                          task    head
==========================================  ======  ============================================
``ViltForQuestionAnswering``                vqa     ``classifier`` (Linear, LayerNorm, GELU, Linear)
``ViltForImagesAndTextClassification``      nlvr2   ``classifier``; ``num_images`` -> ``max_images``
``ViltForImageAndTextRetrieval``            itm     ``rank_output`` (one logit)
``ViltModel`` / ``ViltForMaskedLM``         vqa*    fresh (the MLM head is a pretraining head: dropped)
==========================================  ======  ============================================

\\* or the ``task=`` asked for. Asking for another task or label count than the checkpoint's
head keeps the backbone and gives a freshly initialised head (with a warning).

What "equal" assumes. transformers' ``ViltEmbeddings.visual_embed`` handles images of any size:
it bilinearly resizes the position embeddings to each image's unpadded patch grid
(``pixel_mask``), then keeps ``max_image_length`` patches — all valid ones in a random order,
or a random subset when there are more. trim's `PatchEmbed` is that computation for the case
trim's data pipeline produces: every image at ``config.image_size``, square, no padding (no
``pixel_mask``). Then the resize is the identity (``align_corners=True`` onto the same grid),
every patch is kept, and the random order does not matter: attention is permutation
equivariant and only the first (text [CLS]) token is pooled. A checkpoint whose
``max_image_length`` is below the patch count would drop random patches even at that size;
it is refused (`ConfigError`) rather than converted into something that is not its source.
"""

from __future__ import annotations

import re
import warnings

import torch
from torch import Tensor

from trim.errors import CheckpointError, ConfigError
from trim.models.io import head_keys, load_weights, trimmer_keys
from trim.models.config import ModelConfig, TextConfig, TrimConfig, VisionConfig
from trim.schema import build_dataclass
from trim.models.convert.common import square_size, transformers_activation
from trim.models.vilt import ViltModel

# transformers class -> the trim task its head implements (None: no task head)
ARCHITECTURES: dict[str, str | None] = {
    "ViltForQuestionAnswering": "vqa",
    "ViltForImagesAndTextClassification": "nlvr2",
    "ViltForImageAndTextRetrieval": "itm",
    "ViltModel": None,
    "ViltForMaskedLM": None,
}
HEADS = {"vqa": "classifier", "nlvr2": "classifier", "itm": "rank_output"}

# transformers ViltModel parameter -> trim ViltModel parameter (modality embeddings: see below)
BACKBONE_KEYS = [
    (r"embeddings\.text_embeddings\.(word_embeddings|position_embeddings|token_type_embeddings)\.weight",
     r"text_embeddings.\1.weight"),
    (r"embeddings\.text_embeddings\.LayerNorm\.(weight|bias)", r"text_embeddings.norm.\1"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"embeddings\.cls_token", "patch_embed.cls_token"),
    (r"embeddings\.position_embeddings", "patch_embed.pos_embed"),
    (r"encoder\.layer\.(\d+)\.layernorm_before\.(weight|bias)", r"stack.blocks.\1.norm1.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.query\.(weight|bias)", r"stack.blocks.\1.attn.q_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.key\.(weight|bias)", r"stack.blocks.\1.attn.k_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.value\.(weight|bias)", r"stack.blocks.\1.attn.v_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"stack.blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.layernorm_after\.(weight|bias)", r"stack.blocks.\1.norm2.\2"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"stack.blocks.\1.mlp.fc1.\2"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"stack.blocks.\1.mlp.fc2.\2"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
    (r"pooler\.dense\.(weight|bias)", r"pooler.dense.\1"),
]
HEAD_KEYS = [(r"classifier\.([013])\.(weight|bias)", r"head.\1.\2"), (r"rank_output\.(weight|bias)", r"head.\1")]
MODALITY_KEY = "embeddings.token_type_embeddings.weight"


def convert_vilt(name_or_dir: str, *, task: str | None = None, num_labels: int | None = None,
                 trim: TrimConfig | dict | None = None) -> ViltModel:
    """Load a transformers ViLT checkpoint as a trim `ViltModel` with the same outputs.

    ``name_or_dir``: a local directory or a hub name (offline: a local copy).
    ``task``: default the checkpoint's own (see the module table). A checkpoint without a
    task head (``ViltModel``, ``ViltForMaskedLM``) gets a *freshly initialised* head for
    ``task`` (default ``"vqa"``) with ``num_labels`` outputs (default the checkpoint's
    ``config.num_labels``); only its pooled features (``ModelOutput.hidden``) equal the
    source. Another task or label count than the checkpoint's head also gives a fresh head.
    For NLVR2 without an NLVR2 checkpoint, the second image's modality embedding starts as a
    copy of the first's, as ViLT initialises its NLVR2 fine-tuning.
    ``trim``: where trimmers sit; they keep their fresh (keep-all) initialisation.

    Preconditions for equality with transformers: images at ``config.image_size`` with no
    ``pixel_mask`` padding (see the module docstring); ``trim="off"``.
    """
    import transformers

    try:
        hf_cfg = transformers.ViltConfig.from_pretrained(name_or_dir)
    except OSError as err:
        raise CheckpointError(f"cannot load the ViLT config of {name_or_dir!r}: {err}") from err
    arch = _architecture(name_or_dir, hf_cfg.architectures)
    source_task = ARCHITECTURES[arch]
    task = task or source_task or "vqa"
    cfg = _model_config(hf_cfg, task, source_task, num_labels, trim)

    hf, info = getattr(transformers, arch).from_pretrained(name_or_dir, dtype=torch.float32,
                                                           output_loading_info=True)
    if info["missing_keys"]:
        raise CheckpointError(f"{name_or_dir!r} ({arch}) lacks {sorted(info['missing_keys'])[:5]}: transformers "
                              f"would initialise them randomly, so there is no source model to reproduce")
    backbone = hf if arch == "ViltModel" else hf.vilt
    head = getattr(hf, HEADS[source_task]) if source_task else None
    last = head[-1] if isinstance(head, torch.nn.Sequential) else head
    head_labels = None if last is None else last.out_features
    keep_head = source_task == task and num_labels in (None, head_labels)
    if source_task and not keep_head:
        warnings.warn(f"{name_or_dir!r} is a {arch} ({source_task}, {head_labels} labels); converting for task={task} "
                      f"with {cfg.num_labels} labels keeps its backbone and starts a fresh head", stacklevel=2)
    if keep_head:
        cfg.num_labels = head_labels

    model = ViltModel(cfg)
    state = _rename(backbone.state_dict(), BACKBONE_KEYS, skip={MODALITY_KEY})
    state["modality_embeddings.weight"] = _modality_rows(backbone.state_dict()[MODALITY_KEY], cfg.max_images + 1)
    fresh = trimmer_keys(model)
    if keep_head:
        state.update(_rename(head.state_dict(), HEAD_KEYS, prefix=HEADS[source_task] + "."))
    else:
        fresh |= head_keys(model)
    load_weights(model, state, source=f"{name_or_dir!r} (converted from {arch}; transformers "
                                      f"{transformers.__version__})", fresh=fresh)
    return model


def _architecture(name: str, architectures: list[str] | None) -> str:
    if not architectures:
        return "ViltModel"
    for arch in architectures:
        if arch in ARCHITECTURES:
            return arch
    raise CheckpointError(f"{name!r} is a {', '.join(architectures)}; trim converts {', '.join(ARCHITECTURES)} "
                          f"(its models pool the first token for a VQA / NLVR2 / ITM head)")


def _model_config(hf_cfg, task: str, source_task: str | None, num_labels: int | None,
                  trim: TrimConfig | dict | None) -> ModelConfig:
    image = square_size(hf_cfg.image_size, "ViLT config.image_size")
    patch = square_size(hf_cfg.patch_size, "ViLT config.patch_size")
    width, heads = hf_cfg.hidden_size, hf_cfg.num_attention_heads
    patches = (image // patch) ** 2
    act = transformers_activation(hf_cfg.hidden_act, "ViLT config.hidden_act")
    if not hf_cfg.qkv_bias:
        raise ConfigError("ViLT config.qkv_bias=False: trim's ViLT blocks have q/k/v biases; "
                          "this converter supports qkv_bias=True checkpoints only")
    if hf_cfg.intermediate_size != int(width * (hf_cfg.intermediate_size / width)):
        raise ConfigError(f"ViLT config.intermediate_size={hf_cfg.intermediate_size} is not representable as "
                          f"hidden_size * mlp_ratio with hidden_size={width}")
    max_len = hf_cfg.max_image_length
    if isinstance(max_len, int) and 0 < max_len < patches:
        raise ConfigError(f"ViLT config.max_image_length={max_len} < {patches} patches of a "
                          f"{image}x{image} image: transformers keeps a random subset of patches, which trim "
                          f"cannot reproduce. Set max_image_length to -1 in the checkpoint's config.json "
                          f"to use every patch (then trim equals transformers)")
    rows = hf_cfg.modality_type_vocab_size
    if rows < 2:
        raise ConfigError(f"ViLT config.modality_type_vocab_size={rows}: it needs a text and an image row (>= 2)")
    if task == "nlvr2":
        images = hf_cfg.num_images if source_task == "nlvr2" and hf_cfg.num_images > 0 else 2
        if rows - 1 > images:
            raise ConfigError(f"ViLT config.modality_type_vocab_size={rows} but num_images={images}: trim's NLVR2 "
                              f"model has one modality embedding per image (modality_type_vocab_size = "
                              f"num_images + 1)")
    else:
        images = max(rows - 1, 1)
    if isinstance(trim, dict):
        trim = build_dataclass(TrimConfig, trim, "trim")
    vision = VisionConfig(image_size=image, patch_size=patch, channels=hf_cfg.num_channels, width=width,
                          layers=hf_cfg.num_hidden_layers, heads=heads, mlp_ratio=hf_cfg.intermediate_size / width,
                          act=act, eps=hf_cfg.layer_norm_eps, patch_bias=True,
                          ln_pre=False, ln_post=True)
    # ViLT has no text tower: text.* describes only its BERT embeddings (layers=0). transformers'
    # ViltConfig leaves pad_token_id unset; ViLT's own BERT embeddings (and its tokenizer) pad with 0.
    text = TextConfig(vocab_size=hf_cfg.vocab_size, max_positions=hf_cfg.max_position_embeddings,
                      type_vocab_size=hf_cfg.type_vocab_size, width=width, layers=0, heads=heads,
                      mlp_ratio=vision.mlp_ratio, act=vision.act, eps=hf_cfg.layer_norm_eps,
                      pad_token_id=0 if hf_cfg.pad_token_id is None else hf_cfg.pad_token_id,
                      roberta_positions=False)
    labels = num_labels or (1 if task == "itm" and source_task != "itm" else hf_cfg.num_labels)
    return ModelConfig(family="vilt", task=task, num_labels=labels, vision=vision, text=text,
                       trim=trim or TrimConfig(), max_images=images).validate()


def _rename(state: dict[str, Tensor], rules: list[tuple[str, str]], *, prefix: str = "",
            skip: set[str] = frozenset()) -> dict[str, Tensor]:
    """Every source parameter must have a trim name: an unknown one means transformers changed."""
    out = {}
    for key, value in state.items():
        key = prefix + key
        if key in skip:
            continue
        for pattern, target in rules:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, target, key)] = value
                break
        else:
            raise CheckpointError(f"ViLT parameter {key!r} has no place in trim's ViltModel; "
                                  f"trim.models.convert.vilt needs updating for this transformers version")
    return out


def _modality_rows(weight: Tensor, rows: int) -> Tensor:
    """Text + one modality embedding per image; extra images start from the first image's (ViLT's NLVR2 init)."""
    if weight.shape[0] >= rows:
        return weight[:rows]
    return torch.cat([weight, weight[1:2].expand(rows - weight.shape[0], -1)], 0)
