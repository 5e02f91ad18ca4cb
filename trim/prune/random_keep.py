"""Random keep: the baseline that knows nothing about the input.

Each sample keeps a uniformly random subset of k = k(n, r) of its n prunable tokens
(`trim.prune.keep_ratio`): every original position gets a score u ~ U(0, 1) and the k
highest-scoring alive prunable tokens stay (the top k of i.i.d. uniform scores is a uniform
random k-subset). Special tokens stay, as with every trimmer.

* Scores are drawn per *original position*, not per carried slot, so the masked layout and
  the gathered ones keep the same tokens (design invariant 1).
* Training (``decision="sample"``) draws from torch's global generator: a fresh subset every
  step. Every other mode draws from a generator seeded with ``seed``, so evaluation is
  reproducible: the same batch keeps the same tokens; different rows of it (different
  samples) draw different scores.
* Heads are never pruned by this baseline (no head trimmers are built): with every head kept,
  a sample's cost depends on its token counts only, so the cost it reports is the same in
  the packed and padded layouts and the budget goes entirely to tokens, like EViT's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trim.nn.tokens import TokenSet
from trim.prune.keep_ratio import add_keep_ratio, keep_count
from trim.prune.trimmers import Trimmer, top_k_mask


def original_positions(tokens: TokenSet) -> tuple[Tensor, int]:
    """(B, N) original position of every carried token, and how many positions to draw scores for
    (the same in every layout, so that one seed gives the same draws: + the spare slot)."""
    n = tokens.keep.shape[1]
    count = (tokens.positions or n) + 1
    if tokens.physical:
        return tokens.index, count
    return torch.arange(n, device=tokens.keep.device).expand(tokens.batch_size, n), count


class RandomTokenTrimmer(Trimmer):
    """Keep a random k(n, r) of each sample's prunable tokens (no parameters)."""

    def __init__(self, *, min_keep: int = 1, seed: int = 0) -> None:
        super().__init__()
        add_keep_ratio(self)
        self.min_keep = min_keep
        self.seed = seed

    def scores(self, tokens: TokenSet, decision: str) -> Tensor:
        position, count = original_positions(tokens)
        generator = None
        if decision != "sample":
            generator = torch.Generator(device=tokens.keep.device).manual_seed(self.seed)
        draws = torch.rand(tokens.batch_size, count, generator=generator, device=tokens.keep.device)
        return draws.gather(1, position)

    def forward(self, tokens: TokenSet, other: Tensor | None = None, *, own: Tensor | None = None,
                decision: str = "threshold", tau: float = 1.0) -> tuple[Tensor, Tensor]:
        """(decision, the same decision as float): the count is exact, so it is its own expected cost."""
        alive = tokens.keep.bool()
        prunable = alive & ~tokens.protect
        k = keep_count(prunable.sum(1), self.keep_ratio, self.min_keep)
        hard = top_k_mask(self.scores(tokens, decision), prunable, k) | tokens.protect | ~alive
        as_float = hard.to(tokens.x.dtype)
        return (as_float if decision == "sample" else hard), as_float
