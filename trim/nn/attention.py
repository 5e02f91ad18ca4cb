"""Multi-head attention: the one place in trim where attention math lives.

Everything a pruning method needs is an argument of `Attention.forward`:

* ``key_keep`` (B, Nk): which keys may be attended. A bool mask goes to
  ``scaled_dot_product_attention``; a float mask (0/1 values carrying straight-through
  gradients during training) runs the same SDPA call with ``m > 0`` in the forward
  (`SoftMaskedAttention`) and back-propagates the renormalised softmax over the kept keys,
  ``p_ij = m_j exp(s_ij) / sum_k m_k exp(s_ik)``, so the trimmer that made ``m`` gets a
  gradient. For 0/1 values both give the same result. A float mask that carries no gradient
  (the padding mask before any trimmer) takes the bool call: same values, SDPA's own backward.
* ``head_mask`` (B, H) float: each head's output is scaled per sample before the output
  projection (0 = head dropped, gradients flow to the head trimmer).
* ``heads`` (H',) long: compute only these heads by slicing the q/k/v rows and the output
  projection columns (physical head pruning). ``head_mask`` is then given for all H heads
  and sliced here, so a batch can run the union of its kept heads and still mask per sample.
* ``attn_bias``: additive bias (relative position) broadcastable to (B, H, Nq, Nk); sliced
  with ``heads`` like the heads themselves.
* ``query_index`` (B, Nq'): compute outputs only for these query tokens (big.LITTLE P-block,
  semi-cross attention: a subset of tokens attends to all tokens).
* ``positions`` (B or 1, N, 2): the (row, col) of each token on the grid of a decomposed
  relative-position bias (`DecomposedRelPos`, SAM's ``use_rel_pos``; built with
  ``rel_pos_size``). The bias depends on the projected queries, so it is computed here; with
  explicit positions it is right for any subset of the grid's tokens (kept tokens of a window,
  big.LITTLE's selected queries). Default: the tokens are the whole grid in row-major order.
* ``packing`` (and ``context_packing`` for cross-attention): ``x`` (and ``context``) hold the
  tokens of all samples packed as (1, T, D), a `trim.nn.tokens.Packing` says which rows are
  whose. Projections run once over the packed rows; attention runs per sample over its own
  keys (a varlen flash kernel on CUDA in half precision, else one SDPA call per sample:
  measured on CPU, batch 32, width 768, 80-300 tokens per sample, qkv + attention + output
  took 111 ms packed this way vs 194 ms padded, and 120 ms bucketed by length; when many
  short samples make the per-call overhead dominate, the core runs as one padded call). With
  ``head_keep`` (B, H) bool, each sample computes only its own kept heads: samples that keep
  every head share one projection call; the others slice their heads' q/k/v rows and output
  columns, so a batch pays for each sample's head count, not for the union. Where those extra
  calls would cost more than the heads they save (`Attention.slices_heads_per_sample`: small
  layers), a packed ``head_mask`` computes every head in one call and zeroes the dropped ones.

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

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trim.nn.windows import grid_positions

if TYPE_CHECKING:
    from trim.nn.tokens import Packing


def head_rows(heads: Tensor, head_dim: int) -> Tensor:
    """Row indices of the given heads in a (H * head_dim, ...) projection weight."""
    offsets = torch.arange(head_dim, device=heads.device)
    return (heads[:, None] * head_dim + offsets).reshape(-1)


class SliceableLinear(nn.Linear):
    """An `nn.Linear` that can also run on a subset of its output rows or input columns.

    ``layer(x)`` is exactly ``nn.Linear``. ``layer(x, rows=r)`` computes only output features
    ``r`` (``x @ W[r].T + b[r]``); ``layer(x, cols=c)`` reads only input features ``c``
    (``x @ W[:, c].T + b``). ``rows`` may be a ``slice`` (a contiguous block, read as a view of
    the weight: no copy). The slicing happens inside this module's forward, so hooks and
    ZeRO-3's parameter gathering see every read of the weights.
    """

    def forward(self, x: Tensor, rows: Tensor | slice | None = None, cols: Tensor | None = None) -> Tensor:
        w, b = self.weight, self.bias
        if isinstance(rows, slice):
            w, b = w[rows], None if b is None else b[rows]
        elif rows is not None:
            w = w.index_select(0, rows)
            b = None if b is None else b.index_select(0, rows)
        if cols is not None:
            w = w.index_select(1, cols)
        return F.linear(x, w, b)


class DecomposedRelPos(nn.Module):
    """Decomposed relative-position bias (MViTv2; the SAM / ViTDet image encoders' ``use_rel_pos``).

    One table per axis of a ``size`` = (rows, cols) grid. For a query at (r_i, c_i) and a key at
    (r_j, c_j), per head, with the unscaled query q_i::

        bias_ij = q_i . height[r_i - r_j + rows - 1] + q_i . width[c_i - c_j + cols - 1]

    added to the scaled scores. Each query is scored against every table entry once (a
    (Nq, 2 * size - 1) matmul per axis) and the entries gathered by offset, so positions can be
    any tokens of the grid: the bias of a subset is the subset of the full grid's bias.
    """

    def __init__(self, size: tuple[int, int], head_dim: int) -> None:
        super().__init__()
        self.size = size
        # Zero-initialised (no bias until trained), as SAM initialises them.
        self.height = nn.Parameter(torch.zeros(2 * size[0] - 1, head_dim))
        self.width = nn.Parameter(torch.zeros(2 * size[1] - 1, head_dim))

    def forward(self, q: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """Bias (B, H, Nq, Nk) for queries ``q`` (B, H, Nq, d) at ``q_pos`` and keys at ``k_pos``
        ((B or 1, N, 2) long (row, col))."""
        b, h, nq = q.shape[:3]
        bias = None
        for axis, table in enumerate((self.height, self.width)):
            scores = torch.matmul(q, table.to(q.dtype).t())  # q_i . table[o] for every offset o
            offset = q_pos[..., :, None, axis] - k_pos[..., None, :, axis] + self.size[axis] - 1
            term = scores.gather(-1, offset[:, None].expand(b, h, nq, -1))
            bias = term if bias is None else bias + term
        return bias


class Attention(nn.Module):
    """Self- or cross-attention with fused or split q/k/v projections.

    ``rel_pos_size`` (rows, cols): add a decomposed relative-position bias over a grid of that
    size (self-attention only; see `DecomposedRelPos` and ``positions`` in ``forward``).
    """

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
        rel_pos_size: tuple[int, int] | None = None,
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
        if rel_pos_size is not None and self.is_cross:
            raise ValueError("rel_pos_size: a relative-position bias needs queries and keys on one grid "
                             "(self-attention)")
        self.rel_pos = None if rel_pos_size is None else DecomposedRelPos(tuple(rel_pos_size), self.head_dim)

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

    def _project_semi_cross(self, x: Tensor, context: Tensor, heads: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """q of the query subset ``x``, k and v of every token (fused qkv, ``query_index``).

        A plain projection computes only the rows it needs (q rows for the subset, k/v rows for
        every token: the cost big.LITTLE's P-block is counted at); an adapter around it runs whole.
        """
        if heads is None and type(self.qkv) is SliceableLinear:
            d = self.inner_dim
            kv = self.qkv(context, rows=slice(d, 3 * d))
            return self.qkv(x, rows=slice(0, d)), kv[..., :d], kv[..., d:]
        q, _, _ = self._project(x, x, heads)
        _, k, v = self._project(context, context, heads)
        return q, k, v

    def _split_heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, -1, self.head_dim).transpose(1, 2)

    def first_token_attention(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """(B, N) attention weights of each sample's first token over its keys, mean over heads:
        ``mean_h softmax_j(q_0^h . k_j^h * scale)`` over the keys ``keep`` (B, N) allows (EViT reads
        [CLS]'s). Only the first token's query and the keys are projected; ``x`` is (B, N, D)."""
        if self.is_cross:
            raise ValueError("first_token_attention reads a self-attention layer; this one is cross-attention")
        first = x[:, :1]
        if self.fused_qkv:
            rows = torch.arange(self.inner_dim, device=x.device)
            q, k = self._linear("qkv", first, rows=rows), self._linear("qkv", x, rows=rows + self.inner_dim)
        else:
            q, k = self._linear("q_proj", first), self._linear("k_proj", x)
        b, n = x.shape[:2]
        q, k = q.view(b, self.num_heads, 1, self.head_dim), k.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-2, -1)).squeeze(2) * self.scale  # (B, H, N)
        if keep is not None:
            scores = scores.masked_fill(~keep.bool()[:, None], float("-inf"))
        return scores.softmax(-1).mean(1)

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
        packing: "Packing | None" = None,
        context_packing: "Packing | None" = None,
        head_keep: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        if self.is_cross and context is None:
            raise ValueError("cross-attention needs `context` (the other stream's tokens)")
        if positions is not None and self.rel_pos is None:
            raise ValueError("positions= places tokens for a relative-position bias, and this attention has none "
                             "(build it with rel_pos_size=)")
        if packing is not None:
            if self.rel_pos is not None:
                raise ValueError("packed attention has no relative-position bias: run this layer in the padded layout")
            if any(a is not None for a in (key_keep, heads, attn_bias, query_index, positions)):
                raise ValueError("packed attention takes only packing, context_packing, head_keep and head_mask: "
                                 "packed tokens are all alive, and heads are chosen per sample")
            if self.is_cross and context_packing is None:
                raise ValueError("packed cross-attention needs context_packing (how the other stream is packed)")
            return self._packed(x, context, packing, context_packing or packing, head_keep, head_mask)
        context = x if context is None else context
        if query_index is not None:
            x = x.gather(1, query_index[..., None].expand(-1, -1, x.shape[-1]))
        if self.fused_qkv and query_index is not None:
            # Queries come from a subset but keys/values from every token: project separately.
            q, k, v = self._project_semi_cross(x, context, heads)
        else:
            q, k, v = self._project(x, context, heads)
        q, k, v = (self._split_heads(t) for t in (q, k, v))

        if attn_bias is not None:
            if heads is not None and attn_bias.shape[1] != 1:
                attn_bias = attn_bias.index_select(1, heads)
            if query_index is not None and attn_bias.shape[2] != 1:
                idx = query_index[:, None, :, None].expand(-1, attn_bias.shape[1], -1, attn_bias.shape[3])
                attn_bias = attn_bias.expand(query_index.shape[0], -1, -1, -1).gather(2, idx)
        if self.rel_pos is not None:
            rel = self._rel_pos_bias(q, k.shape[2], positions, query_index)
            attn_bias = rel if attn_bias is None else attn_bias + rel

        if key_keep is not None and key_keep.is_floating_point() and not key_keep.requires_grad:
            key_keep = key_keep > 0  # a constant 0/1 mask (padding): the bool call, with SDPA's faster backward
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

    def _rel_pos_bias(self, q: Tensor, num_keys: int, positions: Tensor | None, query_index: Tensor | None) -> Tensor:
        if positions is None:
            rows, cols = self.rel_pos.size
            if num_keys != rows * cols:
                raise ValueError(f"{num_keys} tokens but the relative-position grid is {rows}x{cols}; pass positions= "
                                 "(the (row, col) of each token) for a subset of the grid")
            positions = grid_positions(rows, cols, q.device)[None]
        q_pos = positions
        if query_index is not None:
            q_pos = positions.expand(query_index.shape[0], -1, -1).gather(1, query_index[..., None].expand(-1, -1, 2))
        return self.rel_pos(q, q_pos, positions)

    # -- packed layout -----------------------------------------------------------------------
    def slices_heads_per_sample(self, packing: "Packing") -> bool:
        """Whether packed samples should compute only their own heads (``head_keep``: projection calls
        of their own) rather than every head in one call with dropped heads masked (``head_mask``).
        Worth it once a sample's projections dwarf the overhead of the extra calls (METER-size
        layers); not for a tiny model, whose per-sample calls would cost more than the heads saved."""
        if len(packing.lengths) == 1:  # a lone sample's own heads are the whole call: nothing extra
            return True
        tokens = packing.total / len(packing.lengths)
        return 8 * tokens * self.dim * self.inner_dim > _HEAD_SLICE_CALLS * _CALL_FLOPS

    def pads_core(self, packing: "Packing", context_packing: "Packing") -> bool:
        """Whether the attention core of these packed samples runs as one padded call (see
        `_padded_core_is_cheaper`); only when no sample has its own head subset."""
        return _padded_core_is_cheaper(packing.spans(), context_packing.spans(), self.inner_dim)

    def _packed(self, x: Tensor, context: Tensor | None, packing: "Packing", context_packing: "Packing",
                head_keep: Tensor | None, head_mask: Tensor | None = None) -> Tensor:
        x, context = x[0], x[0] if context is None else context[0]
        if head_keep is None:  # every head computed (dropped ones zeroed per token by a head mask)
            out = x.new_empty(x.shape[0], self.dim)
            scale = None if head_mask is None else head_mask[packing.sample]
            self._packed_all_heads(x, context, packing.spans(), context_packing.spans(), out, whole=True,
                                   head_scale=scale, padded=self.pads_core(packing, context_packing))
            return out[None]
        q_spans, k_spans = packing.spans(), context_packing.spans()
        everyone = range(len(q_spans))
        counts = head_keep.sum(1).tolist()
        full = [b for b in everyone if counts[b] == self.num_heads]
        partial = [b for b in everyone if counts[b] < self.num_heads]
        out = x.new_empty(x.shape[0], self.dim)
        if full:
            self._packed_all_heads(x, context, [q_spans[b] for b in full], [k_spans[b] for b in full], out,
                                   whole=len(full) == len(q_spans))
        for b in partial:  # each with its own head subset
            (qs, qe), (ks, ke) = q_spans[b], k_spans[b]
            heads = head_keep[b].nonzero().squeeze(1)
            q, k, v = self._project(x[qs:qe], context[ks:ke], heads)
            o = self._attend_spans(q, k, v, [(0, qe - qs)], [(0, ke - ks)], len(heads))
            out[qs:qe] = self._linear("proj", o, cols=head_rows(heads, self.head_dim))
        return out[None]

    def _packed_all_heads(self, x: Tensor, context: Tensor, q_spans: list[tuple[int, int]],
                          k_spans: list[tuple[int, int]], out: Tensor, *, whole: bool,
                          head_scale: Tensor | None = None, padded: bool = False) -> None:
        """Samples that keep every head: one projection call over all their rows (``whole``: every sample).
        ``head_scale`` (rows, H) multiplies each head's output per row (a packed head mask)."""
        if whole:
            xq, xk, qs, ks = x, context, q_spans, k_spans
        else:
            rows_q, qs = _rows(q_spans, x.device)
            rows_k, ks = _rows(k_spans, x.device)
            xq, xk = x[rows_q], context[rows_k]
        q, k, v = self._project(xq, xk, None)
        o = self._attend_spans(q, k, v, qs, ks, self.num_heads, padded=padded)
        if head_scale is not None:
            o = (o.view(-1, self.num_heads, self.head_dim) * head_scale[..., None].to(o.dtype)).view_as(o)
        o = self._linear("proj", o)
        if whole:
            out.copy_(o)
        else:
            out[rows_q] = o

    def _attend_spans(self, q: Tensor, k: Tensor, v: Tensor, q_spans: list[tuple[int, int]],
                      k_spans: list[tuple[int, int]], heads: int, *, padded: bool = False) -> Tensor:
        """Attention of each query span to its key span; (n, heads * head_dim) in, same out.
        ``padded``: one SDPA call over a padded view instead of one per span."""
        d = self.head_dim
        if padded:
            return self._attend_padded(q, k, v, q_spans, k_spans, heads)
        if _varlen_ok(q):
            return _varlen(q.view(-1, heads, d), k.view(-1, heads, d), v.view(-1, heads, d), q_spans, k_spans,
                           self.scale).reshape(q.shape[0], -1)
        outs = []
        for (qs, qe), (ks, ke) in zip(q_spans, k_spans):
            qh = q[qs:qe].view(qe - qs, heads, d).transpose(0, 1)
            kh = k[ks:ke].view(ke - ks, heads, d).transpose(0, 1)
            vh = v[ks:ke].view(ke - ks, heads, d).transpose(0, 1)
            o = F.scaled_dot_product_attention(qh[None], kh[None], vh[None], scale=self.scale)[0]
            outs.append(o.transpose(0, 1).reshape(qe - qs, heads * d))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _attend_padded(self, q: Tensor, k: Tensor, v: Tensor, q_spans: list[tuple[int, int]],
                       k_spans: list[tuple[int, int]], heads: int) -> Tensor:
        """The attention core of all spans in one SDPA call over a padded view (projections stay packed)."""
        d = self.head_dim
        q_rows, q_valid = _span_grid(q_spans, q.device)
        k_rows, k_valid = _span_grid(k_spans, q.device)

        def grid(t: Tensor, rows: Tensor) -> Tensor:
            return t[rows].view(*rows.shape, heads, d).transpose(1, 2)

        out = F.scaled_dot_product_attention(grid(q, q_rows), grid(k, k_rows), grid(v, k_rows),
                                             attn_mask=k_valid[:, None, None, :], scale=self.scale)
        return out.transpose(1, 2).reshape(*q_rows.shape, heads * d)[q_valid]

    def _soft_masked_attention(
        self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor, attn_bias: Tensor | None
    ) -> Tensor:
        return SoftMaskedAttention.apply(q, k, v, keep, attn_bias, self.scale)


class SoftMaskedAttention(torch.autograd.Function):
    """Attention over the keys a float 0/1 mask ``m`` (B, Nk) keeps, with a gradient for ``m``.

    Forward: ``scaled_dot_product_attention`` with the bool mask ``m > 0`` (merged into the
    additive ``attn_bias`` as ``-inf`` where pruned), i.e. exactly the inference computation,
    so the masked layout equals the physical one (design invariant 1) whatever the scores
    of the pruned keys.

    Backward: the gradient of the renormalised softmax
    ``p_ij = m_j e_ij / Z_i``, ``e_ij = exp(min(s_ij - shift_i, 20))``, ``Z_i = sum_k m_k e_ik``
    (``shift_i`` = max score over kept keys; the cap keeps ``e`` finite for pruned keys far
    above the kept ones), which for 0/1 values of ``m`` has the same forward value:

    * ``dL/dm_j = sum_{h,i} (e_ij / Z_i) (g_i . v_j - g_i . o_i)``
    * ``dS = P * (G V^T - rowsum(G * O))``, ``dq = dS K scale``, ``dk = dS^T Q scale``,
      ``dv = P^T G``, ``d attn_bias = dS`` summed over its broadcast dimensions
      (``P = A diag(m)`` with ``A_ij = e_ij / Z_i``, which is never formed: ``dv`` is
      ``m * (A^T G)`` and ``dS = m * dL/dm``'s summand).

    A query row that keeps no key at all outputs 0 (as SDPA does); its ``Z`` is taken as 1
    (the former formula divided by ``tiny`` there and could give inf/NaN gradients).

    Nothing of size Nq x Nk is kept between forward and backward: the backward recomputes the
    scores (one matmul) and shares them between the mask gradient and the q/k/v gradients.
    Replaces a hand-written softmax whose forward had to run on the slow path with every
    intermediate saved for autograd.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, m: Tensor, attn_bias: Tensor | None,  # type: ignore[override]
                scale: float) -> Tensor:
        keep = (m > 0)[:, None, None, :]
        mask = keep if attn_bias is None else attn_bias.masked_fill(~keep, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        ctx.scale = scale
        ctx.bias_shape = None if attn_bias is None else attn_bias.shape
        ctx.save_for_backward(q, k, v, m, attn_bias, out)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        q, k, v, m, attn_bias, out = ctx.saved_tensors
        need_q, need_k, need_v, need_m, need_bias = ctx.needs_input_grad[:5]
        scale = ctx.scale
        # Half-precision inputs get a float32 backward (the softmax and its sums).
        ct = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(q.device.type, enabled=False):
            # q, k and g are each read by two batched matmuls, which would copy a strided view
            # (heads split out of a fused projection) each time: make them contiguous once.
            qc, kc, gc = (t.to(ct).contiguous() for t in (q, k, g))
            vc, oc = v.to(ct), out.to(ct)
            mc = m.to(ct)[:, None, None, :]  # (B, 1, 1, Nk)
            keep = (m > 0)[:, None, None, :]
            s = torch.matmul(qc, kc.transpose(-2, -1)).mul_(scale)
            if attn_bias is not None:
                s = s.add_(attn_bias.to(ct))
            # shift_i: max score over kept keys (0 for a row with none), as in the forward formula.
            # (The masked copy of s goes to a buffer reused below for G V^T: one allocation less.)
            t = torch.add(s, torch.zeros_like(mc).masked_fill_(~keep, float("-inf")), out=torch.empty_like(s))
            shift = t.amax(-1, keepdim=True)
            shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
            a = s.sub_(shift).clamp_(max=20.0).exp_()  # e_ij, reusing s
            z = torch.matmul(a, mc.transpose(-2, -1))  # Z_i = sum_k m_k e_ik, >= 1 when a key is kept
            # A row that keeps no key (output 0) takes Z = 1: finite gradients, none to q/k.
            z = z.masked_fill_(z <= 0, 1.0)
            a = a.div_(z)  # e_ij / Z_i; the attention weights are p_ij = m_j a_ij
            dv = torch.matmul(a.transpose(-2, -1), gc).mul_(mc.transpose(-2, -1)).to(v.dtype) if need_v else None
            t = torch.matmul(gc, vc.transpose(-2, -1), out=t)  # g_i . v_j
            t = t.sub_((gc * oc).sum(-1, keepdim=True))  # - g_i . o_i
            u = a.mul_(t)  # (e_ij / Z_i)(g_i . v_j - g_i . o_i), reusing a
            dm = u.sum((1, 2)).to(m.dtype) if need_m else None
            ds = u.mul_(mc)  # gradient w.r.t. the scores: p_ij (g_i . v_j - g_i . o_i)
            dq = torch.matmul(ds, kc).mul_(scale).to(q.dtype) if need_q else None
            dk = torch.matmul(ds.transpose(-2, -1), qc).mul_(scale).to(k.dtype) if need_k else None
            dbias = _sum_to(ds, ctx.bias_shape).to(attn_bias.dtype) if need_bias else None
        return dq, dk, dv, dm, dbias, None


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``t`` over the dimensions a tensor of ``shape`` was broadcast along."""
    lead = t.dim() - len(shape)
    if lead:
        t = t.sum(tuple(range(lead)))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return t.sum(dims, keepdim=True) if dims else t


def _rows(spans: list[tuple[int, int]], device: torch.device) -> tuple[Tensor, list[tuple[int, int]]]:
    """Row indices of ``spans`` and the same spans renumbered within those rows."""
    rows = torch.cat([torch.arange(s, e, device=device) for s, e in spans])
    local, start = [], 0
    for s, e in spans:
        local.append((start, start + e - s))
        start += e - s
    return rows, local


# What one more attention call costs beyond its arithmetic (dispatch, small-kernel start-up), in
# FLOP-equivalents: ~25 us on a CPU core. Many short samples (a tiny model, a late layer) then
# run faster as one padded call; long ones as one call each, which pays no padding.
_CALL_FLOPS = 1.5e6
_HEAD_SLICE_CALLS = 16  # calls a sample's own head subset adds (projections, weight slices, output)


def _padded_core_is_cheaper(q_spans: list[tuple[int, int]], k_spans: list[tuple[int, int]], width: int) -> bool:
    """Whether one padded SDPA call beats one call per sample for these spans (scores + weighted values)."""
    if len(q_spans) < 2:
        return False
    lengths = [(qe - qs, ke - ks) for (qs, qe), (ks, ke) in zip(q_spans, k_spans)]
    per_sample = sum(4 * n * m * width + _CALL_FLOPS for n, m in lengths)
    longest_q, longest_k = max(n for n, _ in lengths), max(m for _, m in lengths)
    padded = 4 * len(lengths) * longest_q * longest_k * width + _CALL_FLOPS
    return padded < per_sample


def _span_grid(spans: list[tuple[int, int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """(B, M) packed row of each slot of a padded grid of ``spans`` (0 in padding) and its validity."""
    longest = max(e - s for s, e in spans)
    starts = torch.tensor([s for s, _ in spans], device=device)
    lengths = torch.tensor([e - s for s, e in spans], device=device)
    slots = torch.arange(longest, device=device)
    valid = slots < lengths[:, None]
    return torch.where(valid, starts[:, None] + slots, torch.zeros_like(slots)), valid


def _varlen_ok(q: Tensor) -> bool:
    """The flash varlen kernel: CUDA, half precision, no autograd (trim packs only at inference)."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and not torch.is_grad_enabled()


def _varlen(q: Tensor, k: Tensor, v: Tensor, q_spans: list[tuple[int, int]], k_spans: list[tuple[int, int]],
            scale: float) -> Tensor:
    from torch.nn.attention.varlen import varlen_attn

    cu_q = torch.tensor([0] + [e for _, e in q_spans], dtype=torch.int32, device=q.device)
    cu_k = torch.tensor([0] + [e for _, e in k_spans], dtype=torch.int32, device=q.device)
    max_q = max(e - s for s, e in q_spans)
    max_k = max(e - s for s, e in k_spans)
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale)
