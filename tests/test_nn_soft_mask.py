"""The float (straight-through) key mask: SDPA forward with ``m > 0``, renormalised-softmax
backward. Values and gradients must match the hand-written formula it replaced (kept here
only as the reference), and the forward must equal the bool-mask (inference) call."""

import pytest
import torch

from trim.nn import PostNormBlock, TokenSet
from trim.nn.attention import Attention, SoftMaskedAttention


def reference(q, k, v, keep, attn_bias, scale):
    """The former ``Attention._soft_masked_attention``: p_ij = m_j e_ij / sum_k m_k e_ik."""
    scores = (q @ k.transpose(-2, -1)) * scale
    if attn_bias is not None:
        scores = scores + attn_bias
    m = keep[:, None, None, :].to(scores.dtype)
    shift = scores.detach().masked_fill(m == 0, float("-inf")).amax(-1, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    weights = torch.exp((scores - shift).clamp(max=20.0)) * m
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    return weights @ v


def make_case(b=3, h=4, nq=9, nk=9, d=8, *, bias=None, far=False, dtype=torch.float32, seed=0):
    """Random q/k/v, a float 0/1 keep mask with key 0 protected, row 1 keeping only key 0."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g, dtype=dtype)
    k = torch.randn(b, h, nk, d, generator=g, dtype=dtype)
    v = torch.randn(b, h, nk, d, generator=g, dtype=dtype)
    keep = torch.rand(b, nk, generator=g) < 0.5
    keep[:, 0] = True  # protected token
    keep[1] = False
    keep[1, 0] = True  # only the protected token is kept
    if far:
        # Pruned keys score far above the kept ones (like padding filled with 100).
        k = torch.where(keep[:, None, :, None], k, 40.0 * q.mean(2, keepdim=True).sign())
    attn_bias = None
    if bias == "full":
        attn_bias = torch.randn(b, h, nq, nk, generator=g, dtype=dtype)
    elif bias == "broadcast":
        attn_bias = torch.randn(1, h, nq, nk, generator=g, dtype=dtype)
    elif bias == "far":
        attn_bias = torch.where(keep[:, None, None, :], 0.0, 100.0).to(dtype).expand(b, h, nq, nk).clone()
    m = keep.to(dtype)
    return q, k, v, m, attn_bias


def grads(fn, q, k, v, m, attn_bias, scale, upstream):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, m)]
    b = None if attn_bias is None else attn_bias.detach().clone().requires_grad_()
    out = fn(*leaves, b, scale)
    gs = torch.autograd.grad(out, leaves + ([b] if b is not None else []), upstream)
    return out.detach(), gs


@pytest.mark.parametrize("bias", [None, "full", "broadcast", "far"])
@pytest.mark.parametrize("far", [False, True])
@pytest.mark.parametrize("nq", [9, 5])  # self- and cross-attention shapes
def test_values_and_gradients_match_reference(bias, far, nq):
    q, k, v, m, attn_bias = make_case(nq=nq, bias=bias, far=far)
    scale = q.shape[-1] ** -0.5
    upstream = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=torch.Generator().manual_seed(1))
    out_ref, g_ref = grads(reference, q, k, v, m, attn_bias, scale, upstream)
    out_new, g_new = grads(SoftMaskedAttention.apply, q, k, v, m, attn_bias, scale, upstream)
    torch.testing.assert_close(out_new, out_ref, atol=1e-5, rtol=1e-5)
    names = ["q", "k", "v", "m", "attn_bias"]
    for name, a, b in zip(names, g_new, g_ref):
        assert a.shape == b.shape, name
        # dm of pruned keys far above the kept ones is large (capped e = exp(20)): relative check.
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda s, n=name: f"grad {n}: {s}")


def test_float64_exact_and_gradcheck():
    q, k, v, m, attn_bias = make_case(b=2, h=2, nq=4, nk=5, d=3, bias="full", dtype=torch.float64)
    scale = 0.7
    upstream = torch.randn(2, 2, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out_ref, g_ref = grads(reference, q, k, v, m, attn_bias, scale, upstream)
    out_new, g_new = grads(SoftMaskedAttention.apply, q, k, v, m, attn_bias, scale, upstream)
    torch.testing.assert_close(out_new, out_ref, atol=1e-12, rtol=1e-12)
    for a, b in zip(g_new, g_ref):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)
    # q, k, v and the bias against finite differences. (The forward is piecewise constant in
    # m, so m's straight-through gradient is checked against the reference above instead.)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, attn_bias)]
    assert torch.autograd.gradcheck(lambda a, b, c, d: SoftMaskedAttention.apply(a, b, c, m, d, scale), leaves)
    assert torch.autograd.gradcheck(lambda a, b, c: SoftMaskedAttention.apply(a, b, c, m, None, scale), leaves[:3])


def test_forward_equals_bool_mask_call_exactly():
    """Training (float mask) and inference (bool mask) run the very same SDPA call."""
    attn = Attention(32, 4)
    x = torch.randn(3, 11, 32)
    keep = torch.rand(3, 11) < 0.5
    keep[:, 0] = True
    bias = torch.randn(1, 4, 11, 11)
    m = keep.float().requires_grad_()
    soft = attn(x, key_keep=m, attn_bias=bias)
    with torch.no_grad():
        hard = attn(x, key_keep=keep, attn_bias=bias)
    assert torch.equal(soft.detach(), hard)


def test_bf16_gradient_dtypes():
    q, k, v, m, attn_bias = make_case(bias="full", dtype=torch.bfloat16)
    upstream = torch.randn(q.shape, dtype=torch.bfloat16)
    _, g_new = grads(SoftMaskedAttention.apply, q, k, v, m, attn_bias, 0.35, upstream)
    _, g_ref = grads(reference, *(t.double() for t in (q, k, v, m, attn_bias)), 0.35, upstream.double())
    for a, b in zip(g_new, g_ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.double(), b, atol=0.1, rtol=0.05)


def test_block_gradients_with_padding_at_100(monkeypatch):
    """End to end through a block, padding filled with 100: every gradient (input, keep mask,
    parameters) equals the one of the former formula."""
    torch.manual_seed(0)
    b, n, d, h = 4, 17, 32, 4
    block = PostNormBlock(d, h)
    x = torch.randn(b, n, d)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, 10:] = False
    valid[3, 5:] = False
    x[~valid] = 100.0
    keep = torch.rand(b, n) < 0.5
    keep[:, 0] = True
    protect = torch.zeros_like(keep)
    protect[:, 0] = True

    def run():
        xs = x.clone().requires_grad_()
        m = keep.float().requires_grad_()
        tokens = TokenSet.start(xs, valid=valid, protect=protect).prune(m)
        out = block(tokens.x, keep=tokens.keep)
        loss = (out[valid] * torch.linspace(-1, 1, d)).square().sum()
        block.zero_grad()
        loss.backward()
        return [out.detach(), xs.grad, m.grad] + [p.grad.clone() for p in block.parameters()]

    new = run()
    monkeypatch.setattr(Attention, "_soft_masked_attention",
                        lambda self, q, k, v, keep, bias: reference(q, k, v, keep, bias, self.scale))
    old = run()
    torch.testing.assert_close(new[0][valid], old[0][valid], atol=1e-5, rtol=1e-5)
    for a, b_ in zip(new[1:], old[1:]):
        torch.testing.assert_close(a, b_, atol=1e-4, rtol=1e-4)


def test_row_keeping_no_key_is_zero_with_finite_gradients():
    q, k, v, m, attn_bias = make_case(bias="full")
    m[2] = 0.0  # sample 2 keeps nothing (not even a protected token)
    upstream = torch.randn(q.shape)
    out, gs = grads(SoftMaskedAttention.apply, q, k, v, m, attn_bias, 0.35, upstream)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert all(bool(torch.isfinite(g).all()) for g in gs)
    dq, dk, dv = gs[:3]
    assert not dq[2].any() and not dk[2].any() and not dv[2].any()
    # The other samples are unaffected.
    out_ref, g_ref = grads(reference, q, k, v, m, attn_bias, 0.35, upstream)
    torch.testing.assert_close(out[:2], out_ref[:2], atol=1e-5, rtol=1e-5)
    for a, b in zip(gs, g_ref):
        torch.testing.assert_close(a[:2], b[:2], atol=1e-4, rtol=1e-4)
