"""The VL models end to end: invariant 1 through whole models, identity at start, save/load."""

import pytest
import torch

from trim.errors import ConfigError
from trim.models import ModelConfig, TrimConfig, create_model, from_pretrained, load_model, save_model
from trim.prune import HeadTrimmer, TokenTrimmer

TRIM = {
    "dual": TrimConfig(vision_token_layers=[1, 2], vision_head_layers=[1], text_head_layers=[1],
                       cross_token_layers=[0, 1], cross_head_layers=[0, 1], min_keep_tokens=2),
    "vilt": TrimConfig(vision_token_layers=[1, 2], vision_head_layers=[0, 2], min_keep_tokens=2),
}


def make(family: str, task: str) -> torch.nn.Module:
    cfg = ModelConfig(family=family, task=task, num_labels=7 if task == "vqa" else 2, trim=TRIM[family])
    cfg.vision.layers = 3
    return create_model(cfg).eval()


def batch(task: str, b: int = 4) -> dict:
    ids = torch.randint(5, 500, (b, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:], mask[3, 8:] = 0, 0
    ids[mask == 0] = 0
    shape = (b, 2, 3, 64, 64) if task == "nlvr2" else (b, 3, 64, 64)
    return {"pixel_values": torch.randn(shape), "input_ids": ids, "attention_mask": mask}


def randomise_trimmers(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, (TokenTrimmer, HeadTrimmer)):
            torch.nn.init.normal_(m.out.weight, std=2.0)
            torch.nn.init.zeros_(m.out.bias)


CASES = [(f, t) for f in ("dual", "vilt") for t in ("vqa", "nlvr2")]


@pytest.mark.parametrize("family,task", CASES)
def test_fresh_trimmers_keep_everything(family, task):
    model, data = make(family, task), batch(task)
    with torch.no_grad():
        off, ev = model(data, trim="off"), model(data, trim="eval")
    torch.testing.assert_close(ev.logits, off.logits, atol=1e-5, rtol=1e-5)
    for name, layers in ev.records.items():
        for rec, ref in zip(layers, off.records[name]):
            torch.testing.assert_close(rec.tokens, ref.tokens)
            torch.testing.assert_close(rec.heads, ref.heads)


@pytest.mark.parametrize("family,task", CASES)
def test_masked_equals_physical_through_the_whole_model(family, task):
    model, data = make(family, task), batch(task)
    randomise_trimmers(model)
    with torch.no_grad():
        masked, ev = model(data, trim="masked", track_alive=True), model(data, trim="eval", track_alive=True)
    torch.testing.assert_close(ev.logits, masked.logits, atol=1e-5, rtol=1e-5)
    vision = "vilt" if family == "vilt" else "vision"
    keys = [k for k in ev.records if k.startswith(vision)]
    kept = torch.stack([r.tokens for r in ev.records[keys[0]]])
    assert (kept[-1] < kept[0]).all(), "randomised trimmers should prune"
    assert len(set(kept[-1].tolist())) > 1, "samples should keep different numbers of tokens"
    for k in keys:
        for a, b in zip(masked.records[k], ev.records[k]):
            torch.testing.assert_close(a.alive, b.alive)
    assert (ev.cost_ratio < 1).all()


@pytest.mark.parametrize("family,task", CASES)
def test_training_mode_sends_gradients_to_trimmers_and_backbone(family, task):
    model, data = make(family, task), batch(task)
    model.train()
    out = model(data, trim="train", tau=0.5)
    (out.logits.square().mean() + (out.cost_ratio.mean() - 0.5) ** 2).backward()
    trimmer_grads = [p.grad for p in model.trimmer_parameters()]
    assert trimmer_grads and all(g is not None for g in trimmer_grads)
    assert sum(float(g.abs().sum()) for g in trimmer_grads) > 0
    assert all(p.grad is not None for p in model.head.parameters())
    assert out.cost_ratio.requires_grad


@pytest.mark.parametrize("family", ["dual", "vilt"])
def test_save_load_roundtrip(tmp_path, family):
    model, data = make(family, "vqa"), batch("vqa")
    randomise_trimmers(model)
    save_model(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    for loaded in (load_model(tmp_path / "ckpt"), from_pretrained(str(tmp_path / "ckpt"))):
        with torch.no_grad():
            torch.testing.assert_close(loaded(data, trim="eval").logits, model(data, trim="eval").logits)


@pytest.mark.parametrize("family", ["dual", "vilt"])
def test_nlvr2_encodings_know_which_image_they_read(family):
    """A statement about "the left image" needs each image's encoding to know its side: swapping the
    pair must not just swap the pooled halves (it did in the dual model, both images typed alike)."""
    torch.manual_seed(0)
    model, data = make(family, "nlvr2"), batch("nlvr2")
    if family == "dual":  # zero at the start (METER: image 2's type starts as image 1's); give it a value
        torch.nn.init.normal_(model.pair_type_embeddings.weight)
    swapped = {**data, "pixel_values": data["pixel_values"].flip(1)}
    with torch.no_grad():
        hidden, hidden_swapped = model(data).hidden, model(swapped).hidden
    first, second = hidden.chunk(2, -1)
    assert not torch.allclose(hidden_swapped, torch.cat([second, first], -1), atol=1e-3)


def test_config_rejects_impossible_layers():
    cfg = ModelConfig(trim=TrimConfig(vision_token_layers=[14]))
    cfg.vision.layers = 12
    with pytest.raises(ConfigError, match=r"model.trim.vision_token_layers\[0\]=14 but the vision stack has 12 layers \(0..11\)"):
        cfg.validate()
    with pytest.raises(ConfigError, match="model.vision.widht is not a known key"):
        ModelConfig.from_dict({"vision": {"widht": 3}})


def test_conv_stem_keeps_the_token_grid_and_masked_equals_physical():
    cfg = ModelConfig(family="dual", task="vqa", num_labels=7, trim=TRIM["dual"])
    cfg.vision.layers, cfg.vision.stem = 3, "conv"
    model = create_model(cfg).eval()
    stem = model.vision.embed.proj
    strided = [m for m in stem if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == 3  # log2(patch_size 8)
    pixels = torch.randn(2, 3, 64, 64)
    assert model.vision.embed(pixels).shape == (2, cfg.vision.num_tokens, cfg.vision.width)
    # one sample's tokens do not depend on the rest of its batch (no BatchNorm statistics)
    torch.testing.assert_close(model.vision.embed(pixels[:1]), model.vision.embed(pixels)[:1])
    randomise_trimmers(model)
    data = batch("vqa")
    with torch.no_grad():
        torch.testing.assert_close(model(data, trim="eval").logits, model(data, trim="masked").logits,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change,message", [
    ({"stem": "resnet"}, "model.vision.stem='resnet'"),
    ({"stem": "conv", "patch_size": 6, "image_size": 60}, "power of two"),
])
def test_config_rejects_bad_stems(change, message):
    cfg = ModelConfig(family="dual")
    for key, value in change.items():
        setattr(cfg.vision, key, value)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
def test_teacher_resuming_from_the_students_prefix_equals_a_whole_pass(task):
    """The blocks before each tower's first trimmer compute alike with trim="train" and "off", so
    the distillation teacher resumes from the student's prefix (`ModelOutput.prefix`): same logits,
    hidden features, records and cost as a separate trim="off" pass."""
    model, data = make("dual", task), batch(task)
    randomise_trimmers(model)
    assert model.text.stack.prefix_length == 1 and model.vision.stack.prefix_length == 1  # text / vision heads at 1
    out = model(data, trim="train", tau=0.5)
    assert len(out.prefix) == (2 if task == "nlvr2" else 1)
    assert all(not t.requires_grad for image in out.prefix for t in image.values())
    with torch.no_grad():
        whole, resumed = model(data, trim="off"), model(data, trim="off", resume=out.prefix)
    torch.testing.assert_close(resumed.logits, whole.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(resumed.hidden, whole.hidden, atol=1e-6, rtol=0)
    torch.testing.assert_close(resumed.cost_ratio, whole.cost_ratio)
    assert {k: len(v) for k, v in resumed.records.items()} == {k: len(v) for k, v in whole.records.items()}
    with torch.no_grad():
        assert model(data, trim="off").prefix is None and model(data, trim="eval").prefix is None


def test_bridged_model_shares_no_prefix():
    """BridgeTower's bridges read every tower layer's output: nothing is shared, nothing skipped."""
    cfg = ModelConfig(family="dual", task="vqa", num_labels=7, trim=TRIM["dual"], bridge_layers=[0, 1])
    cfg.vision.layers = 3
    model = create_model(cfg).eval()
    assert model(batch("vqa"), trim="train").prefix is None
