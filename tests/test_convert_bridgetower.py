"""transformers BridgeTower -> trim: off = original (invariant 2), and invariant 1 through the bridges.

Tiny random BridgeTower models are saved with ``save_pretrained`` and loaded back through the
user's path, ``trim.models.from_pretrained(dir)``. The reference runs transformers' eager
attention: its sdpa path runs the cross layers' self-attention causally (see the quirk in
``trim.models.convert.bridgetower``), while BridgeTower is bidirectional.
"""

import pytest
import torch

pytest.importorskip("transformers")
from transformers import BridgeTowerConfig, BridgeTowerForImageAndTextRetrieval, BridgeTowerModel  # noqa: E402

from trim.errors import ConfigError  # noqa: E402
from trim.models import from_pretrained  # noqa: E402
from trim.prune import HeadTrimmer, TokenTrimmer  # noqa: E402

PAD, IMAGE = 1, 64
TRIM = {"vision_token_layers": [1], "cross_token_layers": [0, 1], "cross_head_layers": [1]}


def hf_config(**vision) -> BridgeTowerConfig:
    # 4 text layers, 2 cross layers: bridges read text/vision layers 2 and 3. Vision width 128 -> 2 heads.
    return BridgeTowerConfig(
        hidden_size=32, num_attention_heads=2, num_hidden_layers=2,
        text_config=dict(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=40),
        vision_config={"hidden_size": 128, "num_hidden_layers": 4, "image_size": IMAGE, "patch_size": 16, **vision})


def randomise(model: torch.nn.Module) -> None:
    """Weights far from init (LayerNorm affines, biases too), so a wrong mapping cannot hide."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("LayerNorm.weight") or ".ln_" in name else 0.0, 0.1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    torch.manual_seed(0)
    out = {}
    # The retrieval model also exercises the vision settings transformers ignores in BridgeTowerModel's
    # forward: 6 vision blocks (only 4 run), separate LayerNorms (unused), stop_gradient.
    for name, cls, cfg in [("model", BridgeTowerModel, hf_config()),
                           ("itm", BridgeTowerForImageAndTextRetrieval,
                            hf_config(num_hidden_layers=6, share_layernorm=False, stop_gradient=True))]:
        model = cls(cfg)
        randomise(model)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = path
    return out


def reference(cls, path):
    return cls.from_pretrained(path, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (3, 9), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2  # <s> ... </s>
    ids[1, 5], ids[1, 6:] = 2, PAD  # one padded sample
    return {"pixel_values": torch.randn(3, 3, IMAGE, IMAGE, generator=g), "input_ids": ids,
            "attention_mask": (ids != PAD).long()}


def hf_inputs(batch):
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "pixel_values": batch["pixel_values"]}


def test_model_off_equals_transformers(checkpoints, batch):
    model = from_pretrained(str(checkpoints["model"]))
    cfg = model.config
    assert cfg.bridge_layers == [2, 3] and cfg.vision.layers == 4 and cfg.vision.heads == 2
    assert cfg.task == "vqa"  # no ITM head in a plain BridgeTowerModel: a fresh task head
    hf = reference(BridgeTowerModel, checkpoints["model"])
    with torch.no_grad():
        expected = hf(**hf_inputs(batch)).pooler_output
        got = model(batch, trim="off").hidden
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_itm_off_equals_transformers(checkpoints, batch):
    model = from_pretrained(str(checkpoints["itm"]))
    assert model.config.task == "itm" and model.config.num_labels == 2
    assert model.config.vision.layers == 4  # vision blocks 4 and 5 are never run by transformers
    hf = reference(BridgeTowerForImageAndTextRetrieval, checkpoints["itm"])
    with torch.no_grad():
        expected = hf(**hf_inputs(batch)).logits
        got = model(batch, trim="off").logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_other_tasks_get_a_fresh_head_on_the_same_backbone(checkpoints, batch):
    itm = from_pretrained(str(checkpoints["itm"]))
    vqa = from_pretrained(str(checkpoints["itm"]), task="vqa", num_labels=5)
    assert vqa.config.task == "vqa" and vqa.config.num_labels == 5
    with torch.no_grad():
        torch.testing.assert_close(vqa(batch).hidden, itm(batch).hidden)
    with pytest.raises(ConfigError, match="ITM head has 2 outputs"):
        from_pretrained(str(checkpoints["itm"]), task="itm", num_labels=3)


def test_image_size_matches_interpolated_positions(checkpoints, batch):
    size = IMAGE + 32
    model = from_pretrained(str(checkpoints["model"]), image_size=size)
    pixels = torch.nn.functional.interpolate(batch["pixel_values"], size=(size, size))
    hf = reference(BridgeTowerModel, checkpoints["model"])
    with torch.no_grad():
        expected = hf(**{**hf_inputs(batch), "pixel_values": pixels}, interpolate_pos_encoding=True).pooler_output
        got = model({**batch, "pixel_values": pixels}, trim="off").hidden
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_fresh_trimmers_keep_everything(checkpoints, batch):
    model = from_pretrained(str(checkpoints["itm"]), trim=TRIM)
    with torch.no_grad():
        off, ev = model(batch, trim="off"), model(batch, trim="eval")
    torch.testing.assert_close(ev.logits, off.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ev.hidden, off.hidden, atol=1e-5, rtol=1e-5)


def test_masked_equals_physical_through_the_bridges(checkpoints, batch):
    model = from_pretrained(str(checkpoints["itm"]), trim=TRIM)
    torch.manual_seed(11)  # decisions that prune every stream, the vision tower and cross text unevenly
    for m in model.modules():
        if isinstance(m, (TokenTrimmer, HeadTrimmer)):
            for layer in m.children():  # re-drawn here so the decisions depend on this seed only
                if hasattr(layer, "reset_parameters"):
                    layer.reset_parameters()
            torch.nn.init.normal_(m.out.weight, std=2.0)
            torch.nn.init.zeros_(m.out.bias)
    with torch.no_grad():
        off, masked, ev = (model(batch, trim=mode) for mode in ("off", "masked", "eval"))
    torch.testing.assert_close(ev.hidden, masked.hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ev.logits, masked.logits, atol=1e-5, rtol=1e-5)
    for name in ("vision", "cross_text", "cross_image"):
        kept, full = ev.records[name][-1].tokens, off.records[name][-1].tokens
        torch.testing.assert_close(masked.records[name][-1].tokens, kept)
        assert (kept < full).any(), f"{name}: randomised trimmers should prune"
    assert (ev.records["vision"][-1].tokens < 17).all()
    for name in ("vision", "cross_text"):
        assert len(set(ev.records[name][-1].tokens.tolist())) > 1, f"{name}: samples should keep different counts"
    assert any((ev.records[k][-1].heads < 2).any() for k in ("cross_text", "cross_image")), "heads should be pruned"
    assert (ev.cost_ratio < 1).all()


@pytest.mark.parametrize("change,message", [
    (dict(share_cross_modal_transformer_layers=False), "share_cross_modal_transformer_layers=False"),
    (dict(link_tower_type="scaled_add"), "link_tower_type='scaled_add'"),
    (dict(share_link_tower_layers=True), "share_link_tower_layers=True"),
    (dict(layer_norm_eps=1e-6), "layer_norm_eps=1e-06 but text_config.layer_norm_eps=1e-05"),
    (dict(num_hidden_layers=5), "num_hidden_layers=5 cross layers but the text tower has 4"),
])
def test_unsupported_settings_say_what_is_wrong(tmp_path, change, message):
    cfg = hf_config()
    for key, value in change.items():
        setattr(cfg, key, value)
    cfg.save_pretrained(tmp_path)  # the config is checked before any weight is read
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_pretrained(str(tmp_path))


def test_too_few_vision_blocks(tmp_path):
    hf_config(num_hidden_layers=4, remove_last_layer=True).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"vision tower has 3 blocks .* as text layers \(4\)"):
        from_pretrained(str(tmp_path))
