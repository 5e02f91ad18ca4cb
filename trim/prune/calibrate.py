"""A budget the model keeps, and a budget knob at inference.

Training pushes the *expected* cost under Gumbel samples toward the target, but inference
decides ``sigmoid(logit) > 1/2``; the two disagree (a model trained to 0.33 can cost 0.27).
After training one global logit shift ``s`` is fitted on held-out inputs so the mean
per-sample cost of the deterministic forward equals the target::

    keep  <=>  logit + s > 0          (every token and head trimmer, inference only)
    mean_i cost_i(s) = target         (cost_i: model(batch, trim="eval").sample_cost)

A larger ``s`` keeps more at every trimmer, so the mean cost rises with ``s`` (up to the
few samples whose later trimmers see other inputs) and bisection finds it. Repeating the
fit over a grid of budgets gives a table ``[[budget, shift], ...]`` from which any budget in
range is served by the same weights (``shift_for``: linear between grid points). No labels
are read: the fit only sees inputs, so the val split's inputs can serve.

The fit reads each sample's own cost from the ``trim="eval"`` forward (``sample_cost``: its kept
tokens and heads), not what its batch ran: padding a batch to its longest member, or running
the union of its heads, depends on which samples share a batch, not on the model. Fitting the
padded cost instead pushed a per-sample trimmer far below its budget (a tiny SmartTrim model
calibrated to a padded batch cost of 0.5 kept 0.39 per sample and lost 11 points of VQA accuracy).
The result is a `Calibration`, stored in the
checkpoint's ``config.json`` (section ``calibration``) and attached to the model by
`trim.models.load_model`; ``model(batch, trim="eval", budget=0.4)`` then reads it.
"""

from __future__ import annotations

import bisect
import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trim.errors import TrimError
from trim.prune.keep_ratio import CALIBRATION_SKIPPED, ratio_trimmers
from trim.prune.trimmers import trimmer_modules

CALIBRATION_FORMAT = "trim-calibration/1"
GRID_STEP = 0.05  # budgets of the table: multiples of this within the reachable range
TOLERANCE = 0.002  # a fit stops once the mean cost is this close to the budget
# The table's other rows (the budget knob): well inside the knob's +-0.03 promise. The cost is a staircase in
# the shift (trained logits are saturated), so each 0.002 row took ~4 bisection passes more: on the demo's
# SmartTrim model a calibration read its 512 inputs 70 times at 0.002 and 40 times at 0.01.
ROW_TOLERANCE = 0.01
SHIFT_BOUND = 32.0  # |shift| at which every trimmer keeps all (or its minimum): sigmoid is saturated
MIN_STEP = 1e-3  # bisection stops when the shift interval is this narrow


CALIBRATION_SAMPLES = 512  # held-out inputs a fit reads by default
CALIBRATION_BATCH = 32  # the batch size the fit runs at (each sample's cost is its own at any size)


class CalibrationError(TrimError, ValueError):
    """A budget the model cannot serve (out of range, uncalibrated model, bad calibration data)."""


@contextlib.contextmanager
def logit_shift(model: nn.Module, shift: float) -> Iterator[None]:
    """Add ``shift`` to every trimmer's logits for deterministic decisions, restoring on exit."""
    trimmers = [module for _, module in trimmer_modules(model)]
    before = [getattr(t, "logit_shift", 0.0) for t in trimmers]
    for t in trimmers:
        t.logit_shift = float(shift)
    try:
        yield
    finally:
        for t, old in zip(trimmers, before):
            t.logit_shift = old


@dataclass
class Calibration:
    """What a calibrated checkpoint carries: the target's shift and the budget -> shift table."""

    target: float  # the budget served when none is asked for (the training target)
    shift: float  # the shift that meets ``target``
    table: list[list[float]]  # [[budget, shift], ...], budgets ascending
    samples: int = 0  # inputs the fit saw
    mean_cost: float | None = None  # mean cost at ``shift`` on those inputs
    source: dict[str, Any] = field(default_factory=dict)  # where the inputs came from (data, split)

    @property
    def budget_range(self) -> tuple[float, float]:
        return self.table[0][0], self.table[-1][0]

    def shift_for(self, budget: float | None) -> float:
        """The shift that serves ``budget`` (None: the target's); linear between table points."""
        if budget is None:
            return self.shift
        lo, hi = self.budget_range
        budget = float(budget)
        if not (lo - 1e-9 <= budget <= hi + 1e-9):
            raise CalibrationError(f"budget={budget:g} is outside what this model was calibrated for "
                                   f"({lo:g}..{hi:g}: the costs it reaches from its fewest to its most kept "
                                   f"tokens and heads); ask for a budget in {lo:g}..{hi:g}")
        budgets = [b for b, _ in self.table]
        i = bisect.bisect_left(budgets, budget)
        if i < len(budgets) and abs(budgets[i] - budget) <= 1e-9:
            return self.table[i][1]
        i = min(max(i, 1), len(budgets) - 1)
        (b0, s0), (b1, s1) = self.table[i - 1], self.table[i]
        return s0 + (s1 - s0) * (budget - b0) / (b1 - b0)

    def to_dict(self) -> dict[str, Any]:
        return {"format": CALIBRATION_FORMAT, "target": self.target, "shift": self.shift,
                "table": [[round(b, 6), round(s, 6)] for b, s in self.table],
                "samples": self.samples, "mean_cost": self.mean_cost, "source": self.source}

    @classmethod
    def from_dict(cls, data: Any, where: str = "calibration") -> "Calibration":
        """Read ``config.json``'s ``calibration`` section; anything malformed names ``where``."""
        if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise CalibrationError(f"{where} is not a {CALIBRATION_FORMAT} section (found {found!r}); "
                                   "recalibrate with `trim calibrate CHECKPOINT --data ROOT`")
        try:
            table = [[float(b), float(s)] for b, s in data["table"]]
            cal = cls(target=float(data["target"]), shift=float(data["shift"]), table=table,
                      samples=int(data.get("samples", 0)),
                      mean_cost=None if data.get("mean_cost") is None else float(data["mean_cost"]),
                      source=dict(data.get("source") or {}))
        except (KeyError, TypeError, ValueError) as err:
            raise CalibrationError(f"{where} is malformed ({type(err).__name__}: {err}); recalibrate with "
                                   "`trim calibrate CHECKPOINT --data ROOT`") from err
        if not table or any(b1 <= b0 for (b0, _), (b1, _) in zip(table, table[1:])):
            raise CalibrationError(f"{where}.table must list [budget, shift] pairs with budgets strictly "
                                   "ascending; recalibrate with `trim calibrate CHECKPOINT --data ROOT`")
        return cal


class CostCurve:
    """Mean per-sample cost of ``model`` on fixed inputs as a function of the logit shift (memoised:
    each point is one pass over the inputs)."""

    def __init__(self, model: nn.Module, batches: Iterable[dict]) -> None:
        self.model = model
        device = next(model.parameters()).device
        keys = ("pixel_values", "input_ids", "attention_mask")
        self.batches = [{k: b[k].to(device) for k in keys if k in b} for b in batches]
        self.samples = sum(int(b["pixel_values"].shape[0]) for b in self.batches)
        if self.samples == 0:
            raise CalibrationError("no calibration inputs: pass at least one batch of held-out samples")
        if not any(True for _ in trimmer_modules(model)):
            raise CalibrationError("this model has no token or head trimmers (model.trim.*_layers are all empty); "
                                   "there is no budget to calibrate")
        if ratio_trimmers(model):
            raise CalibrationError(f"cannot calibrate: {CALIBRATION_SKIPPED}")
        self.points: dict[float, float] = {}

    def __call__(self, shift: float) -> float:
        shift = float(shift)
        if shift not in self.points:
            was_training = self.model.training
            # A calibrated model would apply its own default shift; this pass sets the shift itself.
            stored = getattr(self.model, "calibration", None)
            self.model.eval()
            self.model.calibration = None
            total = 0.0
            try:
                with torch.inference_mode(), logit_shift(self.model, shift):
                    for batch in self.batches:
                        total += float(self.model(batch, trim="eval").sample_cost.double().sum())
            finally:
                self.model.train(was_training)
                self.model.calibration = stored
            self.points[shift] = total / self.samples
        return self.points[shift]

    def reachable(self) -> tuple[float, float]:
        """Mean cost with every trimmer at its minimum, and with every trimmer keeping all."""
        return self(-SHIFT_BOUND), self(SHIFT_BOUND)

    def solve(self, target: float, tol: float = TOLERANCE) -> float:
        """The shift whose mean cost is within ``tol`` of ``target`` (or the closest bisection finds)."""
        lowest, highest = self.reachable()
        if not (lowest - tol <= target <= highest + tol):
            raise CalibrationError(f"a mean cost of {target:g} is out of this model's reach on these inputs: "
                                   f"{lowest:.3f} with every trimmer at its minimum, {highest:.3f} keeping all; "
                                   f"choose a target in {lowest:.3f}..{highest:.3f}")
        # The tightest bracket the points so far give (earlier fits narrow later ones).
        lo = max((s for s, c in self.points.items() if c <= target), default=-SHIFT_BOUND)
        hi = min((s for s, c in self.points.items() if c >= target and s >= lo), default=SHIFT_BOUND)
        best = min((lo, hi), key=lambda s: abs(self(s) - target))
        while abs(self(best) - target) > tol and hi - lo > MIN_STEP:
            mid = 0.0 if lo < 0.0 < hi and 0.0 not in self.points else (lo + hi) / 2
            cost = self(mid)
            if abs(cost - target) < abs(self(best) - target):
                best = mid
            if cost < target:
                lo = mid
            else:
                hi = mid
        return best


def fit_shift(model: nn.Module, batches: Iterable[dict], target: float, *, tol: float = TOLERANCE) -> float:
    """One global logit shift such that the mean per-sample cost on ``batches`` is ``target``."""
    return CostCurve(model, batches).solve(float(target), tol)


def budget_grid(lowest: float, highest: float, step: float = GRID_STEP, tol: float = TOLERANCE) -> list[float]:
    """Multiples of ``step`` the model reaches (up to 1.0), and the reachable ends when they fall
    between two grid points (so the table covers the whole range a model serves)."""
    top = min(highest, 1.0)
    grid = [round(k * step, 6) for k in range(math.ceil((lowest - tol) / step), int((top + tol) / step) + 1)]
    grid = [b for b in grid if lowest - tol <= b <= top + tol and b > 0]
    ends = [round(lowest, 4), round(top, 4)]
    return sorted({*grid, *(e for e in ends if all(abs(e - b) > step / 4 for b in grid))})


def budget_table(model: nn.Module, batches: Iterable[dict] | CostCurve, budgets: Sequence[float] | None = None, *,
                 tol: float = TOLERANCE) -> list[list[float]]:
    """``[[budget, shift], ...]`` over ``budgets`` (default: `budget_grid` of the reachable range),
    budgets ascending, shifts made non-decreasing (so interpolation between them stays monotone)."""
    curve = batches if isinstance(batches, CostCurve) else CostCurve(model, batches)
    if budgets is None:
        budgets = budget_grid(*curve.reachable(), tol=tol)
    table: list[list[float]] = []
    for b in sorted(set(float(b) for b in budgets)):
        shift = curve.solve(b, tol)
        table.append([b, max(shift, table[-1][1]) if table else shift])
    return table


def calibrate(model: nn.Module, batches: Iterable[dict], target: float, *, tol: float = TOLERANCE,
              source: dict[str, Any] | None = None) -> Calibration:
    """Fit the target's shift (to ``tol``) and the budget table (its other rows to `ROW_TOLERANCE`) on
    ``batches`` (held-out inputs; labels unused).

    Returns the `Calibration`; it is also attached to ``model`` (``model.calibration``) so the
    model serves ``target`` by default from now on. Save it with the checkpoint
    (`trim.models.io.write_calibration`, or `save_model`, which writes ``model.calibration``).
    """
    curve = CostCurve(model, batches)
    target = float(target)
    shift = curve.solve(target, tol)
    table = budget_table(model, curve, sorted({*budget_grid(*curve.reachable(), tol=tol), target}),
                         tol=max(tol, ROW_TOLERANCE))
    # The target's row is the fitted shift itself, and the rows around it are clamped to it so
    # the table stays non-decreasing (each fit is only within ``tol``, so neighbours can overlap).
    table = [[b, shift if abs(b - target) <= 1e-9 else (min(s, shift) if b < target else max(s, shift))]
             for b, s in table]
    cal = Calibration(target=target, shift=shift, table=table, samples=curve.samples,
                      mean_cost=curve(shift), source=dict(source or {}))
    model.calibration = cal
    return cal


def held_out_inputs(batches: Iterable[dict], keys: Sequence[str], samples: int = CALIBRATION_SAMPLES,
                    batch_size: int = CALIBRATION_BATCH) -> list[dict]:
    """The first ``samples`` rows of ``batches``, only their ``keys`` (model inputs: a fit needs no
    labels), regrouped into batches of ``batch_size``."""
    rows: dict[str, list] = {k: [] for k in keys}
    seen = 0
    for batch in batches:
        if seen >= samples:
            break
        n = min(int(batch["pixel_values"].shape[0]), samples - seen)
        for k in keys:
            if k in batch:
                rows[k].append(batch[k][:n])
        seen += n
    joined = {k: _cat_rows(v) for k, v in rows.items() if v}
    return [{k: v[i:i + batch_size] for k, v in joined.items()} for i in range(0, seen, batch_size)]


def _cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """Rows of several batches in one tensor; token sequences right-padded with 0 to the longest
    (the attention mask is 0 there, so those positions are padding to the model)."""
    if parts[0].dim() == 2 and len({p.shape[1] for p in parts}) > 1:
        longest = max(p.shape[1] for p in parts)
        parts = [torch.nn.functional.pad(p, (0, longest - p.shape[1])) for p in parts]
    return torch.cat(parts)
