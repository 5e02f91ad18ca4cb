"""Static head pruning: one head set for every input, chosen by learned importance.

Each head-trimmed attention layer gets H logits g (one per head, shared by every input) in
place of SmartTrim's input-conditioned head trimmer. At inference head h runs iff
``g_h + s > 0`` (s: the calibrated logit shift, 0 before calibration), so every input runs
the same heads. Training learns g with SmartTrim's losses: Gumbel-sigmoid samples with
straight-through gradients (the noise is drawn per input, the logits are shared), the cost
loss pulls the expected cost to the budget, distillation keeps the outputs close. This is
importance learned end to end (a head whose gate can close without hurting the task
loss is unimportant), at the same budget and with the same steps as SmartTrim.

Token trimmers stay SmartTrim's, so ``static_heads`` differs from ``smarttrim`` only in
that its heads do not depend on the input. The gates start keeping everything
(g = ``init_logit``, design invariant 3) and cost nothing per input.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trim.prune.trimmers import Trimmer, head_decisions


class StaticHeadGate(Trimmer):
    """Input-independent head keep logits, decided like `HeadTrimmer`'s."""

    def __init__(self, num_heads: int, *, min_keep: int = 1, init_logit: float = 3.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.gate = nn.Parameter(torch.full((num_heads,), float(init_logit)))
        self.min_keep = min_keep
        self.logit_shift = 0.0  # added to the logits of deterministic decisions (a budget)

    def forward(self, pooled: Tensor, other: Tensor | None = None, *, decision: str = "threshold",
                tau: float = 1.0) -> tuple[Tensor, Tensor]:
        """(head mask (B, H), keep probability (B, H)): the same row for every sample but Gumbel noise."""
        logits = self.gate.to(pooled.dtype).expand(pooled.shape[0], -1)
        if decision == "threshold" and self.logit_shift:
            logits = logits + self.logit_shift
        return head_decisions(logits, decision=decision, tau=tau, min_keep=self.min_keep), torch.sigmoid(logits)
