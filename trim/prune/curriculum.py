"""Curriculum for the target cost: start by keeping everything, then tighten step by step.

``target(step)`` goes from 1.0 to ``final`` over ``steps`` after ``warmup`` steps at 1.0:

    t = clip((step - warmup) / steps, 0, 1)
    linear: 1 - (1 - final) * t
    cosine: final + (1 - final) * (1 + cos(pi t)) / 2
    cubic:  final + (1 - final) * (1 - t)^3   (fast early, gentle near the end, as in
            the cubic sparsity schedule of gradual pruning)

Its state is the current step, saved and restored with the checkpoint so a resumed run
continues at the same target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SHAPES = ("linear", "cosine", "cubic")


@dataclass
class Curriculum:
    final: float = 0.5
    steps: int = 1000
    warmup: int = 0
    shape: str = "linear"
    step: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.final <= 1.0:
            raise ValueError(f"curriculum final target {self.final} must be in (0, 1]")
        if self.shape not in SHAPES:
            raise ValueError(f"curriculum shape {self.shape!r} unknown; choose one of {SHAPES}")
        if self.steps < 0 or self.warmup < 0:
            raise ValueError(f"curriculum steps ({self.steps}) and warmup ({self.warmup}) must be >= 0")

    def target(self, step: int | None = None) -> float:
        step = self.step if step is None else step
        t = 1.0 if self.steps == 0 else min(max((step - self.warmup) / self.steps, 0.0), 1.0)
        gap = 1.0 - self.final
        if self.shape == "linear":
            return 1.0 - gap * t
        if self.shape == "cosine":
            return self.final + gap * (1 + math.cos(math.pi * t)) / 2
        return self.final + gap * (1 - t) ** 3

    def advance(self) -> float:
        """Move to the next step and return its target."""
        self.step += 1
        return self.target()

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
