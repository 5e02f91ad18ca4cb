"""SAM checkpoints -> trim's `Sam`: off = original (invariant 2) for both sources users hold.

* transformers: a tiny random ``SamModel`` saved with ``save_pretrained`` and loaded back through
  the user path, ``trim.models.from_pretrained(directory)``.
* segment-anything: a tiny random ``Sam`` (and a bare ``ImageEncoderViT``) whose ``state_dict``
  is saved with ``torch.save``, as its released ``.pth`` checkpoints are.

Both encoders have windowed blocks, a global block and relative-position tables, on a 10x10
token grid that 4x4 windows do not divide (the padding path). Weights are moved off their init
(zero position embeddings and relative-position tables, unit norms) so a swapped or dropped
tensor shows. Nothing is downloaded.
"""

import pytest
import torch
import transformers
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder
from segment_anything.modeling import Sam as OfficialSam
from segment_anything.modeling import TwoWayTransformer

from trim.errors import CheckpointError, ConfigError
from trim.models import ModelConfig, from_pretrained, save_model
from trim.models.sam import Sam

IMAGE, PATCH, WIDTH, OUT = 40, 4, 32, 32
GRID = IMAGE // PATCH  # 10: not a multiple of the window (4), so windows are padded
ENCODER = dict(img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=3, num_heads=4, mlp_ratio=2.0, out_chans=OUT,
               window_size=4, global_attn_indexes=(1,), norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6))
PROMPTS = ["box", "points", "points+box"]


def randomise(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if "rel_pos" in name else 0.1  # relative-position tables start at zero: make them count
            p.add_(torch.randn_like(p) * scale)


def official_sam(**encoder) -> OfficialSam:
    image_encoder = ImageEncoderViT(**{**ENCODER, "use_rel_pos": True, **encoder})
    prompt = PromptEncoder(embed_dim=OUT, image_embedding_size=(GRID, GRID), input_image_size=(IMAGE, IMAGE),
                           mask_in_chans=8)
    decoder = MaskDecoder(transformer_dim=OUT, transformer=TwoWayTransformer(depth=2, embedding_dim=OUT, num_heads=8,
                                                                             mlp_dim=48),
                          num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=24)
    sam = OfficialSam(image_encoder, prompt, decoder).eval()
    randomise(sam)
    return sam


def hf_config() -> transformers.SamConfig:
    return transformers.SamConfig(
        vision_config=dict(hidden_size=WIDTH, output_channels=OUT, num_hidden_layers=3, num_attention_heads=4,
                           image_size=IMAGE, patch_size=PATCH, mlp_dim=64, window_size=4, global_attn_indexes=[1],
                           num_pos_feats=OUT // 2),
        prompt_encoder_config=dict(hidden_size=OUT, image_size=IMAGE, patch_size=PATCH, mask_input_channels=8),
        mask_decoder_config=dict(hidden_size=OUT, mlp_dim=48, num_attention_heads=8, iou_head_hidden_dim=24))


def prompts(kind: str, b: int = 2, p: int = 2) -> dict:
    """P prompts per image, in pixels of the 40x40 input: boxes, or 3 labelled clicks (one 'not a point')."""
    out = {}
    if "box" in kind:
        corner = torch.rand(b, p, 2) * 20
        out["boxes"] = torch.cat([corner, corner + 5 + torch.rand(b, p, 2) * 15], -1)
    if "points" in kind:
        out["points"] = torch.rand(b, p, 3, 2) * IMAGE
        out["point_labels"] = torch.tensor([1, 0, -1]).expand(b, p, 3)
    return out


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """(transformers SamModel, trim Sam converted from its save_pretrained directory)."""
    torch.manual_seed(0)
    hf = transformers.SamModel(hf_config()).eval()
    randomise(hf)
    directory = tmp_path_factory.mktemp("hf_sam")
    hf.save_pretrained(directory)
    return hf, from_pretrained(str(directory))


@pytest.fixture(scope="module")
def official_pair(tmp_path_factory):
    """(segment-anything Sam, trim Sam converted from its torch.save'd state dict)."""
    torch.manual_seed(1)
    sam = official_sam()
    path = tmp_path_factory.mktemp("official_sam") / "sam_tiny.pth"
    torch.save(sam.state_dict(), path)
    return sam, from_pretrained(str(path))


def hf_reference(hf, pixels: torch.Tensor, given: dict, multimask: bool):
    kw = {"input_boxes": given.get("boxes"), "input_points": given.get("points"),
          "input_labels": given.get("point_labels"), "multimask_output": multimask}
    out = hf(pixel_values=pixels, **kw)
    return out.pred_masks, out.iou_scores


def official_reference(sam, pixels: torch.Tensor, given: dict, multimask: bool):
    # Sam.forward normalises its input: give it the pixels its preprocess maps back to `pixels`
    records = [{"image": x * sam.pixel_std + sam.pixel_mean, "original_size": (IMAGE, IMAGE)} for x in pixels]
    for i, record in enumerate(records):
        if "boxes" in given:
            record["boxes"] = given["boxes"][i]
        if "points" in given:
            record["point_coords"], record["point_labels"] = given["points"][i], given["point_labels"][i]
    outs = sam(records, multimask_output=multimask)
    return torch.stack([o["low_res_logits"] for o in outs]), torch.stack([o["iou_predictions"] for o in outs])


def test_image_embeddings_equal_transformers(hf_pair):
    hf, model = hf_pair
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(model.image_embeddings(pixels), hf.get_image_embeddings(pixels), atol=1e-4,
                                   rtol=1e-4)


def test_image_embeddings_equal_segment_anything(official_pair):
    sam, model = official_pair
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(model.image_embeddings(pixels), sam.image_encoder(pixels), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", PROMPTS)
@pytest.mark.parametrize("source", ["transformers", "segment_anything"])
def test_masks_and_iou_equal_the_source(source, kind, hf_pair, official_pair):
    ref_model, model = hf_pair if source == "transformers" else official_pair
    reference = hf_reference if source == "transformers" else official_reference
    pixels, given = torch.randn(2, 3, IMAGE, IMAGE), prompts(kind)
    multimask = kind == "points"  # the 3 ambiguity masks for clicks, the single mask otherwise
    with torch.no_grad():
        out = model(pixels, multimask_output=multimask, **given)
        masks, iou = reference(ref_model, pixels, given, multimask)
    assert out.masks.shape == (2, 2, 3 if multimask else 1, 4 * GRID, 4 * GRID)
    torch.testing.assert_close(out.masks, masks, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.iou, iou, atol=1e-4, rtol=1e-4)


def test_the_shapes_tell_the_official_architecture(official_pair):
    cfg = official_pair[1].config.sam
    assert (cfg.encoder.heads, cfg.encoder.window_size, cfg.encoder.global_attn_indexes) == (4, 4, [1])
    assert (cfg.encoder.image_size, cfg.encoder.mlp_ratio, cfg.decoder.mask_in_chans, cfg.decoder.mlp_dim) == (
        IMAGE, 2.0, 8, 48)


def test_converted_model_is_a_trim_checkpoint(official_pair, tmp_path):
    """Once converted, the model saves and reloads as a trim model directory, no segment-anything file needed."""
    model = official_pair[1]
    save_model(model, tmp_path / "trim")
    again = from_pretrained(str(tmp_path / "trim"))
    assert isinstance(again, Sam) and again.config == model.config
    pixels, given = torch.randn(1, 3, IMAGE, IMAGE), prompts("box", b=1)
    with torch.no_grad():
        torch.testing.assert_close(again(pixels, **given).masks, model(pixels, **given).masks)


def test_bare_image_encoder_checkpoint(official_pair, tmp_path):
    sam = official_pair[0]
    path = tmp_path / "encoder.pth"
    torch.save(sam.image_encoder.state_dict(), path)
    with pytest.warns(UserWarning, match="start fresh"):
        model = from_pretrained(str(path))
    pixels = torch.randn(1, 3, IMAGE, IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(model.image_embeddings(pixels), sam.image_encoder(pixels), atol=1e-4, rtol=1e-4)


def test_encoder_without_rel_pos_needs_its_layout(tmp_path):
    """Without relative-position tables the heads and windows are not in the weights: asked for, then used."""
    encoder = ImageEncoderViT(**ENCODER).eval()
    randomise(encoder)
    path = tmp_path / "encoder.pth"
    torch.save(encoder.state_dict(), path)
    with pytest.raises(ConfigError, match=r"heads, window_size, global_attn_indexes.*encoder=\{"):
        from_pretrained(str(path))
    with pytest.warns(UserWarning, match="start fresh"):
        model = from_pretrained(str(path), encoder={"heads": 4, "window_size": 4, "global_attn_indexes": [1]})
    pixels = torch.randn(1, 3, IMAGE, IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(model.image_embeddings(pixels), encoder(pixels), atol=1e-4, rtol=1e-4)


def test_not_a_sam_checkpoint(tmp_path):
    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(CheckpointError, match=r"other\.pth is not a SAM checkpoint.*fc\.weight"):
        from_pretrained(str(other))
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"notes\.pth cannot be read as a PyTorch state dict"):
        from_pretrained(str(text))


def test_unexpected_keys_are_named(official_pair, tmp_path):
    state = official_pair[0].state_dict()
    path = tmp_path / "extra.pth"
    torch.save({**state, "image_encoder.blocks.0.attn.gate": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=r"extra\.pth.*'blocks\.0\.attn\.gate'"):
        from_pretrained(str(path))
    torch.save({**state, "mask_decoder.extra_head.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=r"extra\.pth does not fit.*1 unexpected \(mask_decoder\.extra_head"):
        from_pretrained(str(path))


def test_sam_family_predicts_masks():
    with pytest.raises(ConfigError, match="task 'seg'"):
        ModelConfig(family="sam", task="vqa").validate()
    with pytest.raises(ConfigError, match="global_attn_indexes\\[0\\]=7"):
        ModelConfig.from_dict({"family": "sam", "task": "seg", "sam": {"encoder": {"global_attn_indexes": [7]}}})


def test_transformers_settings_segment_anything_fixes_are_checked(tmp_path):
    cfg = hf_config()
    cfg.mask_decoder_config.hidden_act = "gelu"
    cfg.save_pretrained(tmp_path)  # the config is read (and refused) before any weights
    with pytest.raises(ConfigError, match=r"mask_decoder_config\.hidden_act='gelu'.*'relu'"):
        from_pretrained(str(tmp_path))
