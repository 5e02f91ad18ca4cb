"""The official metrics of a merged pass, its headline accuracy, and each sample's difficulty.

Difficulty (larger = harder) is the x axis of the cost-vs-difficulty panel: VQA uses
1 - the VQA accuracy of the prediction, NLVR2 the trimmed model's cross-entropy of the label.
It exists only when every sample has answers / a label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from trim.eval.metrics.vqa import DEFAULT_VQA_METRIC


@dataclass
class Scores:
    metrics: dict[str, Any] | None = None  # None: the split has no answers / labels (test)
    accuracy: float | None = None  # headline, percent
    difficulty: np.ndarray | None = None
    difficulty_label: str = ""
    # Half-width of the accuracy's 95% interval over the samples (normal approximation), percent: two
    # methods closer than this on the same split are not told apart by it (1,000 samples: about 2 points).
    ci95: float | None = None


def score(task: str, merged: dict[str, Any], vqa_metric: str = DEFAULT_VQA_METRIC) -> Scores:
    """``vqa_metric``: which official VQA tool to reproduce (trim.eval.metrics.vqa.VQA_METRICS)."""
    return _vqa(merged, vqa_metric) if task == "vqa" else _nlvr2(merged)


def _vqa(merged: dict[str, Any], metric: str) -> Scores:
    from trim.eval.metrics import vqa_accuracy

    ids, predictions = merged["ids"], merged["predictions"]
    questions = [{"question_id": q, "answers": a, "answer_type": at, "question_type": qt}
                 for q, a, at, qt in zip(ids, merged["answers"], merged["answer_type"], merged["question_type"]) if a]
    if not questions:
        return Scores()
    answered = {q["question_id"] for q in questions}
    result = vqa_accuracy({q: p for q, p in zip(ids, predictions) if q in answered}, questions, metric=metric)
    per_question = result.pop("per_question")
    difficulty = None
    if len(questions) == len(ids):
        difficulty = np.array([1.0 - per_question[q] / 100.0 for q in ids])
    return Scores(result, result["overall"], difficulty, "1 - VQA accuracy of the prediction",
                  ci95=ci95(np.array(list(per_question.values()), dtype=np.float64)))


def _nlvr2(merged: dict[str, Any]) -> Scores:
    from trim.eval.metrics import nlvr2_metrics

    ids = merged["ids"]
    labels = {i: bool(lab) for i, lab in zip(ids, merged["label"]) if lab >= 0}
    if not labels:
        return Scores()
    result = nlvr2_metrics(dict(zip(ids, merged["predictions"])), labels)
    difficulty = np.array(merged["loss"], dtype=np.float64) if len(labels) == len(ids) else None
    p, n = result["accuracy"], result["n"]  # right/wrong scores: their spread follows from p
    spread = 100.0 * np.sqrt(p * (1 - p) * n / (n - 1)) if n > 1 else None
    return Scores(result, 100.0 * p, difficulty, "cross-entropy of the label (trimmed model)",
                  ci95=None if spread is None else _half_width(spread, n))


def ci95(per_sample: np.ndarray) -> float | None:
    """Half-width of the 95% interval of the mean of per-sample scores (percent), normal approximation."""
    if len(per_sample) < 2:
        return None
    return _half_width(float(per_sample.std(ddof=1)), len(per_sample))


def _half_width(std: float, n: int) -> float:
    return float(1.96 * std / np.sqrt(n))
