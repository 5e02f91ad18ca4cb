"""NLVR2 accuracy and consistency exactly as the official ``nlvr2/eval/metrics.py``.

    accuracy    = #{examples whose prediction equals the label} / #labelled examples
    consistency = #{groups whose examples are all correct} / #groups

A group is one sentence: the identifier ``split-set-pair-sentence`` (e.g.
``dev-850-0-0``) with its 3rd dash-separated field (the image pair) blanked, so
``dev-850-0-0`` and ``dev-850-1-0`` both fall in group ``dev-850--0``. Both numbers are
fractions in [0, 1], as the official script prints them. Like the official script the
loop runs over the labelled examples: a missing prediction is an error, a prediction
for an unlabelled identifier is ignored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trim.eval.metrics._io import atomic_write_text

__all__ = ["nlvr2_metrics", "group_key", "export_csv"]


def _as_bool(value: Any, what: str) -> bool:
    """True/False from a bool, a 0/1 integer or a 'true'/'false' string (any case).

    The official script compares ``prediction.lower() == label.lower()`` on strings, so
    anything other than true/false would silently count as wrong there; here it is an
    error instead.
    """
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("true", "false"):
            return low == "true"
    elif hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return _as_bool(value.item(), what)
    elif isinstance(value, (bool, int)) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{what} must be True/False, 0/1 or 'true'/'false', got {value!r}")


def group_key(identifier: str) -> str:
    """The official consistency group: the identifier with its 3rd '-' field blanked."""
    fields = identifier.split("-")
    if len(fields) < 3:
        raise ValueError(
            f"NLVR2 identifier {identifier!r} has no pair field; expected 'split-set-pair-sentence' like 'dev-850-0-0'"
        )
    fields[2] = ""
    return "-".join(fields)


def nlvr2_metrics(predictions: Mapping[str, Any], labels: Mapping[str, Any]) -> dict[str, Any]:
    """Official NLVR2 accuracy and consistency.

    Args:
        predictions: identifier -> predicted truth value (bool, 0/1 or 'True'/'False').
        labels: identifier -> label, same types (the official JSONL has 'True'/'False').

    Returns:
        ``{'accuracy': float, 'consistency': float, 'n': int, 'n_groups': int}``.
    """
    if not labels:
        raise ValueError("nlvr2_metrics needs at least one labelled example")
    missing = [k for k in labels if k not in predictions]
    if missing:
        raise ValueError(
            f"{len(missing)} labelled example(s) have no prediction (e.g. {missing[:5]}); "
            "predict every example of the split"
        )
    n_correct = 0
    group_consistent: dict[str, bool] = {}
    for identifier, label in labels.items():
        correct = _as_bool(predictions[identifier], f"prediction for {identifier!r}") == _as_bool(
            label, f"label for {identifier!r}"
        )
        n_correct += correct
        key = group_key(identifier)
        group_consistent[key] = group_consistent.get(key, True) and correct
    return {
        "accuracy": n_correct / len(labels),
        "consistency": sum(group_consistent.values()) / len(group_consistent),
        "n": len(labels),
        "n_groups": len(group_consistent),
    }


def export_csv(predictions: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write the official predictions file: one ``identifier,prediction`` line per
    example (no header; the official reader would take one as a prediction), with
    ``True``/``False`` as the prediction, sorted by identifier."""
    lines = []
    for identifier in sorted(predictions):
        if "," in identifier or "\n" in identifier:
            raise ValueError(f"identifier {identifier!r} contains a comma or newline; the CSV would be unreadable")
        value = _as_bool(predictions[identifier], f"prediction for {identifier!r}")
        lines.append(f"{identifier},{value}\n")
    return atomic_write_text(path, "".join(lines))
