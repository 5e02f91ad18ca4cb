"""The training-time soft key mask (SDPA with an additive log-mask) equals the renormalised
softmax ``p_ij = m_j exp(s_ij) / sum_k m_k exp(s_ik)`` in values and in gradients w.r.t. the
mask, q, k and v; the bool-mask path is untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trim.nn.attention import Attention
from trim.prune.gumbel import straight_through


def renormalised_reference(q, k, v, keep, attn_bias, scale):
    """The formula trim used before SDPA, written out (the reference only)."""
    scores = (q @ k.transpose(-2, -1)) * scale
    if attn_bias is not None:
        scores = scores + attn_bias
    m = keep[:, None, None, :].to(scores.dtype)
    shift = scores.detach().masked_fill(m == 0, float("-inf")).amax(-1, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    weights = torch.exp((scores - shift).clamp(max=20.0)) * m
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    return weights @ v


def soft_keep(b, n, *, generator, keep_only=None):
    """A straight-through 0/1 keep mask as the trimmers make it (value 0/1, gradient via a surrogate)."""
    prob = torch.rand(b, n, generator=generator, dtype=torch.float64).float().requires_grad_()
    hard = prob > 0.5
    hard[:, 0] = True  # a protected [CLS]
    if keep_only is not None:
        hard[:] = False
        hard[:, keep_only] = True
    return prob, straight_through(hard, prob)


def run_both(attn, q, k, v, prob, keep, attn_bias=None):
    results = []
    for fn in (lambda *a: attn._soft_masked_attention(*a),
               lambda *a: renormalised_reference(*a, attn.scale)):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        prob.grad = None
        out = fn(qq, kk, vv, keep, attn_bias)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
        m_grad, q_grad, k_grad, v_grad = torch.autograd.grad((out * grad_out).sum(), (prob, qq, kk, vv),
                                                             retain_graph=True)
        results.append((out.detach(), m_grad, q_grad, k_grad, v_grad))
    return results


def assert_close(new, ref, *, m_entries=None, atol=1e-5):
    names = ("output", "d/dm", "d/dq", "d/dk", "d/dv")
    for name, a, b in zip(names, new, ref):
        if name == "d/dm" and m_entries is not None:
            a, b = a[m_entries], b[m_entries]
        scale = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a, b, atol=atol * scale, rtol=1e-4, msg=f"{name} differs")


@pytest.mark.parametrize("with_bias", [False, True])
def test_soft_mask_matches_renormalised_softmax(with_bias):
    g = torch.Generator().manual_seed(0)
    attn = Attention(32, 4)
    b, h, n, d = 3, 4, 11, 8
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    prob, keep = soft_keep(b, n, generator=g)
    bias = torch.randn(1, h, n, n, generator=g) if with_bias else None
    new, ref = run_both(attn, q, k, v, prob, keep, bias)
    assert_close(new, ref)
    assert new[1].abs().sum() > 0  # the trimmer gets a gradient, pruned keys included
    assert (new[1][keep.detach() == 0] != 0).any()


def test_soft_mask_row_of_protected_tokens_only():
    """Every prunable key is pruned: only the protected [CLS] is attended."""
    g = torch.Generator().manual_seed(1)
    attn = Attention(32, 4)
    q, k, v = (torch.randn(2, 4, 9, 8, generator=g) for _ in range(3))
    prob, keep = soft_keep(2, 9, generator=g, keep_only=[0])
    new, ref = run_both(attn, q, k, v, prob, keep)
    assert_close(new, ref)
    torch.testing.assert_close(new[0], v[:, :, :1].expand_as(v), atol=1e-6, rtol=0)


def test_soft_mask_large_scores():
    """Scores up to ~80 in magnitude: values and q/k/v gradients still agree. The reference caps a pruned
    key's exp() at 20 above the kept maximum (to avoid 0 * inf), which also caps its gradient
    w.r.t. m; the SDPA form has no cap, so d/dm is compared where the cap did not act."""
    g = torch.Generator().manual_seed(2)
    attn = Attention(32, 4)
    q, k, v = (torch.randn(2, 4, 10, 8, generator=g) for _ in range(3))
    q = q * 20.0
    prob, keep = soft_keep(2, 10, generator=g)
    scores = (q @ k.transpose(-2, -1)) * attn.scale
    assert scores.abs().max() > 60
    new, ref = run_both(attn, q, k, v, prob, keep)
    m = keep.detach()[:, None, None, :]
    kept_max = scores.masked_fill(m == 0, float("-inf")).amax(-1, keepdim=True)
    capped = ((scores - kept_max) > 20).any(2).any(1)  # (B, N): keys whose exp() the reference capped
    assert capped.any() and not capped.all()
    assert_close(new, ref, m_entries=~capped)
    assert torch.isfinite(new[1]).all()


def test_soft_mask_through_attention_forward_matches_bool_mask():
    """A float 0/1 keep through `Attention.forward` gives the bool-mask output (same hard decisions)."""
    g = torch.Generator().manual_seed(3)
    attn = Attention(32, 4).eval()
    x = torch.randn(2, 7, 32, generator=g)
    keep = torch.rand(2, 7, generator=g) > 0.4
    keep[:, 0] = True
    soft = attn(x, key_keep=keep.float())
    hard = attn(x, key_keep=keep)
    torch.testing.assert_close(soft, hard, atol=1e-6, rtol=0)


def test_bool_mask_path_is_plain_sdpa():
    """The inference / masked-mode path (bool keep) is SDPA with the boolean mask, unchanged."""
    g = torch.Generator().manual_seed(4)
    attn = Attention(32, 4).eval()
    x = torch.randn(2, 7, 32, generator=g)
    keep = torch.rand(2, 7, generator=g) > 0.4
    keep[:, 0] = True
    q, k, v = (attn._split_heads(t) for t in attn._project(x, x, None))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], scale=attn.scale)
    ref = attn.proj(ref.transpose(1, 2).reshape(2, 7, 32))
    assert torch.equal(attn(x, key_keep=keep), ref)
