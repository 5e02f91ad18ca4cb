"""Binary decisions that gradients can pass through.

Training samples a Gumbel-sigmoid (the binary Concrete relaxation):
``y = sigmoid((logit + log u - log(1 - u)) / tau)`` with ``u ~ U(0, 1)``, and takes the
hard decision ``y > 0.5`` in the forward pass while the backward pass uses the gradient
of ``y`` (straight-through). At evaluation the decision is deterministic: ``logit > 0``.
The temperature is annealed from high (smooth, exploratory) to low (close to hard).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def gumbel_sigmoid(logits: Tensor, tau: float = 1.0, *, hard: bool = True,
                   generator: torch.Generator | None = None) -> Tensor:
    """Sample relaxed Bernoulli decisions; with ``hard`` the values are exactly 0/1 (STE)."""
    u = torch.rand(logits.shape, device=logits.device, dtype=logits.dtype, generator=generator)
    u = u.clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
    if not hard:
        return soft
    return straight_through(soft > 0.5, soft)


def straight_through(hard: Tensor, soft: Tensor) -> Tensor:
    """Forward value of ``hard`` (0/1), gradient of ``soft``."""
    return hard.to(soft.dtype) - soft.detach() + soft


def deterministic(logits: Tensor) -> Tensor:
    """Evaluation decision: keep when the keep probability exceeds one half."""
    return logits > 0


@dataclass
class TemperatureSchedule:
    """Exponential decay of the Gumbel temperature from ``start`` to ``end`` over ``steps``."""

    start: float = 1.0
    end: float = 0.1
    steps: int = 1000

    def __call__(self, step: int) -> float:
        if self.steps <= 0 or step >= self.steps:
            return self.end
        frac = max(step, 0) / self.steps
        return math.exp(math.log(self.start) + frac * (math.log(self.end) - math.log(self.start)))
