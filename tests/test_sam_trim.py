"""Pruning the SAM image encoder: window-wise token trimming, big.LITTLE routing, prompt-aware
trimming and the encoder's cost model (docs/design.md, SAM section).

The tiny encoder has a 10x10 token grid in 4x4 windows (the bottom / right windows are mostly
padding) and a global block, with relative-position tables moved off their zero start so a
wrongly placed token shows.
"""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from trim.errors import ConfigError
from trim.models import ModelConfig, create_model
from trim.models.config import SamConfig, SamEncoderConfig, SamTrimConfig
from trim.nn import WindowSlots
from trim.prune import BigLittleRouter, feature_distillation
from trim.prune.windowed import WindowTokenTrimmer

ENCODER = dict(image_size=40, patch_size=4, width=32, depth=4, heads=4, window_size=4, global_attn_indexes=[2])
BOXES = torch.tensor([[[2.0, 2, 20, 20]], [[5.0, 8, 36, 30]]])


def sam(**trim):
    model = create_model(ModelConfig(family="sam", task="seg", sam=SamConfig(encoder=SamEncoderConfig(**ENCODER),
                                                                             trim=SamTrimConfig(**trim)))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name:
                p.normal_()
    return model


def decisive(model) -> None:
    """Give the trimmers scores that keep about half the tokens, differently per image."""
    with torch.no_grad():
        for trimmer in model.image_encoder.token_trimmers.values():
            torch.nn.init.normal_(trimmer.out.weight, std=2.0)
            trimmer.out.bias.zero_()
            if trimmer.cross is not None:
                torch.nn.init.normal_(trimmer.cross.weight, std=1.0)


def pixels(b=2):
    return torch.randn(b, 3, 40, 40)


@pytest.mark.parametrize("trim", [
    dict(token_layers=[1, 2, 3]),  # learned counts, one trimmer before the global block
    dict(token_layers=[1, 3], token_keep=0.4),
    dict(token_layers=[1, 2], route_layers=[2, 3]),  # trimming and routing together
    dict(token_layers=[1, 3], prompt_aware=True),
])
def test_window_trimming_masked_equals_physical(trim):
    """Invariant 1: the gathered (eval) encoder equals the masked one, batch of 2 with different counts."""
    model = sam(**trim)
    decisive(model)
    x = pixels()
    with torch.no_grad():
        masked = model(x, boxes=BOXES, trim="masked")
        physical = model(x, boxes=BOXES, trim="eval")
        off = model(x, boxes=BOXES)
        alone = torch.cat([model(x[i:i + 1], boxes=BOXES[i:i + 1], trim="eval").cost_ratio for i in range(2)])
    torch.testing.assert_close(physical.image_embeddings, masked.image_embeddings, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(physical.masks, masked.masks, atol=1e-4, rtol=1e-4)
    # Each image's own cost; a batch runs padded to its largest count, and reports what ran.
    torch.testing.assert_close(alone, masked.cost_ratio)
    assert (physical.cost_ratio >= masked.cost_ratio - 1e-6).all()
    assert (masked.cost_ratio < 0.95).all()
    assert not torch.allclose(physical.image_embeddings, off.image_embeddings, atol=1e-3)  # something was pruned


def test_every_window_keeps_the_same_number_of_tokens():
    model = sam(token_layers=[1])
    decisive(model)
    enc, trimmer = model.image_encoder, model.image_encoder.token_trimmers["1"]
    with torch.no_grad():
        grid = enc.blocks[0](enc.embed(pixels(3)))
        for physical in (False, True):
            slots = WindowSlots.start(grid, enc.geometry, physical=physical, soft=False)
            step = trimmer(slots)
            pruned = slots.prune(step.keep)
            kept = step.keep.sum(-1)  # (B, windows)
            assert (kept == step.count[:, None]).all()
            if physical:  # rectangular: (B, windows, max count, C), each image's own count valid
                assert pruned.x.shape[:3] == (3, enc.geometry.count, int(step.count.max()))
    assert len(set(step.count.tolist())) > 1  # the count is per image
    assert ((1 <= step.count) & (step.count < 16)).all()


def test_keep_all_trimming_equals_the_plain_encoder():
    """The window-slot layout itself changes nothing: trimmers that keep every token give SAM's output."""
    model = sam(token_layers=[1, 2], token_keep=1.0)
    x = pixels()
    with torch.no_grad():
        plain = model.image_encoder(x).embeddings
        for mode in ("masked", "eval"):
            out = model.image_encoder(x, trim=mode)
            torch.testing.assert_close(out.embeddings, plain, atol=1e-5, rtol=1e-5)
            assert out.cost_ratio.min() > 1.0  # the trimmers' own cost on top of the full encoder's


def test_fresh_trimmers_keep_nearly_everything():
    """Invariant 3: a fresh trimmer keeps all but (at most) a sliver, so the encoder starts as SAM."""
    model = sam(token_layers=[1, 3])
    x = pixels()
    with torch.no_grad():
        out = model.image_encoder(x, trim="eval")
        torch.testing.assert_close(out.embeddings, model.image_encoder(x).embeddings, atol=1e-5, rtol=1e-5)


def test_big_little_starts_as_designed():
    """At its start (gamma tiny, neutral scores) a routed block gives its selected tokens exactly the
    full block's output and leaves the rest within gamma of their input; every position stays finite."""
    model = sam(route_layers=[1, 2, 3])
    enc = model.image_encoder
    router, block = enc.routers["1"], enc.blocks[1]
    assert float(router.gamma.detach().abs().max()) <= 1e-4
    with torch.no_grad():
        slots = WindowSlots.start(enc.blocks[0](enc.embed(pixels())), enc.geometry, physical=True, soft=False)
        groups = slots.windows()
        routed = router(block, groups)
        full = block.forward_groups(groups.x, positions=groups.positions, padding=groups.padding)
        changed = (routed - groups.x).abs().amax(-1)
        selected = changed > 1e-2  # the P-block's updates are O(1), the E-block's O(gamma)
        assert (selected.sum(1) == 4).all()  # ceil(0.25 * 16) per window: grid tokens first
        assert not (selected & groups.padding).any()
        torch.testing.assert_close(routed[selected], full[selected], atol=1e-3, rtol=0)  # + gamma * E
        assert float(changed[~selected].max()) < 1e-2
        out = model(pixels(), boxes=BOXES, trim="eval")
    assert out.image_embeddings.shape == (2, 32, 10, 10) and torch.isfinite(out.image_embeddings).all()
    assert torch.isfinite(out.masks).all()
    assert 0.5 < float(out.cost_ratio[0]) < 0.9


def test_every_token_routed_is_the_plain_encoder():
    """route_keep=1: every token takes the P-block (semi-cross = self-attention), plus gamma * E: SAM within gamma."""
    model = sam(route_layers=[1, 2, 3], route_keep=1.0, gamma_init=0.0)
    x = pixels()
    with torch.no_grad():
        torch.testing.assert_close(model.image_encoder(x, trim="eval").embeddings, model.image_encoder(x).embeddings,
                                   atol=1e-5, rtol=1e-5)


def test_little_block_at_full_width_is_the_big_block():
    """The E-block built from the P-block's weights (sliced heads, SVD-factored MLP) computes the P-block's
    update exactly when it is as wide: the construction loses nothing but the width it drops."""
    model = sam()
    block = model.image_encoder.blocks[1]
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        router = BigLittleRouter(block, width=1.0)
        slots = WindowSlots.start(torch.randn(2, 10, 10, 32), model.image_encoder.geometry, physical=True, soft=False)
        g = slots.windows()
        expected = block.forward_groups(g.x, positions=g.positions, padding=g.padding) - g.x
        torch.testing.assert_close(router.little.update(g.x, positions=g.positions, padding=g.padding), expected,
                                   atol=1e-4, rtol=1e-4)


def test_gradients_reach_trimmers_predictor_and_gamma():
    model = sam(token_layers=[1], route_layers=[2, 3]).train()
    x = pixels()
    with torch.no_grad():
        teacher = model(x, boxes=BOXES).image_embeddings
    out = model(x, boxes=BOXES, trim="train", tau=0.5)
    loss = feature_distillation(out.image_embeddings, teacher) + out.masks.mean() + out.cost_ratio.mean()
    loss.backward()
    enc = model.image_encoder
    watched = [("trimmer", enc.token_trimmers["1"].out.weight), ("predictor", enc.routers["2"].predictor.weight),
               ("gamma", enc.routers["3"].gamma), ("E-block", enc.routers["3"].little.up.weight)]
    for name, param in watched:
        assert param.grad is not None and float(param.grad.abs().sum()) > 0, name
    assert out.cost_ratio.requires_grad


def test_feature_distillation_is_weighted_cosine():
    a = torch.randn(2, 8, 3, 3)
    assert float(feature_distillation(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(feature_distillation(a, -a)) == pytest.approx(5.0)  # 2.5 * (1 - (-1))
    with pytest.raises(ValueError, match="differ in shape"):
        feature_distillation(a, a[:1])


def counted(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("trim", [
    dict(),
    dict(token_layers=[1, 3], token_keep=0.5),
    dict(token_layers=[2], token_keep=0.3),  # first pruned at the global block
    dict(route_layers=[1, 2, 3]),
    dict(token_layers=[1, 2], token_keep=0.4, route_layers=[2, 3], prompt_aware=True),
])
def test_cost_model_equals_counted_flops(trim):
    """Invariant 4 for the whole encoder: patch embedding, windowed attention over padded windows,
    the global block, trimmers, routed blocks and the neck."""
    enc = sam(**trim).image_encoder
    x, prompt = pixels(1), torch.randn(1, 32)
    full = counted(lambda: enc(x))
    assert enc.full_flops() == pytest.approx(full, rel=0.02)
    out = []
    trimmed = counted(lambda: out.append(enc(x, trim="eval", prompt=prompt)))
    assert float(out[0].cost_ratio[0]) == pytest.approx(trimmed / full, rel=0.02)
    if trim:
        assert float(out[0].cost_ratio[0]) < 0.9


def test_prompt_aware_decisions_follow_the_prompt():
    model = sam(token_layers=[1], token_keep=0.5, prompt_aware=True)
    decisive(model)
    enc = model.image_encoder
    image = pixels(1)
    boxes = torch.tensor([[[0.0, 0, 12, 12], [24.0, 24, 40, 40]]])
    with torch.no_grad():
        pooled = model.pooled_prompts(boxes, None, None)[0]  # (2 prompts, out_chans)
        slots = WindowSlots.start(enc.blocks[0](enc.embed(image)), enc.geometry, physical=False, soft=False)
        first, second = (enc.token_trimmers["1"](slots, pooled[i:i + 1]).keep for i in range(2))
        assert (first != second).any()
        out = model(image, boxes=boxes, trim="eval")
    assert out.masks.shape[:2] == (1, 2) and out.image_embeddings.shape[0] == 2  # one encoder pass per prompt
    assert not torch.allclose(out.image_embeddings[0], out.image_embeddings[1])
    assert out.cost_ratio.shape == (1,)


@pytest.mark.parametrize("trim,message", [
    (dict(route_layers=[0, 2]), "first block stays full"),
    (dict(token_layers=[4]), r"token_layers\[0\]=4 but the encoder has 4 blocks"),
    (dict(little_width=0.3), "whole heads"),
    (dict(route_keep=0.0), "route_keep"),
    (dict(token_keep=1.5), "token_keep"),
    (dict(prompt_aware=True), "prompt_aware"),
    (dict(token_layers=[1, 1]), "twice"),
])
def test_config_errors_name_the_key(trim, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(family="sam", task="seg", sam=SamConfig(encoder=SamEncoderConfig(**ENCODER),
                                                            trim=SamTrimConfig(**trim))).validate()


def test_vl_trim_lists_point_to_the_sam_section():
    with pytest.raises(ConfigError, match="model.sam.trim"):
        ModelConfig.from_dict({"family": "sam", "task": "seg", "trim": {"vision_token_layers": [1]}})


def test_window_trimmer_is_a_trimmer():
    from trim.prune import trimmer_modules

    names = {name for name, _ in trimmer_modules(sam(token_layers=[1], route_layers=[2]))}
    assert names == {"image_encoder.token_trimmers.1", "image_encoder.routers.2"}
    assert isinstance(sam(token_layers=[1]).image_encoder.token_trimmers["1"], WindowTokenTrimmer)


def test_trimmed_sam_saves_loads_and_takes_plain_sam_weights(tmp_path):
    """A checkpoint rebuilds its trimmers and routers from config.json; a plain SAM's weights go into a
    trimmed one with the trimmers and routers fresh, and the E-blocks are rebuilt from the loaded blocks."""
    from trim.models import load_model, save_model
    from trim.models.io import transfer_weights
    from trim.prune import little_from_big

    model = sam(token_layers=[1], token_keep=0.5, route_layers=[2])
    save_model(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt").eval()
    x = pixels(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, boxes=BOXES[:1], trim="eval").masks,
                                   model(x, boxes=BOXES[:1], trim="eval").masks)
    plain = sam()
    fresh = transfer_weights(plain, model, source="plain sam")
    assert fresh and all(".token_trimmers." in k or ".routers." in k for k in fresh)
    model.image_encoder.init_little_from_big()
    expected = sam(route_layers=[2]).image_encoder.routers["2"].little
    little_from_big(expected, plain.image_encoder.blocks[2])
    for a, b in zip(model.image_encoder.routers["2"].little.parameters(), expected.parameters()):
        torch.testing.assert_close(a, b)
