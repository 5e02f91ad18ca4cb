"""Evaluation: official metrics, `trim eval` (checkpoint -> metrics + cost + measured speed +
figures), `trim eval report` (Pareto across evaluations), `trim bench`, report plots.

Imports are lazy so that ``import trim.eval`` stays cheap (no matplotlib, no data stack):

- ``evaluate(checkpoint, task, data, ...)``: see ``trim.eval.evaluate`` and docs/evaluation.md
- ``write_report(eval_jsons, out, ...)``: see ``trim.eval.report``
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"evaluate": "trim.eval.evaluate", "measure_speed": "trim.eval.speed",
         "write_report": "trim.eval.report", "load_eval": "trim.eval.report"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trim.eval' has no attribute {name!r}")
