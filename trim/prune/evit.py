"""EViT (Liang et al., ICLR 2022): keep the tokens [CLS] attends to, fuse the rest into one.

Before block l, with that block's own self-attention (its query and key projections, after
its first LayerNorm in a pre-norm block), the first carried token, the [CLS] the pooler
reads, scores every alive token of its sample:

    a_j = mean_h softmax_j(q_0^h . k_j^h / sqrt(d_h))

The sample keeps its k = k(n, r) prunable tokens of highest a_j (`trim.prune.keep_ratio`;
special tokens always stay) and replaces the dropped set D by one fused token, their
attention-weighted mean

    x_fused = sum_{j in D} a_j x_j / sum_{j in D} a_j

appended after the kept tokens. The fused token counts as a kept token (the blocks run on
it and the cost model counts it); it is not protected, so a later EViT layer may fuse it
again. Heads are not pruned (EViT prunes tokens only; no head trimmers are built).

One difference to the paper: EViT reorganises tokens between the attention and the MLP of
the same block and reuses that attention map. Every trim trimmer decides *before* its block
(the block then runs only on what was kept), so here [CLS]'s query and the keys are projected
once more; the cost model counts that as the trimmer's overhead
(`trim.prune.cost.first_token_attention_flops`). Gradients reach the query and key
projections through the fused token's weights, as in the paper.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trim.nn.attention import Attention
from trim.nn.blocks import CrossBlock, PostNormBlock, PreNormBlock
from trim.nn.tokens import TokenSet
from trim.prune.keep_ratio import add_keep_ratio, keep_count
from trim.prune.trimmers import Trimmer, top_k_mask


def block_attention(block: nn.Module) -> Attention:
    """The self-attention whose [CLS] row EViT reads."""
    if isinstance(block, (PreNormBlock, PostNormBlock)):
        return block.attn
    if isinstance(block, CrossBlock):
        return block.self_attn
    raise TypeError(f"EViT reads a block's self-attention; {type(block).__name__} has none that trim knows")


def attention_input(block: nn.Module, x: Tensor) -> Tensor:
    """What the block's self-attention reads from its input ``x`` (pre-norm blocks normalise first)."""
    if isinstance(block, PreNormBlock) or (isinstance(block, CrossBlock) and block.norm_first):
        return block.norm1(x)
    return x


def fuse(x: Tensor, weights: Tensor, dropped: Tensor) -> Tensor:
    """(B, D) attention-weighted mean of the ``dropped`` (B, N) tokens of ``x`` (B, N, D) (0 where none)."""
    w = weights * dropped.to(weights.dtype)
    w = w / w.sum(1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return torch.bmm(w[:, None].to(x.dtype), x).squeeze(1)  # a matmul, so FLOP counters see the fusion


class EvitTrimmer(Trimmer):
    """Keep the top k(n, r) tokens by [CLS] attention and fuse the rest (no parameters)."""

    def __init__(self, *, min_keep: int = 1) -> None:
        super().__init__()
        add_keep_ratio(self)
        self.min_keep = min_keep

    def forward(self, tokens: TokenSet, block: nn.Module) -> TokenSet:
        """``tokens`` with the inattentive tokens dropped and their fusion appended (any layout)."""
        weights = block_attention(block).first_token_attention(tokens.grid(attention_input(block, tokens.x)),
                                                               tokens.keep.bool())
        alive = tokens.keep.bool()
        prunable = alive & ~tokens.protect
        kept = top_k_mask(weights, prunable, keep_count(prunable.sum(1), self.keep_ratio, self.min_keep))
        dropped = prunable & ~kept
        fused = fuse(tokens.grid(), weights, dropped)
        decision = kept | tokens.protect | ~alive
        if tokens.keep.is_floating_point():  # training's soft mask: decisions as float 0/1
            decision = decision.to(tokens.keep.dtype)
        segment = None if tokens.segment is None else int((tokens.segment * dropped).amax())
        return tokens.prune(decision).append(fused, dropped.any(1), segment)
