"""Design invariant 1: the masked (training) forward equals the gathered/sliced (inference)
forward for the same hard decisions, per sample, in a batch with different decisions."""

import pytest
import torch

from trim.nn import CrossBlock, PostNormBlock, PreNormBlock, TokenSet
from trim.prune import CostMeter, HeadTrimmer, TokenTrimmer, TrimmedStack, heads_to_run, start_tokens

B, N, D, H = 4, 17, 32, 4
TOL = 1e-5


def random_decisions(b: int, n: int, h: int):
    keep = torch.rand(b, n) < 0.5
    keep[:, 0] = True  # CLS
    heads = torch.rand(b, h) < 0.6
    heads[torch.arange(b), torch.randint(0, h, (b,))] = True
    return keep, heads.float()


def run_both(block, x, keep, head_mask, valid=None):
    protect = torch.zeros_like(keep)
    protect[:, 0] = True
    masked = TokenSet.start(x, valid=valid, protect=protect).prune(keep.float())
    out_masked = block(masked.x, keep=masked.keep, head_mask=head_mask)
    phys = TokenSet.start(x, valid=valid, protect=protect, physical=True).prune(keep)
    phys = phys.with_x(block(phys.x, keep=phys.keep, head_mask=head_mask, heads=heads_to_run(head_mask)))
    return out_masked, phys.restore(), phys


@pytest.mark.parametrize("block_cls", [PreNormBlock, PostNormBlock])
@pytest.mark.parametrize("fused", [True, False])
def test_self_attention_blocks(block_cls, fused):
    block = block_cls(D, H, fused_qkv=fused).eval()
    x = torch.randn(B, N, D)
    keep, head_mask = random_decisions(B, N, H)
    assert len(set(keep.sum(1).tolist())) > 1, "samples should keep different token counts"
    out_masked, out_phys, phys = run_both(block, x, keep, head_mask)
    torch.testing.assert_close(out_phys, out_masked, atol=TOL, rtol=TOL)
    assert phys.x.shape[1] == int(keep.sum(1).max())  # gathered to the batch maximum
    # Pruned tokens are not updated.
    torch.testing.assert_close(out_masked[~keep], x[~keep])


def test_padding_is_dropped_physically_and_ignored_in_masked():
    block = PostNormBlock(D, H).eval()
    x = torch.randn(B, N, D)
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[1, 10:] = False
    valid[3, 5:] = False
    keep, head_mask = random_decisions(B, N, H)
    out_masked, out_phys, _ = run_both(block, x, keep, head_mask, valid=valid)
    torch.testing.assert_close(out_phys, out_masked, atol=TOL, rtol=TOL)
    # Changing padding values changes nothing at valid positions.
    x2 = x.clone()
    x2[~valid] = 100.0
    out2, _, _ = run_both(block, x2, keep, head_mask, valid=valid)
    torch.testing.assert_close(out2[valid], out_masked[valid], atol=TOL, rtol=TOL)


@pytest.mark.parametrize("norm_first", [False, True])
def test_cross_block(norm_first):
    block = CrossBlock(D, H, context_dim=24, norm_first=norm_first).eval()
    x, ctx = torch.randn(B, N, D), torch.randn(B, 9, 24)
    keep, head_mask = random_decisions(B, N, H)
    ctx_keep, cross_mask = random_decisions(B, 9, H)
    protect = torch.zeros_like(keep)
    protect[:, 0] = True
    ctx_protect = torch.zeros_like(ctx_keep)
    ctx_protect[:, 0] = True

    m = TokenSet.start(x, protect=protect).prune(keep.float())
    mc = TokenSet.start(ctx, protect=ctx_protect).prune(ctx_keep.float())
    out_masked = block(m.x, mc.x, keep=m.keep, context_keep=mc.keep, head_mask=head_mask, cross_head_mask=cross_mask)

    p = TokenSet.start(x, protect=protect, physical=True).prune(keep)
    pc = TokenSet.start(ctx, protect=ctx_protect, physical=True).prune(ctx_keep)
    p = p.with_x(block(p.x, pc.x, keep=p.keep, context_keep=pc.keep, head_mask=head_mask,
                       heads=heads_to_run(head_mask), cross_head_mask=cross_mask, cross_heads=heads_to_run(cross_mask)))
    torch.testing.assert_close(p.restore(), out_masked, atol=TOL, rtol=TOL)


def test_pruned_token_stays_pruned_and_comes_back_with_last_value():
    blocks = [PreNormBlock(D, H).eval() for _ in range(3)]
    x = torch.randn(2, N, D)
    protect = torch.zeros(2, N, dtype=torch.bool)
    protect[:, 0] = True
    t = TokenSet.start(x, protect=protect, physical=True)
    t = t.with_x(blocks[0](t.x, keep=t.keep))
    after_first = t.restore().clone()
    drop = torch.ones(2, N, dtype=torch.bool)
    drop[:, 5] = False
    t = t.prune(drop)
    assert (t.index != 5).all()
    for blk in blocks[1:]:
        t = t.with_x(blk(t.x, keep=t.keep))
    restored = t.restore()
    torch.testing.assert_close(restored[:, 5], after_first[:, 5])  # last value, not updated since
    assert not torch.allclose(restored[:, 6], after_first[:, 6])


def stack_with_trimmers(block_cls, layers=4):
    blocks = [block_cls(D, H) for _ in range(layers)]
    tok = {1: TokenTrimmer(D, other_dim=16, min_keep=2), 2: TokenTrimmer(D, other_dim=16)}
    head = {1: HeadTrimmer(D, H, other_dim=16), 3: HeadTrimmer(D, H, other_dim=16)}
    for t in [*tok.values(), *head.values()]:  # make decisions differ per sample
        torch.nn.init.normal_(t.out.weight, std=2.0)
        torch.nn.init.zeros_(t.out.bias)
    return TrimmedStack(blocks, token_trimmers=tok, head_trimmers=head).eval()


@pytest.mark.parametrize("block_cls", [PreNormBlock, PostNormBlock])
def test_stack_end_to_end_masked_equals_eval(block_cls):
    stack = stack_with_trimmers(block_cls)
    x, other = torch.randn(B, N, D), torch.randn(B, 16)
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[2, 12:] = False
    protect = torch.zeros(B, N, dtype=torch.bool)
    protect[:, 0] = True
    outs, recs = {}, {}
    for mode in ("masked", "eval"):
        recs[mode] = []
        t = stack(start_tokens(x, mode, valid=valid, protect=protect), mode=mode, other=other, records=recs[mode])
        outs[mode] = t.restore()
    torch.testing.assert_close(outs["eval"][valid], outs["masked"][valid], atol=TOL, rtol=TOL)
    kept = torch.stack([r.tokens for r in recs["eval"]])
    assert (kept[-1] < kept[0]).any(), "the trimmers should have pruned something"
    for a, b in zip(recs["masked"], recs["eval"]):
        torch.testing.assert_close(a.tokens, b.tokens)
        torch.testing.assert_close(a.heads, b.heads)


def test_fresh_trimmers_keep_everything():
    blocks = [PreNormBlock(D, H) for _ in range(3)]
    stack = TrimmedStack(blocks, token_trimmers={1: TokenTrimmer(D)}, head_trimmers={0: HeadTrimmer(D, H)}).eval()
    x = torch.randn(B, N, D)
    meter, recs = CostMeter(), []
    out = stack(start_tokens(x, "eval"), mode="eval", meter=meter, records=recs).restore()
    ref = stack(start_tokens(x, "off"), mode="off").restore()
    torch.testing.assert_close(out, ref, atol=TOL, rtol=TOL)
    assert all(int(r.tokens.min()) == N and int(r.heads.min()) == H for r in recs)
    # Trimmer overhead is counted, and small.
    assert 1.0 < float(meter.ratio()[0]) < 1.05
