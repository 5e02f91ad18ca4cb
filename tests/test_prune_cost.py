"""Design invariant 4: the analytic cost model matches torch's FLOP counter within 2%."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from trim.nn import CrossBlock, PostNormBlock, PreNormBlock, TokenSet
from trim.prune import CostMeter, HeadTrimmer, TokenTrimmer, TrimmedStack, block_flops, heads_to_run, start_tokens
from trim.prune.cost import head_trimmer_flops, token_trimmer_flops

D, H, N = 64, 8, 50


def counted(fn) -> int:
    # The fused CPU attention kernel reports zero FLOPs; the math backend is counted op by op.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("block_cls", [PreNormBlock, PostNormBlock])
@pytest.mark.parametrize("kept_tokens,kept_heads", [(50, 8), (25, 8), (50, 3), (17, 5), (4, 1)])
def test_self_blocks(block_cls, kept_tokens, kept_heads):
    block = block_cls(D, H)
    tokens = TokenSet.start(torch.randn(1, N, D), physical=True)
    keep = torch.zeros(1, N, dtype=torch.bool)
    keep[0, torch.randperm(N)[:kept_tokens]] = True
    tokens = tokens.prune(keep)
    head_mask = torch.zeros(1, H)
    head_mask[0, :kept_heads] = 1
    heads = heads_to_run(head_mask)
    flops = counted(lambda: block(tokens.x, keep=tokens.keep, head_mask=head_mask, heads=heads))
    assert block_flops(block, kept_tokens, kept_heads) == pytest.approx(flops, rel=0.02)


@pytest.mark.parametrize("n,m,h,hc", [(30, 40, 8, 8), (12, 40, 4, 2), (30, 9, 2, 6)])
def test_cross_block(n, m, h, hc):
    block = CrossBlock(D, H, context_dim=48)
    x, ctx = torch.randn(1, n, D), torch.randn(1, m, 48)
    hm, cm = torch.zeros(1, H), torch.zeros(1, H)
    hm[0, :h], cm[0, :hc] = 1, 1
    flops = counted(lambda: block(x, ctx, head_mask=hm, heads=heads_to_run(hm), cross_head_mask=cm,
                                  cross_heads=heads_to_run(cm)))
    assert block_flops(block, n, h, context_n=m, cross_heads=hc) == pytest.approx(flops, rel=0.02)


def test_trimmer_overheads():
    tok, head = TokenTrimmer(D, other_dim=40), HeadTrimmer(D, H, other_dim=40)
    tokens = TokenSet.start(torch.randn(1, N, D))
    other = torch.randn(1, 40)
    assert token_trimmer_flops(tok, N) == pytest.approx(counted(lambda: tok.logits(tokens, other)), rel=0.02)
    assert head_trimmer_flops(head) == pytest.approx(counted(lambda: head.logits(tokens.mean(), other)), rel=0.02)


def test_stack_cost_ratio_matches_counter():
    """Whole stack, batch 1, forced decisions: the meter's ratio equals counted FLOPs' ratio."""
    blocks = [PreNormBlock(D, H) for _ in range(6)]
    tok = {2: TokenTrimmer(D), 4: TokenTrimmer(D)}
    head = {3: HeadTrimmer(D, H)}
    tok[2].forced_ratio, tok[4].forced_ratio, head[3].forced_heads = 0.5, 0.5, 4
    stack = TrimmedStack(blocks, token_trimmers=tok, head_trimmers=head).eval()
    x = torch.randn(1, N, D)
    meter = CostMeter()
    trimmed = counted(lambda: stack(start_tokens(x, "eval"), mode="eval", meter=meter))
    full = counted(lambda: stack(start_tokens(x, "off"), mode="off"))
    assert float(meter.ratio()[0]) == pytest.approx(trimmed / full, rel=0.02)
    assert float(meter.ratio()[0]) < 0.7


@pytest.mark.parametrize("family", ["dual", "vilt"])
def test_model_cost_ratio_matches_counter(family):
    """Invariant 4 for whole models: the meter's ratio equals counted FLOPs of the prunable
    parts (stacks, cross layers, trimmers), with towers and cross layers pruned together."""
    from trim.models import ModelConfig, TrimConfig, VisionConfig, create_model

    trim = (TrimConfig(vision_token_layers=[1, 2], cross_token_layers=[0, 1], cross_head_layers=[1])
            if family == "dual" else TrimConfig(vision_token_layers=[1, 2], vision_head_layers=[2]))
    model = create_model(ModelConfig(family=family, vision=VisionConfig(layers=3), trim=trim)).eval()
    for m in model.modules():
        if isinstance(m, TokenTrimmer):
            m.forced_ratio = 0.5
        if isinstance(m, HeadTrimmer):
            m.forced_heads = 2
    ids = torch.randint(5, 500, (1, 12))
    batch = {"pixel_values": torch.randn(1, 3, 64, 64), "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    prunable = ("stack", "text_layers", "image_layers", "cross_trimmers")

    def count(mode):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False, depth=8) as c, torch.no_grad():
            out = model(batch, trim=mode)
        per_module = {k: sum(v.values()) for k, v in c.get_flop_counts().items()}
        inside = [k for k in per_module if set(k.split(".")) & set(prunable)]
        outermost = [k for k in inside if not any(k.startswith(o + ".") for o in inside if o != k)]
        return sum(per_module[k] for k in outermost), out

    full, _ = count("off")
    trimmed, out = count("eval")
    assert float(out.cost_ratio[0]) == pytest.approx(trimmed / full, rel=0.02)
    assert float(out.cost_ratio[0]) < 0.8
