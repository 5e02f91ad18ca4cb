"""Multi-head attention: the one place in trim where attention math lives.

Everything a pruning method needs is an argument of `Attention.forward`:

* ``key_keep`` (B, Nk): which keys may be attended. A bool mask goes to
  ``scaled_dot_product_attention``; a float mask (0/1 values carrying straight-through
  gradients during training) renormalises the softmax over the kept keys,
  ``p_ij = m_j exp(s_ij) / sum_k m_k exp(s_ik)``, so the trimmer that made ``m`` gets a
  gradient. For 0/1 values both give the same result.
* ``head_mask`` (B, H) float: each head's output is scaled per sample before the output
  projection (0 = head dropped, gradients flow to the head trimmer).
* ``heads`` (H',) long: compute only these heads by slicing the q/k/v rows and the output
  projection columns (physical head pruning). ``head_mask`` is then given for all H heads
  and sliced here, so a batch can run the union of its kept heads and still mask per sample.
* ``attn_bias``: additive bias (relative position) broadcastable to (B, H, Nq, Nk); sliced
  with ``heads`` like the heads themselves.
* ``query_index`` (B, Nq'): compute outputs only for these query tokens (big.LITTLE P-block,
  semi-cross attention: a subset of tokens attends to all tokens).

The projections are modules and attention calls them (``self.qkv(x)``, ``self.proj(out)``),
so forward hooks fire, ZeRO-3 gathers each projection's parameters in that projection's own
forward, and an adapter that wraps a projection (LoRA: a module holding ``base_layer`` and
adding its low-rank path; SSF) takes effect with no special case here.

Physical head slicing (``heads`` given) is the one exception to "any module will do": it
computes only the kept heads' rows of q/k/v and columns of the output projection, which a
`SliceableLinear` does inside its own forward. An adapter's extra path does not know about
heads, so slicing through it would drop the adapter's contribution or fail on shapes.
Slicing therefore needs plain `SliceableLinear` projections: merge adapters into the weights
first (trim's adapters are mergeable by design); `Attention` raises a `TypeError` naming the
projection otherwise. The masked layouts (``head_mask`` without ``heads``) work with any
projection module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def head_rows(heads: Tensor, head_dim: int) -> Tensor:
    """Row indices of the given heads in a (H * head_dim, ...) projection weight."""
    offsets = torch.arange(head_dim, device=heads.device)
    return (heads[:, None] * head_dim + offsets).reshape(-1)


class SliceableLinear(nn.Linear):
    """An `nn.Linear` that can also run on a subset of its output rows or input columns.

    ``layer(x)`` is exactly ``nn.Linear``. ``layer(x, rows=r)`` computes only output features
    ``r`` (``x @ W[r].T + b[r]``); ``layer(x, cols=c)`` reads only input features ``c``
    (``x @ W[:, c].T + b``). The slicing happens inside this module's forward, so hooks and
    ZeRO-3's parameter gathering see every read of the weights.
    """

    def forward(self, x: Tensor, rows: Tensor | None = None, cols: Tensor | None = None) -> Tensor:
        w, b = self.weight, self.bias
        if rows is not None:
            w = w.index_select(0, rows)
            b = None if b is None else b.index_select(0, rows)
        if cols is not None:
            w = w.index_select(1, cols)
        return F.linear(x, w, b)


class Attention(nn.Module):
    """Self- or cross-attention with fused or split q/k/v projections."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        kv_dim: int | None = None,
        head_dim: int | None = None,
        fused_qkv: bool = True,
        qkv_bias: bool = True,
        out_bias: bool = True,
    ) -> None:
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = head_dim or dim // num_heads
        if head_dim is None and dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}; pass head_dim explicitly")
        self.inner_dim = self.num_heads * self.head_dim
        self.kv_dim = kv_dim or dim
        self.is_cross = kv_dim is not None
        # Cross-attention reads keys/values from another stream, so it is always split.
        self.fused_qkv = fused_qkv and not self.is_cross
        self.scale = self.head_dim**-0.5
        if self.fused_qkv:
            self.qkv = SliceableLinear(dim, 3 * self.inner_dim, bias=qkv_bias)
        else:
            self.q_proj = SliceableLinear(dim, self.inner_dim, bias=qkv_bias)
            self.k_proj = SliceableLinear(self.kv_dim, self.inner_dim, bias=qkv_bias)
            self.v_proj = SliceableLinear(self.kv_dim, self.inner_dim, bias=qkv_bias)
        self.proj = SliceableLinear(self.inner_dim, dim, bias=out_bias)

    # -- projections -------------------------------------------------------------------
    def _linear(self, name: str, x: Tensor, *, rows: Tensor | None = None, cols: Tensor | None = None) -> Tensor:
        """Call projection ``name``; with ``rows`` / ``cols`` (physical head slicing) only a plain one."""
        layer = getattr(self, name)
        if rows is None and cols is None:
            return layer(x)
        if not isinstance(layer, SliceableLinear) or type(layer).forward is not SliceableLinear.forward:
            raise TypeError(f"physical head slicing (heads=...) computes only the kept heads of {name}, but {name} is "
                            f"a {type(layer).__name__}, not a plain SliceableLinear (an adapter around it?): merge "
                            f"the adapter into the weights first, or run without head slicing (trim='masked')")
        return layer(x, rows=rows, cols=cols)

    def _project(self, x: Tensor, context: Tensor, heads: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        rows = None if heads is None else head_rows(heads, self.head_dim)
        if self.fused_qkv:
            if rows is not None:
                rows = torch.cat([rows, rows + self.inner_dim, rows + 2 * self.inner_dim])
            return self._linear("qkv", x, rows=rows).chunk(3, dim=-1)
        return (self._linear("q_proj", x, rows=rows), self._linear("k_proj", context, rows=rows),
                self._linear("v_proj", context, rows=rows))

    def _split_heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, -1, self.head_dim).transpose(1, 2)

    # -- forward -------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        key_keep: Tensor | None = None,
        head_mask: Tensor | None = None,
        heads: Tensor | None = None,
        attn_bias: Tensor | None = None,
        query_index: Tensor | None = None,
    ) -> Tensor:
        if self.is_cross and context is None:
            raise ValueError("cross-attention needs `context` (the other stream's tokens)")
        context = x if context is None else context
        if query_index is not None:
            x = x.gather(1, query_index[..., None].expand(-1, -1, x.shape[-1]))
        if self.fused_qkv and query_index is not None:
            # Queries come from a subset but keys/values from every token: project separately.
            q, _, _ = self._project(x, x, heads)
            _, k, v = self._project(context, context, heads)
        else:
            q, k, v = self._project(x, context, heads)
        q, k, v = (self._split_heads(t) for t in (q, k, v))

        if attn_bias is not None:
            if heads is not None and attn_bias.shape[1] != 1:
                attn_bias = attn_bias.index_select(1, heads)
            if query_index is not None and attn_bias.shape[2] != 1:
                idx = query_index[:, None, :, None].expand(-1, attn_bias.shape[1], -1, attn_bias.shape[3])
                attn_bias = attn_bias.expand(query_index.shape[0], -1, -1, -1).gather(2, idx)

        if key_keep is not None and key_keep.is_floating_point():
            out = self._soft_masked_attention(q, k, v, key_keep, attn_bias)
        else:
            mask = attn_bias
            if key_keep is not None:
                keep = key_keep[:, None, None, :]
                mask = keep if mask is None else mask.masked_fill(~keep, float("-inf"))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)

        if head_mask is not None:
            hm = head_mask if heads is None else head_mask.index_select(1, heads)
            out = out * hm[:, :, None, None].to(out.dtype)
        out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)
        return self._linear("proj", out, cols=None if heads is None else head_rows(heads, self.head_dim))

    def _soft_masked_attention(
        self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor, attn_bias: Tensor | None
    ) -> Tensor:
        scores = (q @ k.transpose(-2, -1)) * self.scale
        if attn_bias is not None:
            scores = scores + attn_bias
        m = keep[:, None, None, :].to(scores.dtype)
        # Subtracting the max over kept keys only stabilises exp(); it cancels in the ratio.
        shift = scores.detach().masked_fill(m == 0, float("-inf")).amax(-1, keepdim=True)
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        # Kept keys sit at <= 0 after the shift; pruned ones may be far above it. Capping them
        # keeps exp() finite (0 * inf would be NaN) while their gradient w.r.t. m stays alive.
        weights = torch.exp((scores - shift).clamp(max=20.0)) * m
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
        return weights @ v
