"""Trimmers: gradients through Gumbel decisions, protected tokens, padding, minimum keep."""

import torch

from trim.nn import PreNormBlock, TokenSet
from trim.prune import CostMeter, HeadTrimmer, TokenTrimmer, TrimmedStack, start_tokens
from trim.prune.gumbel import TemperatureSchedule, deterministic, gumbel_sigmoid

D, H = 32, 4


def test_gradients_reach_both_trimmers_through_gumbel_decisions():
    tok, head = TokenTrimmer(D, other_dim=8), HeadTrimmer(D, H, other_dim=8)
    for t in (tok, head):  # past the keep-all start, so upstream layers see gradient too
        torch.nn.init.normal_(t.out.weight, std=0.5)
    stack = TrimmedStack([PreNormBlock(D, H) for _ in range(3)], token_trimmers={1: tok}, head_trimmers={1: head})
    x, other = torch.randn(4, 10, D), torch.randn(4, 8)
    meter = CostMeter()
    out = stack(start_tokens(x, "train"), mode="train", other=other, meter=meter)
    # Task-like loss only: the gradient must come through the straight-through masks.
    (out.x[:, 0] ** 2).sum().backward(retain_graph=True)
    for name, module in (("token", tok), ("head", head)):
        for pname, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} trimmer {pname} got no gradient"
    # The expected cost is differentiable too.
    tok.zero_grad(), head.zero_grad()
    meter.ratio().mean().backward()
    assert tok.out.bias.grad.abs() > 0 and head.out.bias.grad.abs().sum() > 0


def test_special_tokens_and_padding_are_never_pruned():
    trimmer = TokenTrimmer(D, min_keep=3)
    torch.nn.init.constant_(trimmer.out.bias, -50.0)  # asks to drop every token
    x = torch.randn(2, 12, D)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, 8:] = False
    protect = torch.zeros(2, 12, dtype=torch.bool)
    protect[:, 0] = True  # CLS
    protect[0, 11] = True  # an EOS
    for physical in (False, True):
        tokens = TokenSet.start(x, valid=valid, protect=protect, physical=physical, soft=False)
        for how in ("threshold", "sample"):
            decision, _ = trimmer(tokens, decision=how)
            assert decision.bool()[tokens.protect].all(), "special tokens must be kept"
            assert decision.bool()[~tokens.keep.bool()].all(), "padding is left to its own mask"
            pruned = tokens.prune(decision)
            content = pruned.keep.bool() & ~pruned.protect
            assert (content.sum(1) == 3).all(), "min_keep content tokens survive"
            assert pruned.protect.sum() == protect.sum()
    # The pooled (global) feature ignores padding: changing padding changes no logit.
    x2 = x.clone()
    x2[~valid] = 1e3
    a = trimmer.logits(TokenSet.start(x, valid=valid))
    b = trimmer.logits(TokenSet.start(x2, valid=valid))
    torch.testing.assert_close(a[valid], b[valid])


def test_forced_ratio_and_heads():
    trimmer, head = TokenTrimmer(D), HeadTrimmer(D, H)
    trimmer.forced_ratio, head.forced_heads = 0.25, 2
    tokens = TokenSet.start(torch.randn(3, 21, D), protect=torch.arange(21).expand(3, 21) == 0)
    decision, _ = trimmer(tokens)
    assert (decision.sum(1) == 1 + 5).all()  # CLS + ceil(20 * 0.25)
    mask, _ = head(tokens.mean())
    assert (mask.sum(1) == 2).all()


def test_gumbel_sigmoid_matches_bernoulli_and_is_straight_through():
    logits = torch.tensor([-2.0, 0.0, 1.0, 3.0]).repeat(20000, 1).requires_grad_()
    y = gumbel_sigmoid(logits, tau=1.0)
    assert set(y.detach().unique().tolist()) <= {0.0, 1.0}
    # For tau = 1 the relaxed sample exceeds 1/2 exactly with probability sigmoid(logit).
    torch.testing.assert_close(y.detach().mean(0), torch.sigmoid(logits[0].detach()), atol=0.015, rtol=0)
    y.sum().backward()
    assert (logits.grad > 0).all()
    assert deterministic(torch.tensor([-0.1, 0.1])).tolist() == [False, True]


def test_temperature_schedule_anneals():
    s = TemperatureSchedule(start=2.0, end=0.2, steps=10)
    values = [s(i) for i in range(12)]
    assert values[0] == 2.0 and abs(values[10] - 0.2) < 1e-9 and values[11] == 0.2
    assert all(a > b for a, b in zip(values[:10], values[1:11]))
