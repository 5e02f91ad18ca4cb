"""SmartTrim with a fixed keep ratio: SmartTrim's scores, no per-input budget.

The trimmers are SmartTrim's (token: local + global + cross-modal features; head: the
modalities' pooled features), but instead of keeping what passes the threshold
``sigmoid(logit) > 1/2``, every input keeps the same count: the top k(n, r) tokens by
logit and the top k(H, r) heads (`trim.prune.keep_ratio`), r following the budget. What
this ablates is the per-input allocation: an easy input cannot keep less than a hard one.

Training back-propagates through the top-k with a straight-through estimator (forward: the
0/1 top-k mask, backward: the gradient of ``sigmoid(logit)``), as DynamicViT does for its
fixed-ratio keep. The count is exact, so the expected cost the cost loss sees is the
actual one (the decision is returned as its own keep probability).
"""

from __future__ import annotations

import torch
from torch import Tensor

from trim.nn.tokens import TokenSet
from trim.prune.gumbel import straight_through
from trim.prune.keep_ratio import add_keep_ratio, keep_count
from trim.prune.trimmers import HeadTrimmer, TokenTrimmer, top_k_mask


def _decide(hard: Tensor, logits: Tensor, decision: str) -> tuple[Tensor, Tensor]:
    exact = hard.to(logits.dtype)
    if decision == "sample":
        return straight_through(hard, torch.sigmoid(logits)), exact
    return hard, exact


class FixedRatioTokenTrimmer(TokenTrimmer):
    def __init__(self, dim: int, other_dim: int | None = None, **kwargs) -> None:
        super().__init__(dim, other_dim, **kwargs)
        add_keep_ratio(self)

    def forward(self, tokens: TokenSet, other: Tensor | None = None, *, own: Tensor | None = None,
                decision: str = "threshold", tau: float = 1.0) -> tuple[Tensor, Tensor]:
        logits = self.logits(tokens, other, own)
        alive = tokens.keep.bool()
        prunable = alive & ~tokens.protect
        k = keep_count(prunable.sum(1), self.keep_ratio, self.min_keep)
        hard = top_k_mask(logits, prunable, k) | tokens.protect | ~alive
        decided, exact = _decide(hard, logits, decision)
        if decision == "sample":  # special tokens and padding carry no gradient: exactly 1
            decided = torch.where(prunable, decided, torch.ones_like(decided))
        return decided, exact


class FixedRatioHeadTrimmer(HeadTrimmer):
    def __init__(self, dim: int, num_heads: int, other_dim: int | None = None, **kwargs) -> None:
        super().__init__(dim, num_heads, other_dim, **kwargs)
        add_keep_ratio(self)

    def forward(self, pooled: Tensor, other: Tensor | None = None, *, decision: str = "threshold",
                tau: float = 1.0) -> tuple[Tensor, Tensor]:
        logits = self.logits(pooled, other)
        everything = torch.ones_like(logits, dtype=torch.bool)
        k = keep_count(torch.full((logits.shape[0],), self.num_heads, device=logits.device), self.keep_ratio,
                       self.min_keep)
        decided, exact = _decide(top_k_mask(logits, everything, k), logits, decision)
        return (decided if decision == "sample" else exact), exact
