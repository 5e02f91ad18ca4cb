"""The packed layout: a batch of samples with different decisions pays for what each kept.

Invariant 1 holds for it (packed = masked, 1e-5) through blocks and whole models with
per-sample token and head decisions, and invariant 4 (reported cost = counted FLOPs) holds
on the packed path at batch > 1, where the padded layout pays for padding and head unions.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from trim.models import ModelConfig, TrimConfig, VisionConfig, create_model
from trim.nn import CrossBlock, PostNormBlock, PreNormBlock, TokenSet
from trim.prune import HeadTrimmer, TokenTrimmer

D, H = 32, 4


@pytest.fixture(params=["per-sample", "padded-core"])
def core(request, monkeypatch):
    """Both ways packed attention runs its core: one call per sample, or one padded call
    (chosen by `_CALL_FLOPS`, the per-call overhead; 0 always loops, a huge one always pads)."""
    import trim.nn.attention as attention

    monkeypatch.setattr(attention, "_CALL_FLOPS", 0.0 if request.param == "per-sample" else 1e15)
    return request.param


def per_sample_decisions(b: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(b, n, generator=g) < torch.linspace(0.3, 0.9, b)[:, None]  # each sample its own share
    protect = torch.zeros(b, n, dtype=torch.bool)
    protect[:, 0] = True
    return keep | protect, protect


def head_sets(b: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(b, H, generator=g) < 0.5
    keep[:, 0] = True
    keep[0] = True  # one sample keeps every head, the others subsets
    return keep


@pytest.mark.parametrize("block_cls", [PreNormBlock, PostNormBlock])
def test_self_blocks_packed_equal_masked(block_cls, core):
    torch.manual_seed(0)
    block = block_cls(D, H).eval()
    b, n = 5, 13
    x = torch.randn(b, n, D)
    keep, protect = per_sample_decisions(b, n, seed=1)
    heads = head_sets(b, seed=2)
    masked = TokenSet.start(x, protect=protect, soft=False).prune(keep)
    packed = TokenSet.start(x, protect=protect, physical=True, packed=True).prune(keep)
    assert packed.x.shape == (1, int(keep.sum()), D), "packed holds exactly the kept tokens"
    with torch.no_grad():
        out_m = block(masked.x, keep=masked.keep, head_mask=heads.float())
        out_p = block(packed.x, packing=packed.packing, head_keep=heads)
    restored = packed.with_x(out_p).restore()
    torch.testing.assert_close(restored[keep], out_m[keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(restored[~keep], x[~keep])  # pruned tokens pass through unchanged


def test_cross_block_packs_both_streams(core):
    torch.manual_seed(0)
    block = CrossBlock(D, H, context_dim=D).eval()
    b = 4
    x, ctx = torch.randn(b, 9, D), torch.randn(b, 15, D)
    keep, protect = per_sample_decisions(b, 9, seed=3)
    ctx_keep, ctx_protect = per_sample_decisions(b, 15, seed=4)
    heads, cross_heads = head_sets(b, seed=5), head_sets(b, seed=6)
    m = TokenSet.start(x, protect=protect, soft=False).prune(keep)
    mc = TokenSet.start(ctx, protect=ctx_protect, soft=False).prune(ctx_keep)
    p = TokenSet.start(x, protect=protect, physical=True, packed=True).prune(keep)
    pc = TokenSet.start(ctx, protect=ctx_protect, physical=True, packed=True).prune(ctx_keep)
    with torch.no_grad():
        out_m = block(m.x, mc.x, keep=m.keep, context_keep=mc.keep, head_mask=heads.float(),
                      cross_head_mask=cross_heads.float())
        out_p = block(p.x, pc.x, packing=p.packing, context_packing=pc.packing, head_keep=heads,
                      cross_head_keep=cross_heads)
    torch.testing.assert_close(p.with_x(out_p).restore()[keep], out_m[keep], atol=1e-5, rtol=1e-5)


def test_token_set_helpers_in_the_packed_layout():
    x = torch.randn(3, 7, D)
    keep, protect = per_sample_decisions(3, 7, seed=7)
    segment = (torch.arange(7) >= 3).long().expand(3, 7)
    padded = TokenSet.start(x, protect=protect, segment=segment, physical=True).prune(keep)
    packed = TokenSet.start(x, protect=protect, segment=segment, physical=True, packed=True).prune(keep)
    assert packed.packing.lengths == keep.sum(1).tolist()
    for seg in (None, 0, 1):
        torch.testing.assert_close(packed.mean(seg), padded.mean(seg))
    torch.testing.assert_close(packed.first(), x[:, 0])
    torch.testing.assert_close(packed.grid()[packed.keep], padded.x[padded.keep])
    torch.testing.assert_close(packed.alive_positions(), keep)
    per_sample = torch.arange(3.0)[:, None]
    assert packed.broadcast(per_sample)[0, :, 0].tolist() == packed.packing.sample.float().tolist()
    # pruning twice keeps each sample's tokens in order
    again = packed.prune(torch.rand(packed.keep.shape) < 0.5)
    torch.testing.assert_close(again.grid()[again.keep], x[again.alive_positions()])


def spread(model: torch.nn.Module, seed: int = 0) -> None:
    """Trimmers that decide differently per sample, for tokens and for heads."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (TokenTrimmer, HeadTrimmer)):
            with torch.no_grad():
                m.out.weight.copy_(torch.randn(m.out.weight.shape, generator=g) * 3.0)
                m.out.bias.zero_()


def make(family: str, task: str, *, bridged: bool = False) -> torch.nn.Module:
    if family == "dual":
        trim = TrimConfig(vision_token_layers=[1, 2], vision_head_layers=[1], text_head_layers=[1],
                          cross_token_layers=[0, 1], cross_head_layers=[0, 1], min_keep_tokens=2)
    else:
        trim = TrimConfig(vision_token_layers=[1, 2], vision_head_layers=[0, 2], min_keep_tokens=2)
    cfg = ModelConfig(family=family, task=task, num_labels=7 if task == "vqa" else 2, trim=trim,
                      vision=VisionConfig(layers=3), bridge_layers=[0, 1] if bridged else [])
    model = create_model(cfg).eval()
    spread(model)
    return model


def batch(task: str, b: int = 6, *, text_padding: bool = True) -> dict:
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(5, 500, (b, 10), generator=g)
    mask = torch.ones_like(ids)
    if text_padding:
        mask[1, 6:], mask[3, 8:] = 0, 0
        ids[mask == 0] = 0
    shape = (b, 2, 3, 64, 64) if task == "nlvr2" else (b, 3, 64, 64)
    return {"pixel_values": torch.randn(shape, generator=g), "input_ids": ids, "attention_mask": mask}


CASES = [("dual", "vqa", False), ("dual", "nlvr2", False), ("dual", "vqa", True), ("vilt", "vqa", False),
         ("vilt", "nlvr2", False)]


@pytest.mark.parametrize("family,task,bridged", CASES)
def test_packed_equals_masked_through_whole_models(family, task, bridged, core):
    model, data = make(family, task, bridged=bridged), batch(task)
    with torch.no_grad():
        masked = model(data, trim="masked", track_alive=True)
        packed = model(data, trim="eval", layout="packed", track_alive=True)
        padded = model(data, trim="eval", layout="padded", track_alive=True)
    torch.testing.assert_close(packed.logits, masked.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.logits, masked.logits, atol=1e-5, rtol=1e-5)
    heads = torch.stack([r.heads for layers in packed.records.values() for r in layers])
    tokens = torch.stack([r.tokens for layers in packed.records.values() for r in layers])
    assert any(len(set(row.tolist())) > 1 for row in heads), "samples should keep different heads"
    assert any(len(set(row.tolist())) > 1 for row in tokens), "samples should keep different token counts"
    for name, layers in masked.records.items():
        for a, b in zip(layers, packed.records[name]):
            torch.testing.assert_close(a.tokens, b.tokens)
            torch.testing.assert_close(a.heads, b.heads)
            if a.alive is not None:
                torch.testing.assert_close(a.alive, b.alive)
    # packed pays per sample: what each sample costs alone (masked), never the batch's padding;
    # where heads are masked rather than sliced (small layers) every head is paid for
    if core == "per-sample":
        torch.testing.assert_close(packed.cost_ratio, masked.cost_ratio, atol=1e-6, rtol=1e-6)
        assert float(padded.cost_ratio.mean()) > float(packed.cost_ratio.mean()) + 0.02
    else:
        assert (packed.cost_ratio >= masked.cost_ratio - 1e-6).all()
    # whatever the batch ran, each sample's own cost (what the budget calibrates) is the masked one
    for out in (packed, padded):
        torch.testing.assert_close(out.sample_cost, masked.cost_ratio, atol=1e-6, rtol=1e-6)
    assert float(padded.cost_ratio.mean()) > float(padded.sample_cost.mean()) + 0.02


@pytest.mark.parametrize("family", ["dual", "vilt"])
def test_packed_cost_matches_counted_flops_at_batch_above_one(family, core):
    """Invariant 4 on the packed path: summed per-sample cost = FLOPs the batch really ran."""
    model, data = make(family, "vqa"), batch("vqa", b=5, text_padding=False)
    prunable = ("stack", "text_layers", "image_layers", "cross_trimmers")

    def count(**kw):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False, depth=8) as c, torch.no_grad():
            out = model(data, **kw)
        per_module = {k: sum(v.values()) for k, v in c.get_flop_counts().items()}
        inside = [k for k in per_module if set(k.split(".")) & set(prunable)]
        outermost = [k for k in inside if not any(k.startswith(o + ".") for o in inside if o != k)]
        return sum(per_module[k] for k in outermost), out

    full, _ = count(trim="off")
    packed, out = count(trim="eval", layout="packed")
    padded, out_padded = count(trim="eval", layout="padded")
    assert len(set(out.cost_ratio.tolist())) > 1, "samples should cost differently"
    assert float(out.cost_ratio.mean()) == pytest.approx(packed / full, rel=0.02)
    assert float(out_padded.cost_ratio.mean()) == pytest.approx(padded / full, rel=0.02)
    if core == "per-sample":  # small layers mask heads instead, and may then count more than the padded union
        assert packed < padded


def test_batch_of_one_is_the_same_in_both_layouts():
    model = make("dual", "vqa")
    data = {k: v[:1] for k, v in batch("vqa").items()}
    with torch.no_grad():
        packed, padded = model(data, trim="eval", layout="packed"), model(data, trim="eval", layout="padded")
    torch.testing.assert_close(packed.logits, padded.logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(packed.cost_ratio, padded.cost_ratio)


def test_unknown_layout_is_named():
    with pytest.raises(ValueError, match=r"layout='jagged' is not a layout; choose one of \('auto', 'packed', 'padded'\)"):
        make("vilt", "vqa")(batch("vqa"), trim="eval", layout="jagged")


def test_auto_layout_packs_large_models_only():
    from trim.eval.bench_model import meter_config
    from trim.prune import auto_layout

    meter = meter_config().vision
    assert auto_layout(meter.width, meter.num_tokens) == "packed"  # 24 x 325 x 768^2 FLOPs a block per sample
    tiny = VisionConfig()
    assert auto_layout(tiny.width, tiny.num_tokens) == "padded"  # packing's fixed ops would outweigh it
    model, data = make("dual", "vqa"), batch("vqa")
    with torch.no_grad():
        auto, padded = model(data, trim="eval"), model(data, trim="eval", layout="padded")
    torch.testing.assert_close(auto.cost_ratio, padded.cost_ratio)
