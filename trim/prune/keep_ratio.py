"""The keep-ratio knob of the fixed-ratio baselines, and the ratio that meets a cost budget.

Three baselines (``random``, ``evit``, ``fixed_ratio``; `trim.prune.policies`) decide *which*
tokens each input keeps, but *how many* from one number r, the keep ratio. A token trimmer
that sees n prunable tokens keeps

    k(n, r) = clamp(ceil(r n), min(min_keep, n), n)

(EViT adds its one fused token), and a ``fixed_ratio`` head trimmer keeps k(H, r) of its H
heads. r is one value for the whole model, held in a ``keep_ratio`` buffer of each of these
trimmers, so a checkpoint carries it and `trim.load` serves it.

A budget is a cost ratio, not a keep ratio. k depends on r and the input's length only, not
on any weight, so the mean per-sample cost of a batch, c(r) (``trim="masked"``: what each
sample costs on its own, which is also what the packed ``eval`` layout reports), is a fixed
non-decreasing step function of r. `fit_keep_ratio` tabulates it once on one batch at
r = 0, 1/20, ..., 1; a target t is served by inverting the table (linear between grid
points), and the final target is refined by bisection on c itself.

These trimmers do not threshold logits, so the logit-shift calibration of
`trim.prune.calibrate` does not apply to them (`CALIBRATION_SKIPPED`): r meets the budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

KEEP_RATIO = "keep_ratio"  # the buffer's name
GRID = 20  # c(r) is tabulated at r = i / GRID
TOLERANCE = 0.005  # the final target's bisection stops this close to it
BISECTION_STEPS = 12
CALIBRATION_SKIPPED = ("this model's trimmers keep a fixed ratio of tokens (keep_ratio, fitted to the target during "
                       "training), not thresholded logits: the logit-shift calibration does not apply, its budget "
                       "is its training target")


def add_keep_ratio(module: nn.Module) -> None:
    """Give ``module`` the ``keep_ratio`` buffer (1.0: keep everything until a budget says otherwise)."""
    module.register_buffer(KEEP_RATIO, torch.ones(()))


def ratio_trimmers(model: nn.Module) -> list[nn.Module]:
    """Every module of ``model`` that keeps a fixed ratio (has the ``keep_ratio`` buffer)."""
    return [m for m in model.modules() if KEEP_RATIO in dict(m.named_buffers(recurse=False))]


def set_keep_ratio(model: nn.Module, ratio: float) -> None:
    for m in ratio_trimmers(model):
        m.keep_ratio.fill_(float(ratio))


def model_keep_ratio(model: nn.Module) -> float | None:
    """The keep ratio ``model``'s fixed-ratio trimmers use; None when it has none."""
    found = ratio_trimmers(model)
    return float(found[0].keep_ratio) if found else None


def keep_count(available: Tensor, ratio: Tensor | float, min_keep: int) -> Tensor:
    """k(n, r) per sample for (B,) counts ``available``; long."""
    n = available.long()
    # float32 ratios are inexact (0.3 * 10 = 3.0000001): a hair below the product keeps ceil exact.
    k = torch.ceil(n.double() * torch.as_tensor(ratio, dtype=torch.float64, device=n.device) - 1e-4).long()
    return torch.maximum(k, n.clamp(max=min_keep)).minimum(n)


@dataclass
class KeepRatioSchedule:
    """Target cost -> keep ratio: the tabulated curve ``[[r, c(r)], ...]`` and the final target's refined ratio."""

    curve: list[list[float]]
    final_target: float
    final_ratio: float

    def ratio(self, target: float) -> float:
        """The keep ratio whose mean cost is ``target`` (linear between the tabulated points)."""
        if abs(target - self.final_target) <= 1e-9:
            return self.final_ratio
        ratios, costs = [r for r, _ in self.curve], [c for _, c in self.curve]
        if target <= costs[0]:
            return ratios[0]
        for (r0, c0), (r1, c1) in zip(self.curve, self.curve[1:]):
            if c0 < target <= c1:
                return r0 + (r1 - r0) * (target - c0) / (c1 - c0)
        return ratios[-1]

    def to_dict(self) -> dict[str, Any]:
        return {"curve": self.curve, "final_target": self.final_target, "final_ratio": self.final_ratio}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "KeepRatioSchedule":
        return cls([[float(r), float(c)] for r, c in data["curve"]], float(data["final_target"]),
                   float(data["final_ratio"]))


def fit_keep_ratio(model: nn.Module, batch: dict, final_target: float,
                   mean: Callable[[Tensor], Tensor] = lambda x: x) -> KeepRatioSchedule:
    """Tabulate c(r) on ``batch`` and refine the ratio of ``final_target``; leaves r at 1.

    ``mean`` reduces a scalar over processes (data parallelism), so every rank fits the same table.
    """
    inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask") if k in batch}
    points: dict[float, float] = {}

    def cost(r: float) -> float:
        if r not in points:
            set_keep_ratio(model, r)
            with torch.no_grad():
                points[r] = float(mean(model(inputs, trim="masked").cost_ratio.float().mean()))
        return points[r]

    curve = [[i / GRID, cost(i / GRID)] for i in range(GRID + 1)]
    lo, hi = 0.0, 1.0
    best = min((lo, hi), key=lambda r: abs(cost(r) - final_target))
    for _ in range(BISECTION_STEPS):
        if abs(cost(best) - final_target) <= TOLERANCE:
            break
        mid = (lo + hi) / 2
        if abs(cost(mid) - final_target) < abs(cost(best) - final_target):
            best = mid
        lo, hi = (mid, hi) if cost(mid) < final_target else (lo, mid)
    set_keep_ratio(model, 1.0)
    return KeepRatioSchedule(curve, float(final_target), best)
