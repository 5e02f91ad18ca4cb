"""Attention calls its projection modules: hooks fire, adapters that wrap a projection work,
and physical head slicing refuses an adapter it cannot slice through."""

import pytest
import torch
from torch import nn

from tiny_runs import vl_batch
from trim.models import ModelConfig, TrimConfig, create_model
from trim.nn import Attention, SliceableLinear
from trim.prune import HeadTrimmer, TokenTrimmer

PROJECTIONS = ("qkv", "q_proj", "k_proj", "v_proj", "proj")
TRIM = {"dual": dict(vision_token_layers=[1], vision_head_layers=[0], text_head_layers=[1], cross_token_layers=[0],
                     cross_head_layers=[1], min_keep_tokens=2),
        "vilt": dict(vision_token_layers=[1], vision_head_layers=[0, 1], min_keep_tokens=2)}


class LoraLinear(nn.Module):
    """peft's LoraLayer in miniature: holds the wrapped layer as ``base_layer`` and calls it."""

    def __init__(self, base_layer: nn.Module, rank: int = 2) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False)
        nn.init.zeros_(self.lora_B.weight)  # identity at start (design invariant 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


def make(family: str) -> nn.Module:
    cfg = ModelConfig(family=family, task="vqa", num_labels=5, trim=TrimConfig(**TRIM[family]))
    cfg.vision.layers = 2
    return create_model(cfg).eval()


def projections(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            for proj in PROJECTIONS:
                if hasattr(module, proj):
                    yield f"{name}.{proj}", module, proj


def wrap_with_lora(model: nn.Module) -> list[LoraLinear]:
    wrappers = []
    for _, attn, proj in list(projections(model)):
        wrapper = LoraLinear(getattr(attn, proj))
        setattr(attn, proj, wrapper)
        wrappers.append(wrapper)
    return wrappers


def randomise_trimmers(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, (TokenTrimmer, HeadTrimmer)):
            nn.init.normal_(m.out.weight, std=2.0)
            nn.init.zeros_(m.out.bias)


@pytest.mark.parametrize("family", ["dual", "vilt"])
@pytest.mark.parametrize("trim", ["off", "masked", "train"])
def test_forward_hooks_fire_on_every_projection(family, trim):
    model, calls = make(family), {}
    randomise_trimmers(model)
    for name, attn, proj in projections(model):
        def count(module, inputs, output, name=name):
            calls[name] = calls.get(name, 0) + 1
        getattr(attn, proj).register_forward_hook(count)
    with torch.no_grad():
        model(vl_batch(), trim=trim)
    names = [name for name, _, _ in projections(model)]
    assert any(n.endswith(".qkv") for n in names) or family == "vilt"
    assert [n for n in names if n not in calls] == [], "projections whose forward hooks never fired"


@pytest.mark.parametrize("family", ["dual", "vilt"])
def test_lora_wrapped_projections_start_as_identity_and_then_train(family):
    model, data = make(family), vl_batch()
    randomise_trimmers(model)
    with torch.no_grad():
        ref = {trim: model(data, trim=trim).logits for trim in ("off", "masked")}
    wrappers = wrap_with_lora(model)
    with torch.no_grad():
        for trim, logits in ref.items():
            torch.testing.assert_close(model(data, trim=trim).logits, logits, atol=1e-6, rtol=1e-6)
        for w in wrappers:
            nn.init.normal_(w.lora_B.weight, std=0.5)
        assert not torch.allclose(model(data, trim="off").logits, ref["off"], atol=1e-4)
    model.train()
    out = model(data, trim="train", tau=0.5)
    (out.logits.square().mean() + out.cost_ratio.mean()).backward()
    for w in wrappers:
        for p in (w.lora_A.weight, w.lora_B.weight):
            assert p.grad is not None and p.grad.abs().sum() > 0, "the adapter got no gradient"


@pytest.mark.parametrize("fused", [True, False])
def test_physical_head_slicing_needs_plain_projections(fused):
    attn = Attention(32, 4, fused_qkv=fused).eval()
    x, heads = torch.randn(2, 5, 32), torch.tensor([0, 2])
    mask = torch.tensor([[1.0, 0, 1, 0], [1, 0, 0, 0]])
    with torch.no_grad():
        sliced = attn(x, head_mask=mask, heads=heads)
        torch.testing.assert_close(sliced, attn(x, head_mask=mask), atol=1e-6, rtol=1e-6)
        attn.proj = LoraLinear(attn.proj)
        torch.testing.assert_close(attn(x, head_mask=mask), sliced, atol=1e-6, rtol=1e-6)  # masking: any module
        with pytest.raises(TypeError, match="proj is a LoraLinear.*merge the adapter"):
            attn(x, head_mask=mask, heads=heads)


def test_sliceable_linear_rows_and_columns():
    layer, x = SliceableLinear(6, 4), torch.randn(3, 6)
    rows, cols = torch.tensor([3, 1]), torch.tensor([0, 2, 5])
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    torch.testing.assert_close(layer(x, rows=rows), layer(x)[:, rows])
    expected = x[:, cols] @ layer.weight[:, cols].T + layer.bias
    torch.testing.assert_close(layer(x[:, cols], cols=cols), expected)
