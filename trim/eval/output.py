"""Where `trim eval` writes: ``OUT/eval/<stem>.*``, checked writable before any work starts."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from trim.eval.errors import OutputError


def output_stem(task: str, split: str, budget: float | None = None, *, blind: bool = False) -> str:
    """File stem of the results: ``<task>`` for the val split, ``<task>_<split>`` otherwise,
    ``_budget<b>`` after it for an evaluation at an asked budget (``trim eval --budget``), and
    ``_blind`` last for the blind baseline (``trim eval --blind``)."""
    stem = task if split == "val" else f"{task}_{split}"
    stem = stem if budget is None else f"{stem}_budget{budget:g}"
    return f"{stem}_blind" if blind else stem


def check_writable(directory: Path, flag: str) -> None:
    """Raise `OutputError` unless files can be created in ``directory`` (made later if missing).

    Checked before the model and data load: otherwise an unwritable folder surfaces only after
    the whole pass and the speed measurement. ``flag`` is how the user named the folder.
    """
    existing = directory.absolute()
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{flag}: cannot write results to {directory}: {existing} is a file, not a folder; "
                          "pass --out a folder you can write to")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise OutputError(f"{flag}: cannot write results to {directory}: {existing} is not writable "
                          f"({err.strerror or err}); pass --out a folder you can write to") from err


def write_predictions(task: str, predictions: dict[Any, Any], out_dir: Path, stem: str) -> Path:
    """The file the official server / script takes: EvalAI JSON (VQA) or identifier,label CSV (NLVR2)."""
    from trim.eval.metrics import export_csv, export_evalai

    if task == "vqa":
        return export_evalai(predictions, out_dir / f"{stem}_predictions_evalai.json")
    return export_csv(predictions, out_dir / f"{stem}_predictions.csv")


def write_json(result: dict[str, Any], path: Path) -> Path:
    from trim.eval.metrics._io import atomic_write_text

    return atomic_write_text(path, json.dumps(result, indent=1) + "\n")
