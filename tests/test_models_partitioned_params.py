"""Every parameter is read inside the forward of the module that owns it.

That is the contract DeepSpeed ZeRO-3 relies on: a parameter is partitioned (its ``.data`` an
empty tensor) except between the pre- and post-forward hooks of its own module, where it is
gathered. A parameter read anywhere else (``emb.weight[1]`` in a parent, ``F.linear(x,
child.weight)``, a weight's shape in the cost model) sees an empty tensor and fails. This test
partitions parameters the same way, without DeepSpeed, and runs every trimming mode, so trim
needs no ZeRO-3 "leaf" marking.
"""

from contextlib import contextmanager

import pytest
import torch
from torch import nn

from tiny_runs import vl_batch
from trim.models import ModelConfig, TrimConfig, create_model
from trim.models.clip_text import ClipTextConfig
from trim.models.config import VisionConfig
from trim.models.convert.open_clip import ClipTowers
from trim.prune import TRIM_MODES, HeadTrimmer, TokenTrimmer


@contextmanager
def partitioned(model: nn.Module):
    full = {p: p.data for p in model.parameters()}

    def release(module: nn.Module, *_) -> None:
        for p in module.parameters(recurse=False):
            p.data = torch.empty(0, dtype=p.dtype)

    def gather(module: nn.Module, *_) -> None:
        for p in module.parameters(recurse=False):
            p.data = full[p]

    handles = []
    for module in model.modules():
        handles += [module.register_forward_pre_hook(gather), module.register_forward_hook(release)]
        release(module)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for p, data in full.items():
            p.data = data


def randomise_trimmers(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, (TokenTrimmer, HeadTrimmer)):
            nn.init.normal_(m.out.weight, std=2.0)
            nn.init.zeros_(m.out.bias)


def vl_model(family: str, bridged: bool = False) -> nn.Module:
    if family == "vilt":
        trim = TrimConfig(vision_token_layers=[1], vision_head_layers=[0, 2], min_keep_tokens=2)
    else:
        trim = TrimConfig(vision_token_layers=[1], vision_head_layers=[1], text_head_layers=[1],
                          cross_token_layers=[0, 1], cross_head_layers=[0, 1], min_keep_tokens=2)
    cfg = ModelConfig(family=family, task="nlvr2", num_labels=2, trim=trim,
                      bridge_layers=[0, 1] if bridged else [])
    cfg.vision.layers = 3
    return create_model(cfg).eval()


@pytest.mark.parametrize("family,bridged", [("dual", False), ("dual", True), ("vilt", False)])
def test_vl_models_read_parameters_only_in_their_owners_forward(family, bridged):
    model, data = vl_model(family, bridged), vl_batch(images=2)
    randomise_trimmers(model)
    with torch.no_grad():
        reference = {mode: model(data, trim=mode) for mode in TRIM_MODES if mode != "train"}
        with partitioned(model):
            for mode in TRIM_MODES:
                out = model(data, trim=mode)
                if mode in reference:
                    torch.testing.assert_close(out.logits, reference[mode].logits, atol=1e-6, rtol=1e-6)
    assert (reference["eval"].cost_ratio < 1).all(), "the trimmers should prune, so eval slices and gathers"


def test_clip_towers_read_parameters_only_in_their_owners_forward():
    trim = TrimConfig(vision_token_layers=[1], vision_head_layers=[0], text_token_layers=[1], text_head_layers=[0])
    vision = VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=4, patch_bias=False, ln_pre=True)
    text = ClipTextConfig(vocab_size=100, context_length=12, width=32, layers=2, heads=4, output_dim=16)
    towers = ClipTowers(vision, text, 16, trim=trim).eval()
    randomise_trimmers(towers)
    pixels, ids = torch.randn(2, 3, 32, 32), torch.randint(1, 100, (2, 12))
    with torch.no_grad():
        reference = {mode: towers(pixels, ids, trim=mode) for mode in TRIM_MODES}
        with partitioned(towers):
            for mode in ("off", "masked", "eval"):
                torch.testing.assert_close(towers(pixels, ids, trim=mode), reference[mode])
            towers(pixels, ids, trim="train")
