"""SAM checkpoints -> trim's `Sam`, proven equal to their sources (invariant 2).

Two sources, one model class:

* **transformers** ``SamModel`` (a hub name or a ``save_pretrained`` directory), `convert_sam_transformers`.
  Its vision encoder goes into trim's `SamImageEncoder`; its prompt encoder and mask decoder
  into segment-anything's ``PromptEncoder`` / ``MaskDecoder``, by renaming: transformers ported
  those modules from segment-anything parameter for parameter. The one numeric difference is
  kept, not lost: transformers' two-way blocks normalise with ``mask_decoder_config.layer_norm_eps``
  (1e-6) where segment-anything uses 1e-5 (`SamDecoderConfig.norm_eps`).
* **segment-anything** checkpoints (`convert_segment_anything`): the ``.pth`` state dict of a
  whole ``Sam`` (what ``sam_model_registry[...](checkpoint=...)`` loads, e.g.
  ``sam_vit_b_01ec64.pth``) or of a bare ``ImageEncoderViT``. The file holds no config, so
  the sizes are read from the tensor shapes. Two cannot be: the encoder's head count and
  window layout are read from the relative-position tables (one per block, sized by the
  block's attention grid) when the checkpoint has them, and the mask decoder's head count is
  segment-anything's 8 (every released SAM) unless ``decoder={"heads": ...}`` says otherwise.
  A bare encoder gets a fresh prompt encoder and mask decoder of segment-anything's sizes.

What "equal" covers: image embeddings, and masks + IoU predictions for box and point prompts
(trim's `Sam.predict`). transformers' extra point label -10 ("padding point") is not a
segment-anything label and is not supported.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from trim.errors import CheckpointError, ConfigError
from trim.models.config import ModelConfig, SamConfig, SamDecoderConfig, SamEncoderConfig
from trim.models.convert.common import RenameRule, rename_state, square_size, transformers_activation
from trim.models.io import load_weights
from trim.models.sam import Sam
from trim.schema import build_dataclass

# segment-anything's build_sam: the decoder every released SAM uses (its head count is not in the weights).
OFFICIAL_DECODER = SamDecoderConfig(mask_in_chans=16, depth=2, heads=8, mlp_dim=2048, attention_downsample_rate=2,
                                    num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=256, norm_eps=1e-5)

# segment-anything ImageEncoderViT parameter -> trim SamImageEncoder parameter
OFFICIAL_ENCODER_KEYS: list[RenameRule] = [
    (r"patch_embed\.proj\.(weight|bias)", r"patch_embed.\1"),
    (r"pos_embed", "pos_embed"),
    (r"blocks\.(\d+)\.norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"blocks\.(\d+)\.attn\.rel_pos_h", r"blocks.\1.attn.rel_pos.height"),
    (r"blocks\.(\d+)\.attn\.rel_pos_w", r"blocks.\1.attn.rel_pos.width"),
    (r"blocks\.(\d+)\.mlp\.lin([12])\.(weight|bias)", r"blocks.\1.mlp.fc\2.\3"),
    (r"neck\.0\.weight", "neck.conv1.weight"),
    (r"neck\.1\.(weight|bias)", r"neck.norm1.\1"),
    (r"neck\.2\.weight", "neck.conv2.weight"),
    (r"neck\.3\.(weight|bias)", r"neck.norm2.\1"),
]
PROMPT_PARTS = ("prompt_encoder.", "mask_decoder.")  # segment-anything's own modules: same names in trim

# The tied copy of the shared positional embedding (transformers saves it under both names).
TIED_KEY = "prompt_encoder.shared_embedding.positional_embedding"


def convert_segment_anything(path: str | os.PathLike, *, encoder: dict[str, Any] | None = None,
                             decoder: dict[str, Any] | None = None) -> Sam:
    """Load a segment-anything ``.pth`` state dict (a whole ``Sam`` or a bare ``ImageEncoderViT``) as a `Sam`.

    ``encoder`` / ``decoder``: `SamEncoderConfig` / `SamDecoderConfig` values the weights cannot
    tell (``heads``, and ``window_size`` + ``global_attn_indexes`` when the checkpoint has no
    relative-position tables); they override what is read from the shapes.
    """
    path = Path(path)
    state = _read_state_dict(path)
    source = f"segment-anything checkpoint {path}"
    if any(k.startswith("image_encoder.") for k in state):
        encoder_state = {k.removeprefix("image_encoder."): v for k, v in state.items()
                         if k.startswith("image_encoder.")}
        others = {k: v for k, v in state.items() if not k.startswith("image_encoder.")}
        stray = [k for k in others if not k.startswith(PROMPT_PARTS)]
        if stray:
            raise CheckpointError(f"{source} has keys outside image_encoder / prompt_encoder / mask_decoder "
                                  f"({', '.join(stray[:5])}); it is not a segment-anything Sam state dict")
        base_decoder = _official_decoder_config(others, source)
    elif "patch_embed.proj.weight" in state:
        encoder_state, others, base_decoder = state, {}, OFFICIAL_DECODER
    else:
        raise CheckpointError(f"{source} is not a SAM checkpoint: it has neither image_encoder.* keys (a Sam state "
                              f"dict, as sam_model_registry loads) nor patch_embed.proj.weight (an ImageEncoderViT "
                              f"state dict); its first keys are {sorted(state)[:5]}")
    enc = _official_encoder_config(encoder_state, source, encoder)
    dec = build_dataclass(SamDecoderConfig, {**dataclasses.asdict(base_decoder), **(decoder or {})}, "decoder")
    model = Sam(ModelConfig(family="sam", task="seg", sam=SamConfig(encoder=enc, decoder=dec)).validate())
    renamed = rename_state(encoder_state, OFFICIAL_ENCODER_KEYS, source=source, target="trim's SAM image encoder")
    weights = {f"image_encoder.{k}": v for k, v in renamed.items()}
    weights.update(others)
    fresh = set()
    if not others:
        warnings.warn(f"{source} holds an image encoder only: the prompt encoder and mask decoder start fresh "
                      "(segment-anything's sizes); only image embeddings equal the source", stacklevel=2)
        fresh = {k for k in model.state_dict() if k.startswith(PROMPT_PARTS)}
    load_weights(model, weights, source=source, fresh=fresh)
    return model


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; give the .pth file of a segment-anything checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path} cannot be read as a PyTorch state dict ({err}); is it a segment-anything "
                              ".pth checkpoint?") from err
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                 for k, v in state.items()):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict (parameter name -> tensor); "
                              "save the model with torch.save(model.state_dict(), path)")
    return dict(state)


def _blocks(state: Mapping[str, Tensor], pattern: str) -> int:
    """How many numbered submodules ``pattern`` (with one ``(\\d+)``) finds among the keys."""
    found = {int(m.group(1)) for k in state for m in [re.match(pattern, k)] if m}
    return max(found) + 1 if found else 0


def _tensor(state: Mapping[str, Tensor], key: str, source: str) -> Tensor:
    if key not in state:
        raise CheckpointError(f"{source} lacks {key!r}; it is not a complete segment-anything checkpoint")
    return state[key]


def _official_encoder_config(state: Mapping[str, Tensor], source: str,
                             overrides: dict[str, Any] | None) -> SamEncoderConfig:
    """An ImageEncoderViT state dict's architecture: its shapes, then the caller's ``overrides``."""
    overrides = dict(overrides or {})
    width, channels, patch, _ = _tensor(state, "patch_embed.proj.weight", source).shape
    depth = _blocks(state, r"blocks\.(\d+)\.")
    if not depth:
        raise CheckpointError(f"{source} has an image encoder with no blocks.N.* keys")
    pos = state.get("pos_embed")
    values: dict[str, Any] = dict(
        patch_size=patch, channels=channels, width=width, depth=depth, qkv_bias="blocks.0.attn.qkv.bias" in state,
        mlp_ratio=_tensor(state, "blocks.0.mlp.lin1.weight", source).shape[0] / width,
        out_chans=_tensor(state, "neck.0.weight", source).shape[0], use_abs_pos=pos is not None,
        use_rel_pos="blocks.0.attn.rel_pos_h" in state)
    if pos is not None:
        values["image_size"] = pos.shape[1] * patch
    elif "image_size" not in overrides:
        raise ConfigError(f"{source}: the weights do not tell the encoder's image_size (no position embedding); "
                          "pass encoder={'image_size': ...}")
    if values["use_rel_pos"]:
        grid = overrides.get("image_size", values.get("image_size")) // patch
        values.update(_windows_from_rel_pos(state, depth, grid, source))
    else:
        unknown = [k for k in ("heads", "window_size", "global_attn_indexes") if k not in overrides]
        if unknown:
            wanted = ", ".join(f"{k!r}: ..." for k in unknown)
            raise ConfigError(f"{source}: the weights do not tell the encoder's {', '.join(unknown)} (no "
                              f"relative-position tables); pass encoder={{{wanted}}}")
    return build_dataclass(SamEncoderConfig, {**values, **overrides}, "encoder")


def _windows_from_rel_pos(state: Mapping[str, Tensor], depth: int, grid: int, source: str) -> dict[str, Any]:
    """Heads, window size and global blocks from the relative-position tables (2 * size - 1 rows each)."""
    sizes = [(_tensor(state, f"blocks.{i}.attn.rel_pos_h", source).shape[0] + 1) // 2 for i in range(depth)]
    head_dim = state["blocks.0.attn.rel_pos_h"].shape[1]
    heads = state["patch_embed.proj.weight"].shape[0] // head_dim
    windows = {s for s in sizes if s != grid}
    if len(windows) > 1:
        raise CheckpointError(f"{source}: the blocks' relative-position tables cover grids of sizes {sizes}, but a "
                              f"SAM encoder has one window size and global blocks over the {grid}x{grid} grid")
    if not windows:  # every block attends over the whole grid
        return dict(heads=heads, window_size=0, global_attn_indexes=[])
    global_blocks = [i for i, s in enumerate(sizes) if s == grid]
    return dict(heads=heads, window_size=windows.pop(), global_attn_indexes=global_blocks)


def _official_decoder_config(state: Mapping[str, Tensor], source: str) -> SamDecoderConfig:
    """What a Sam state dict's prompt encoder / mask decoder shapes say (heads: segment-anything's 8)."""
    dim = _tensor(state, "mask_decoder.iou_token.weight", source).shape[1]
    inner = _tensor(state, "mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight",
                    source).shape[0]
    return dataclasses.replace(
        OFFICIAL_DECODER,
        mask_in_chans=_tensor(state, "prompt_encoder.mask_downscaling.3.weight", source).shape[0],
        depth=_blocks(state, r"mask_decoder\.transformer\.layers\.(\d+)\."),
        mlp_dim=_tensor(state, "mask_decoder.transformer.layers.0.mlp.lin1.weight", source).shape[0],
        attention_downsample_rate=dim // inner,
        num_multimask_outputs=_tensor(state, "mask_decoder.mask_tokens.weight", source).shape[0] - 1,
        iou_head_depth=_blocks(state, r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\."),
        iou_head_hidden_dim=_tensor(state, "mask_decoder.iou_prediction_head.layers.0.weight", source).shape[0])


# ----------------------------------------------------------------------------- transformers


def _hf_feed_forward(prefix: str, depth: int) -> list[RenameRule]:
    """transformers' SamFeedForward (proj_in, layers.*, proj_out) -> segment-anything's MLP (layers.0..depth-1)."""
    p = re.escape(prefix)
    return [(rf"{p}\.proj_in\.(weight|bias)", rf"{prefix}.layers.0.\1"),
            (rf"{p}\.layers\.(\d+)\.(weight|bias)", lambda m: f"{prefix}.layers.{int(m.group(1)) + 1}.{m.group(2)}"),
            (rf"{p}\.proj_out\.(weight|bias)", rf"{prefix}.layers.{depth - 1}.\1")]


def transformers_keys(cfg: SamConfig) -> list[RenameRule]:
    """transformers SamModel parameter -> trim Sam parameter."""
    dec = "mask_decoder"
    rules: list[RenameRule] = [
        (r"vision_encoder\.patch_embed\.projection\.(weight|bias)", r"image_encoder.patch_embed.\1"),
        (r"vision_encoder\.pos_embed", "image_encoder.pos_embed"),
        (r"vision_encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)", r"image_encoder.blocks.\1.norm\2.\3"),
        (r"vision_encoder\.layers\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", r"image_encoder.blocks.\1.attn.\2.\3"),
        (r"vision_encoder\.layers\.(\d+)\.attn\.rel_pos_h", r"image_encoder.blocks.\1.attn.rel_pos.height"),
        (r"vision_encoder\.layers\.(\d+)\.attn\.rel_pos_w", r"image_encoder.blocks.\1.attn.rel_pos.width"),
        (r"vision_encoder\.layers\.(\d+)\.mlp\.lin([12])\.(weight|bias)", r"image_encoder.blocks.\1.mlp.fc\2.\3"),
        (r"vision_encoder\.neck\.conv([12])\.weight", r"image_encoder.neck.conv\1.weight"),
        (r"vision_encoder\.neck\.layer_norm([12])\.(weight|bias)", r"image_encoder.neck.norm\1.\2"),
        (r"shared_image_embedding\.positional_embedding",
         "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
        (r"prompt_encoder\.point_embed\.(\d+)\.weight", r"prompt_encoder.point_embeddings.\1.weight"),
        (r"prompt_encoder\.(not_a_point_embed|no_mask_embed)\.weight", r"prompt_encoder.\1.weight"),
        (r"prompt_encoder\.mask_embed\.conv1\.(weight|bias)", r"prompt_encoder.mask_downscaling.0.\1"),
        (r"prompt_encoder\.mask_embed\.layer_norm1\.(weight|bias)", r"prompt_encoder.mask_downscaling.1.\1"),
        (r"prompt_encoder\.mask_embed\.conv2\.(weight|bias)", r"prompt_encoder.mask_downscaling.3.\1"),
        (r"prompt_encoder\.mask_embed\.layer_norm2\.(weight|bias)", r"prompt_encoder.mask_downscaling.4.\1"),
        (r"prompt_encoder\.mask_embed\.conv3\.(weight|bias)", r"prompt_encoder.mask_downscaling.6.\1"),
        (rf"{dec}\.(iou_token|mask_tokens)\.weight", rf"{dec}.\1.weight"),
        (rf"{dec}\.transformer\.layers\.(\d+)\.layer_norm([1-4])\.(weight|bias)",
         rf"{dec}.transformer.layers.\1.norm\2.\3"),
        (rf"{dec}\.transformer\.layers\.(\d+)\.((?:self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"
         r"\.(?:q|k|v|out)_proj\.(?:weight|bias))", rf"{dec}.transformer.layers.\1.\2"),
        (rf"{dec}\.transformer\.layers\.(\d+)\.mlp\.(lin[12]\.(?:weight|bias))",
         rf"{dec}.transformer.layers.\1.mlp.\2"),
        (rf"{dec}\.transformer\.(final_attn_token_to_image\.(?:q|k|v|out)_proj\.(?:weight|bias))",
         rf"{dec}.transformer.\1"),
        (rf"{dec}\.transformer\.layer_norm_final_attn\.(weight|bias)", rf"{dec}.transformer.norm_final_attn.\1"),
        (rf"{dec}\.upscale_conv1\.(weight|bias)", rf"{dec}.output_upscaling.0.\1"),
        (rf"{dec}\.upscale_layer_norm\.(weight|bias)", rf"{dec}.output_upscaling.1.\1"),
        (rf"{dec}\.upscale_conv2\.(weight|bias)", rf"{dec}.output_upscaling.3.\1"),
    ]
    for i in range(cfg.decoder.num_multimask_outputs + 1):
        rules += _hf_feed_forward(f"{dec}.output_hypernetworks_mlps.{i}", 3)
    return rules + _hf_feed_forward(f"{dec}.iou_prediction_head", cfg.decoder.iou_head_depth)


def convert_sam_transformers(name_or_dir: str) -> Sam:
    """Load a transformers ``SamModel`` (hub name or local directory; offline: a local copy) as a `Sam`."""
    import transformers

    try:
        hf_cfg = transformers.SamConfig.from_pretrained(name_or_dir)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load the SAM config of {name_or_dir!r}: {err}") from err
    if hf_cfg.architectures and "SamModel" not in hf_cfg.architectures:
        raise CheckpointError(f"{name_or_dir!r} is a {', '.join(hf_cfg.architectures)}; trim converts transformers' "
                              "SamModel (image encoder + prompt encoder + mask decoder)")
    cfg = ModelConfig(family="sam", task="seg", sam=_transformers_config(hf_cfg)).validate()
    hf, info = transformers.SamModel.from_pretrained(name_or_dir, dtype=torch.float32, output_loading_info=True)
    if info["missing_keys"]:
        raise CheckpointError(f"{name_or_dir!r} (SamModel) lacks {sorted(info['missing_keys'])[:5]}: transformers "
                              "would initialise them randomly, so there is no source model to reproduce")
    model = Sam(cfg)
    state = {k: v for k, v in hf.state_dict().items() if k != TIED_KEY}
    source = f"{name_or_dir!r} (converted from SamModel; transformers {transformers.__version__})"
    load_weights(model, rename_state(state, transformers_keys(cfg.sam), source=source, target="trim's Sam"),
                 source=source)
    return model


def _transformers_config(hf_cfg) -> SamConfig:
    vis, prompt, dec = hf_cfg.vision_config, hf_cfg.prompt_encoder_config, hf_cfg.mask_decoder_config
    image = square_size(vis.image_size, "SAM vision_config.image_size")
    patch = square_size(vis.patch_size, "SAM vision_config.patch_size")
    if int(vis.hidden_size * (vis.mlp_dim / vis.hidden_size)) != vis.mlp_dim:
        raise ConfigError(f"SAM vision_config.mlp_dim={vis.mlp_dim} is not representable as hidden_size * mlp_ratio "
                          f"with hidden_size={vis.hidden_size}")
    # segment-anything's prompt encoder and mask decoder fix these; transformers makes them settings.
    fixed = {"prompt_encoder_config.hidden_act": (transformers_activation(prompt.hidden_act,
                                                  "SAM prompt_encoder_config.hidden_act"), "gelu"),
             "prompt_encoder_config.layer_norm_eps": (prompt.layer_norm_eps, 1e-6),
             "prompt_encoder_config.num_point_embeddings": (prompt.num_point_embeddings, 4),
             "prompt_encoder_config.hidden_size": (prompt.hidden_size, vis.output_channels),
             "prompt_encoder_config.image_size": (prompt.image_size, vis.image_size),
             "prompt_encoder_config.image_embedding_size": (prompt.image_embedding_size, image // patch),
             "mask_decoder_config.hidden_act": (dec.hidden_act, "relu"),
             "mask_decoder_config.hidden_size": (dec.hidden_size, vis.output_channels)}
    for key, (value, expected) in fixed.items():
        if value != expected:
            raise ConfigError(f"SAM {key}={value!r}: trim runs segment-anything's prompt encoder and mask decoder, "
                              f"which need {expected!r} here")
    encoder = SamEncoderConfig(
        image_size=image, patch_size=patch, channels=vis.num_channels, width=vis.hidden_size,
        depth=vis.num_hidden_layers, heads=vis.num_attention_heads, mlp_ratio=vis.mlp_dim / vis.hidden_size,
        window_size=vis.window_size, global_attn_indexes=list(vis.global_attn_indexes), out_chans=vis.output_channels,
        use_rel_pos=vis.use_rel_pos, use_abs_pos=vis.use_abs_pos, qkv_bias=vis.qkv_bias,
        act=transformers_activation(vis.hidden_act, "SAM vision_config.hidden_act"), eps=vis.layer_norm_eps)
    decoder = SamDecoderConfig(
        mask_in_chans=prompt.mask_input_channels, depth=dec.num_hidden_layers, heads=dec.num_attention_heads,
        mlp_dim=dec.mlp_dim, attention_downsample_rate=dec.attention_downsample_rate,
        num_multimask_outputs=dec.num_multimask_outputs, iou_head_depth=dec.iou_head_depth,
        iou_head_hidden_dim=dec.iou_head_hidden_dim, norm_eps=dec.layer_norm_eps)
    return SamConfig(encoder=encoder, decoder=decoder)
