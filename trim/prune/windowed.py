"""Window-wise token trimming for windowed (SAM / ViTDet) encoders.

A windowed block attends inside each window, and batching the windows needs every window to
carry the same number of tokens. `WindowTokenTrimmer` therefore scores tokens as SmartTrim's
`TokenTrimmer` does (the token + the mean of the image's alive tokens + optionally a pooled
condition, e.g. the prompt) but decides a **count per image** and keeps that many top-scored
tokens **in every window**:

    f_b  = share of the image's alive grid tokens whose keep decision is 1
           (threshold: logit + shift > 0; training: a Gumbel-sigmoid sample > 1/2)
    k_b  = clamp(round(f_b * A_b), min_keep, A_b)      A_b: alive slots per window
    keep = the k_b highest-ranked alive slots of each window: grid tokens by score (training:
           by the Gumbel-perturbed score), then window padding, ties in slot order

A window with fewer grid tokens than k_b (at the grid's bottom / right edge) fills its k_b with
padding slots, which SAM attends as keys anyway. A trimmer before a global block decides the
same way, so the windowed blocks after it stay rectangular; the global block sees the
image-level count (the alive grid tokens of all windows). ``forced_ratio`` (benchmarks, a static
budget ``model.sam.trim.token_keep``) replaces f_b with a fixed share.

In training the kept slots' mask is straight-through: forward 0/1, gradient of the Gumbel sample,
and the cost reads the expected count k_b = mean keep probability * A_b.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from trim.nn.slots import WindowSlots
from trim.prune.gumbel import gumbel_sigmoid, straight_through
from trim.prune.trimmers import TokenTrimmer, _check_decision, _shifted


@dataclass
class WindowStep:
    keep: Tensor  # (B, nW, K) what `WindowSlots.prune` takes: bool, or float straight-through (training)
    count: Tensor  # (B,) slots kept per window
    cost_count: Tensor  # (B,) float: kept per window as the cost counts it (expected under sampling)


def rank_slots(scores: Tensor, alive: Tensor, real: Tensor) -> Tensor:
    """(..., K) rank of each slot in its window: alive grid tokens by score (descending), then alive
    padding, then dead slots; ties keep slot order, so a physical and a masked layout rank alike."""
    level = alive.to(torch.float64) + (alive & real).to(torch.float64)  # 2, 1, 0
    key = level * 1e6 + torch.where(alive & real, scores.double().clamp(-1e5, 1e5), torch.zeros_like(scores.double()))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    return torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                            .expand_as(order).contiguous())


class WindowTokenTrimmer(TokenTrimmer):
    """`TokenTrimmer`'s scorer with window-wise decisions (see the module docstring).

    ``forward`` takes `WindowSlots` (not a `TokenSet`): the same parameters, another layout.
    ``other``: a pooled condition (B, other_dim), e.g. the prompt embedding, when ``other_dim``.
    """

    def scores(self, slots: WindowSlots, other: Tensor | None = None) -> Tensor:
        """(B, nW, K) keep logits of the carried slots."""
        weight = slots.alive() & slots.real()
        w = weight.to(slots.x.dtype) if slots.keep is None or not slots.keep.is_floating_point() \
            else slots.keep * weight.to(slots.keep.dtype)
        own = (slots.x * w[..., None]).sum((1, 2)) / w.sum((1, 2)).clamp_min(1.0)[:, None]
        h = self.local(slots.x) + self.global_proj(own)[:, None, None]
        if self.cross is not None:
            if other is None:
                raise ValueError("this trimmer is conditioned (prompt-aware): pass the pooled condition as other=")
            h = h + self.cross(other)[:, None, None]
        return self.out(self.act(self.norm(h))).squeeze(-1)

    def forward(self, slots: WindowSlots, other: Tensor | None = None, *,  # type: ignore[override]
                decision: str = "threshold", tau: float = 1.0) -> WindowStep:
        _check_decision(decision)
        logits = self.scores(slots, other)
        alive = slots.alive()
        real = slots.real().expand_as(alive)
        candidates = alive & real
        per_window = alive.sum(-1).amax(-1)  # A_b: every window carries the same count
        grid_alive = candidates.sum((1, 2)).clamp_min(1)
        rank_by, sample = logits, None
        if self.forced_ratio is not None:
            ratio = torch.as_tensor(self.forced_ratio, dtype=logits.dtype, device=logits.device)
            count = torch.ceil(ratio * per_window).long()
            cost_count = count.to(logits.dtype)
        else:
            if decision == "sample":
                sample = gumbel_sigmoid(logits, tau, hard=False)
                # The sample's logit-scale value ranks: a Gumbel top-k consistent with the sampled count.
                rank_by, kept = torch.logit(sample.clamp(1e-6, 1 - 1e-6)) * tau, sample > 0.5
            else:
                kept = _shifted(self, logits, decision) > 0
            share = (kept & candidates).sum((1, 2)) / grid_alive
            count = torch.round(share * per_window).long()
            prob = torch.sigmoid(logits) * candidates
            cost_count = prob.sum((1, 2)) / grid_alive * per_window
        floor = torch.clamp(per_window, max=self.min_keep)
        count = torch.minimum(torch.maximum(count, floor), per_window)
        hard = (rank_slots(rank_by, alive, real) < count[:, None, None]) & alive
        if decision != "sample":
            return WindowStep(hard, count, count.to(logits.dtype))
        surrogate = torch.where(candidates, sample if sample is not None else torch.sigmoid(logits),
                                torch.ones_like(logits))
        return WindowStep(straight_through(hard, surrogate), count, cost_count.clamp_min(floor.to(logits.dtype)))
