"""Transformer blocks built from `Attention` and `Mlp`.

Every block takes ``keep`` (B, N): the tokens still alive. Pruned tokens are not attended
to (they are masked as keys) and not updated (the block returns their input unchanged),
so a token dropped in one layer stays dropped in every later layer. A float ``keep``
(0/1 with straight-through gradients, training) gates the update softly; a bool ``keep``
(inference, usually the padding mask of gathered tokens) selects. Packed tokens
(``packing`` given, see `trim.nn.tokens`) are all alive and take no ``keep``.
`WindowBlock` (SAM's image-grid block) runs a whole (B, H, W, C) grid in ``forward`` and any
groups of its tokens (kept slots of windows, an image's kept tokens) in ``forward_groups``;
`LittleBlock` is big.LITTLE's narrow E-block (`trim.prune.routing`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trim.nn.attention import Attention
from trim.nn.mlp import Mlp
from trim.nn.tokens import Packing
from trim.nn.windows import window_partition, window_unpartition


def gate(new: Tensor, old: Tensor, keep: Tensor | None) -> Tensor:
    """Take `new` where the token is alive and keep `old` where it was pruned."""
    if keep is None:
        return new
    if keep.is_floating_point() and keep.requires_grad:  # straight-through decisions: a differentiable gate
        return old + keep[..., None].to(new.dtype) * (new - old)
    if keep.is_floating_point():
        keep = keep > 0
    return torch.where(keep[..., None], new, old)


class PreNormBlock(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)): ViT, CLIP and SAM encoders."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        act: str = "gelu",
        eps: float = 1e-6,
        fused_qkv: bool = True,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, fused_qkv=fused_qkv, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act)

    def forward(
        self,
        x: Tensor,
        *,
        keep: Tensor | None = None,
        head_mask: Tensor | None = None,
        heads: Tensor | None = None,
        attn_bias: Tensor | None = None,
        packing: Packing | None = None,
        head_keep: Tensor | None = None,
    ) -> Tensor:
        h = x + self.attn(self.norm1(x), key_keep=keep, head_mask=head_mask, heads=heads, attn_bias=attn_bias,
                          packing=packing, head_keep=head_keep)
        h = h + self.mlp(self.norm2(h))
        return gate(h, x, keep)


class WindowBlock(nn.Module):
    """Pre-norm block over a (B, H, W, C) token grid with windowed or global attention (ViTDet / SAM).

    ``window_size > 0``: the normed grid is cut into window_size² windows (zero-padded to whole
    windows, `trim.nn.windows`) and attention runs inside each window; 0: global attention over
    the whole ``grid``. ``use_rel_pos`` adds the decomposed relative-position bias over the
    attention's own grid (the window, or the whole grid for a global block).

    Window-wise trimming and big.LITTLE routing slot in around the attention call: the kept (or
    selected) tokens of each window are gathered from the partitioned windows with their
    window positions (``Attention(positions=...)`` gathers the bias for them), and the rest
    pass through unchanged.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        window_size: int = 0,
        grid: tuple[int, int],
        use_rel_pos: bool = False,
        act: str = "gelu",
        eps: float = 1e-6,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        attn_grid = (window_size, window_size) if window_size else tuple(grid)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, rel_pos_size=attn_grid if use_rel_pos else None)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act)

    def forward(self, x: Tensor) -> Tensor:
        b, height, width, c = x.shape
        h = self.norm1(x)
        if self.window_size:
            h = window_unpartition(self.attn(window_partition(h, self.window_size)), self.window_size, height, width)
        else:
            h = self.attn(h.reshape(b, height * width, c)).view_as(x)
        x = x + h
        return x + self.mlp(self.norm2(x))

    def forward_groups(self, x: Tensor, *, positions: Tensor | None = None, keys: Tensor | None = None,
                       padding: Tensor | None = None, update: Tensor | None = None) -> Tensor:
        """The block on (G, N, C) groups of tokens that attend among themselves (the kept slots of
        each window, or an image's kept tokens for a global block), at ``positions`` (G or 1, N, 2)
        on the attention's grid (None: the whole grid in row-major order).

        ``keys`` (G, N): which tokens may be attended (float 0/1 with straight-through gradients in
        training); ``padding`` (G, N) bool: window padding, whose normed value is zero as SAM pads
        after the norm; ``update`` (G, N): which tokens take the block's output (the rest pass
        through unchanged).
        """
        h = self.norm1(x)
        if padding is not None:
            h = h.masked_fill(padding[..., None], 0.0)
        positions = positions if self.attn.rel_pos is not None else None
        h = x + self.attn(h, key_keep=keys, positions=positions)
        return gate(h + self.mlp(self.norm2(h)), x, update)


class LittleBlock(nn.Module):
    """big.LITTLE's efficiency block (E-block): a pre-norm block at the main width ``dim`` outside
    and a narrow width inside (`trim.prune.routing`).

    Attention reads and writes ``dim`` with ``num_heads`` heads of ``head_dim`` (fewer heads than
    the full block: a narrow inner width); the MLP runs at ``inner`` with linear maps from and back
    to ``dim`` around it. `update` returns the block's residual update, which the router scales.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, inner: int, mlp_ratio: float = 4.0, *,
                 rel_pos_size: tuple[int, int] | None = None, act: str = "gelu", eps: float = 1e-6,
                 qkv_bias: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, head_dim=head_dim, qkv_bias=qkv_bias, rel_pos_size=rel_pos_size)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.down = nn.Linear(dim, inner)
        self.mlp = Mlp(inner, int(inner * mlp_ratio), act=act)
        self.up = nn.Linear(inner, dim)

    def update(self, x: Tensor, *, positions: Tensor | None = None, keys: Tensor | None = None,
               padding: Tensor | None = None) -> Tensor:
        """The residual update of every token of the (G, N, dim) groups (arguments as `WindowBlock.forward_groups`)."""
        h = self.norm1(x)
        if padding is not None:
            h = h.masked_fill(padding[..., None], 0.0)
        a = self.attn(h, key_keep=keys, positions=positions if self.attn.rel_pos is not None else None)
        return a + self.up(self.mlp(self.down(self.norm2(x + a))))


class PostNormBlock(nn.Module):
    """norm(x + attn(x)), then norm(x + mlp(x)): BERT and RoBERTa encoders."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        act: str = "gelu",
        eps: float = 1e-12,
        fused_qkv: bool = False,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.attn = Attention(dim, num_heads, fused_qkv=fused_qkv, qkv_bias=qkv_bias)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act)
        self.norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(
        self,
        x: Tensor,
        *,
        keep: Tensor | None = None,
        head_mask: Tensor | None = None,
        heads: Tensor | None = None,
        attn_bias: Tensor | None = None,
        packing: Packing | None = None,
        head_keep: Tensor | None = None,
    ) -> Tensor:
        h = self.norm1(x + self.attn(x, key_keep=keep, head_mask=head_mask, heads=heads, attn_bias=attn_bias,
                                     packing=packing, head_keep=head_keep))
        h = self.norm2(h + self.mlp(h))
        return gate(h, x, keep)


class CrossBlock(nn.Module):
    """Self-attention, cross-attention to the other stream, MLP (METER / BridgeTower).

    Post-norm by default, as both METER and BridgeTower build their co-attention layers
    from BERT layers; ``norm_first=True`` gives the pre-norm variant.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        context_dim: int | None = None,
        act: str = "gelu",
        eps: float = 1e-12,
        norm_first: bool = False,
        fused_qkv: bool = False,
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = Attention(dim, num_heads, fused_qkv=fused_qkv)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = Attention(dim, num_heads, kv_dim=context_dim or dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act)
        self.norm3 = nn.LayerNorm(dim, eps=eps)

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        *,
        keep: Tensor | None = None,
        context_keep: Tensor | None = None,
        head_mask: Tensor | None = None,
        heads: Tensor | None = None,
        cross_head_mask: Tensor | None = None,
        cross_heads: Tensor | None = None,
        packing: Packing | None = None,
        context_packing: Packing | None = None,
        head_keep: Tensor | None = None,
        cross_head_keep: Tensor | None = None,
    ) -> Tensor:
        def self_attn(h: Tensor) -> Tensor:
            return self.self_attn(h, key_keep=keep, head_mask=head_mask, heads=heads, packing=packing,
                                  head_keep=head_keep)

        def cross_attn(h: Tensor) -> Tensor:
            return self.cross_attn(h, context, key_keep=context_keep, head_mask=cross_head_mask, heads=cross_heads,
                                   packing=packing, context_packing=context_packing, head_keep=cross_head_keep)

        if self.norm_first:
            h = x + self_attn(self.norm1(x))
            h = h + cross_attn(self.norm2(h))
            h = h + self.mlp(self.norm3(h))
        else:
            h = self.norm1(x + self_attn(x))
            h = self.norm2(h + cross_attn(h))
            h = self.norm3(h + self.mlp(h))
        return gate(h, x, keep)
