"""open_clip -> trim (ClipTowers: VisionTower + ClipTextTower) and METER's build_meter.

Invariant 2 (off = original, 1e-4): tiny random open_clip architectures are registered with
``open_clip.add_model_config``, their ``state_dict`` saved with ``torch.save``, and both
sides load them through ``open_clip.create_model(name, pretrained=<path>)`` — the path a
user takes with a pretrained tag. Nothing is downloaded.
"""

import json

import open_clip
import pytest
import torch
import transformers

from trim.errors import ConfigError
from trim.models import from_pretrained
from trim.models.config import TrimConfig
from trim.models.convert.open_clip import (ClipTowers, build_meter, convert_open_clip, vision_tower_from_open_clip)
from trim.models.dual import DualStreamModel
from trim.prune import HeadTrimmer, TokenTrimmer

CONTEXT, VOCAB, IMAGE = 12, 64, 32
TOWERS = {"vision_cfg": {"image_size": IMAGE, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
          "text_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB, "width": 32, "heads": 4, "layers": 2}}
ARCHS = {
    # the standard CLIP: GELU, class-token pooling, causal text pooled at the EOT (argmax) token
    "trim-test-clip": {"embed_dim": 16, **TOWERS},
    # OpenAI-style QuickGELU, layer scale, no ln_pre, average pooling with LN after it, patch
    # dropout (off in eval), CustomTextCLIP text with a biased projection pooled at an eos id
    "trim-test-clip-variants": {
        "embed_dim": 24, "quick_gelu": True, "custom_text": True, "init_logit_bias": -5.0,
        "vision_cfg": {**TOWERS["vision_cfg"], "ls_init_value": 0.5, "no_ln_pre": True, "pool_type": "avg",
                       "final_ln_after_pool": True, "patch_dropout": 0.5, "mlp_ratio": 3.0},
        "text_cfg": {**TOWERS["text_cfg"], "ls_init_value": 0.5, "proj_bias": True, "pool_type": "eos",
                     "eos_id": 5}},
    # bi-directional text (CLIPA-style) pooled at the last token
    "trim-test-clip-bidir": {"embed_dim": 16, "vision_cfg": TOWERS["vision_cfg"],
                             "text_cfg": {**TOWERS["text_cfg"], "no_causal_mask": True, "pool_type": "last"}},
}
TRIM = {"vision_token_layers": [1], "vision_head_layers": [0, 1], "text_token_layers": [1], "text_head_layers": [0]}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """Architecture name -> a saved state dict (random weights, moved off their init)."""
    root = tmp_path_factory.mktemp("open_clip")
    paths = {}
    for name, cfg in ARCHS.items():
        (root / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(root / f"{name}.json")
        torch.manual_seed(len(paths))
        model = open_clip.create_model(name)
        with torch.no_grad():  # off the init (zero biases, unit norms) so a swapped tensor would show
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        paths[name] = str(root / f"{name}.pt")
        torch.save(model.state_dict(), paths[name])
    return paths


def source(name: str, path: str, **kwargs) -> torch.nn.Module:
    return open_clip.create_model(name, pretrained=path, **kwargs).eval()


def texts(arch: str, b: int = 3) -> torch.Tensor:
    """Token ids shaped like open_clip's tokenizer output: SOT, words, EOT (largest id), zero padding."""
    ids = torch.zeros(b, CONTEXT, dtype=torch.long)
    for i, n in enumerate((CONTEXT - 2, 5, 3)[:b]):
        ids[i, 0] = VOCAB - 2
        ids[i, 1:n + 1] = torch.randint(6, VOCAB - 2, (n,))
        ids[i, n + 1 if n + 1 < CONTEXT else CONTEXT - 1] = VOCAB - 1
    if ARCHS[arch]["text_cfg"].get("pool_type") == "eos":
        ids[ids == VOCAB - 1] = ARCHS[arch]["text_cfg"]["eos_id"]
    return ids


def reference(clip: torch.nn.Module, pixels: torch.Tensor, ids: torch.Tensor) -> dict:
    with torch.no_grad():
        ref = {"logits": clip.get_logits(pixels, ids)[0], "text": clip.encode_text(ids)}
        clip.visual.output_tokens = True
        ref["image"], ref["image_tokens"] = clip.visual(pixels)
        if hasattr(clip, "text"):
            clip.text.output_tokens = True
            ref["text_tokens"] = clip.text(ids)[1]
    return ref


@pytest.mark.parametrize("arch", list(ARCHS))
def test_off_reproduces_open_clip(arch, checkpoints):
    clip = source(arch, checkpoints[arch])
    towers = from_pretrained(f"open_clip:{arch}", pretrained=checkpoints[arch])  # the dispatcher's path
    assert isinstance(towers, ClipTowers)
    pixels, ids = torch.randn(3, 3, IMAGE, IMAGE), texts(arch)
    ref = reference(clip, pixels, ids)
    with torch.no_grad():
        image, text = towers.image_tower(pixels), towers.text_tower(ids)
        logits, _ = towers(pixels, ids)
    close = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(image.features, ref["image"], **close)
    torch.testing.assert_close(image.tokens[:, 1:], ref["image_tokens"], **close)  # open_clip drops the CLS
    torch.testing.assert_close(text.features, ref["text"], **close)
    if "text_tokens" in ref:
        torch.testing.assert_close(text.tokens, ref["text_tokens"], **close)
    torch.testing.assert_close(logits, ref["logits"], **close)


def test_resized_image_matches_open_clip_and_trimming_runs(checkpoints):
    arch = "trim-test-clip"
    clip = source(arch, checkpoints[arch], force_image_size=48)  # position embeddings interpolated on load
    towers = convert_open_clip(arch, pretrained=checkpoints[arch], image_size=48, trim=TRIM)
    assert towers.visual.cfg.image_size == 48
    assert sum(isinstance(m, (TokenTrimmer, HeadTrimmer)) for m in towers.modules()) == 5
    pixels, ids = torch.randn(2, 3, 48, 48), texts(arch, 2)
    with torch.no_grad():
        ref_image, ref_text = clip.encode_image(pixels), clip.encode_text(ids)
        # fresh trimmers keep everything: the gathered/sliced inference path equals the original
        for mode in ("off", "eval"):
            torch.testing.assert_close(towers.encode_image(pixels, trim=mode), ref_image, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(towers.encode_text(ids, trim=mode), ref_text, atol=1e-4, rtol=1e-4)
    # real decisions: the causal text tower gives the same result gathered (eval) as masked (invariant 1)
    with torch.no_grad():
        for m in towers.modules():
            if isinstance(m, (TokenTrimmer, HeadTrimmer)):
                m.out.bias.normal_(0.0, 2.0)
                m.out.weight.normal_(0.0, 0.5)
    for tower, x in ((towers.text_tower, ids), (towers.image_tower, pixels)):
        with torch.no_grad():
            masked, gathered = tower(x, trim="masked"), tower(x, trim="eval")
        torch.testing.assert_close(gathered.features, masked.features, atol=1e-5, rtol=1e-5)
        out = tower(x, trim="train")
        out.features.sum().backward()


def unsupported(**vision) -> torch.nn.Module:
    cfg = open_clip.CLIPVisionCfg(**{**TOWERS["vision_cfg"], **vision})
    return open_clip.CLIP(16, cfg, open_clip.CLIPTextCfg(**TOWERS["text_cfg"])).visual


@pytest.mark.parametrize("vision, match", [({"attentional_pool": True}, "attentional pooler"),
                                           ({"qk_norm": True}, "default CLIP block"),
                                           ({"pool_type": "none"}, "pool_type"),
                                           ({"image_size": (32, 48)}, "not square")])
def test_unsupported_vision_towers_are_refused(vision, match):
    with pytest.raises(ConfigError, match=match):
        vision_tower_from_open_clip(unsupported(**vision))


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("roberta")
    config = transformers.RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=26, type_vocab_size=1,
                                        layer_norm_eps=1e-5)
    transformers.RobertaModel(config).save_pretrained(directory)
    return str(directory)


# cross_width > the towers' width (METER with ViT-L): the physical TokenSet keeps its archive at
# the tower width when DualStreamModel projects it into the cross width, and the cross token
# trimmer's prune() then scatters wider rows into it (trim/models/dual.py, reported upstream).
@pytest.mark.parametrize("cross_width", [32, 48])  # 48: cross width differs from the towers' (METER with ViT-L)
def test_build_meter_runs_every_mode_and_fresh_trimmers_change_nothing(cross_width, checkpoints, roberta_dir):
    arch = "trim-test-clip"
    trim = {**TRIM, "cross_token_layers": [0], "cross_head_layers": [1]}
    model = build_meter(f"open_clip:{arch}", checkpoints[arch], roberta_dir, task="vqa", num_labels=5,
                        cross_layers=2, cross_width=cross_width, cross_heads=4, image_size=40, trim=trim)
    assert isinstance(model, DualStreamModel)
    clip = source(arch, checkpoints[arch], force_image_size=40)
    torch.testing.assert_close(model.vision.embed.pos_embed[0], clip.visual.positional_embedding.detach())
    # METER's init for the fusion part; trimmers keep their identity-at-start init (invariant 3)
    layer = model.text_layers[0].cross_attn.q_proj
    assert layer.bias.abs().sum() == 0 and 0.01 < float(layer.weight.detach().std()) < 0.03
    assert all(float(m.out.bias.detach().min()) == TrimConfig().init_keep_logit
               for m in model.modules() if isinstance(m, (TokenTrimmer, HeadTrimmer)))
    ids = torch.randint(3, 100, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    ids[mask == 0] = 1  # RoBERTa's <pad>
    batch = {"pixel_values": torch.randn(3, 3, 40, 40), "input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        outs = {mode: model(batch, trim=mode) for mode in ("off", "masked", "eval")}
    for mode, out in outs.items():
        assert out.logits.shape == (3, 5) and torch.isfinite(out.logits).all(), mode
    torch.testing.assert_close(outs["eval"].logits, outs["off"].logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["masked"].logits, outs["off"].logits, atol=1e-5, rtol=1e-5)
    train = model(batch, trim="train")
    (train.logits.sum() + train.cost_ratio.mean()).backward()
    assert all(p.grad is not None for p in model.cross_trimmers.parameters())
