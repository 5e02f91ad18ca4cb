"""Readers of the official VQA v2 and NLVR2 file formats, for scoring predictions that any
model wrote (`trim eval score`, docs/evaluation.md).

Each reader checks the whole file and raises `FileFormatError` naming the file and the
entry (JSON list index or line number) and saying what to fix. Where the official tools
would crash on a malformed entry, or silently count it wrong, these stop with a message.

- VQA results: a JSON list of ``{"question_id": int, "answer": str}`` (the EvalAI upload).
- VQA questions: ``{"questions": [{"question_id", "image_id", "question"}, ...], ...}``.
- VQA annotations: ``{"annotations": [{"question_id", "answer_type", "question_type",
  "answers": [{"answer", "answer_confidence", "answer_id"}, ...], ...}, ...], ...}``.
- NLVR2 predictions: CSV lines ``identifier,True|False``, no header (what
  ``nlvr2/eval/metrics.py`` of lil-lab/nlvr reads: it splits each line on ",").
- NLVR2 labels: the JSON-lines split file (``dev.json``), one object per line with
  ``identifier`` and ``label`` ("True"/"False").
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from trim.eval.errors import FileFormatError

__all__ = ["read_vqa_results", "read_vqa_questions", "read_vqa_annotations", "read_nlvr2_predictions",
           "read_nlvr2_labels", "id_mismatch"]

_RESULTS_SHAPE = 'a JSON list of {"question_id": int, "answer": str}'


def _read_text(path: str | os.PathLike, what: str) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{what} {path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise FileFormatError(f"{what} {path}: cannot be read as UTF-8 text ({err})") from None


def _read_json(path: str | os.PathLike, what: str) -> Any:
    try:
        return json.loads(_read_text(path, what))
    except json.JSONDecodeError as err:
        raise FileFormatError(f"{what} {path} is not JSON ({err}); {_SHAPES[what]}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _wrong_document(path: Any, what: str, data: Any) -> FileFormatError:
    """The error for a JSON file of the wrong kind, guessing which kind it is."""
    guess = ""
    if isinstance(data, list):
        guess = " It is a JSON list: a results file? Pass it as --results."
    elif isinstance(data, dict) and "annotations" in data:
        guess = " It has 'annotations': an annotation file? Pass it as --annotations."
    elif isinstance(data, dict) and "questions" in data:
        guess = " It has 'questions': a questions file? Pass it as --questions."
    return FileFormatError(f"{what} {path}: expected {_SHAPES[what]}, got a JSON {type(data).__name__}.{guess}")


_SHAPES = {
    "--results": _RESULTS_SHAPE,
    "--questions": 'a JSON object with "questions": [{"question_id": int, "image_id": int, "question": str}, ...]',
    "--annotations": 'a JSON object with "annotations": [{"question_id": int, "answer_type": str, '
                     '"question_type": str, "answers": [{"answer": str, ...}, ...]}, ...]',
}


def _unique(qid: Any, index: int, seen: dict[Any, int], where: str, what: str) -> None:
    if qid in seen:
        raise FileFormatError(f"{where}: question_id {qid} again (first at entry [{seen[qid]}]); {what} must list "
                              "each question once")
    seen[qid] = index


def read_vqa_results(path: str | os.PathLike) -> dict[int, str]:
    """question_id -> answer from a VQA results file (``[{"question_id", "answer"}, ...]``)."""
    data = _read_json(path, "--results")
    if not isinstance(data, list):
        raise _wrong_document(path, "--results", data)
    if not data:
        raise FileFormatError(f"--results {path} is an empty list; it needs one answer per question")
    answers: dict[int, str] = {}
    seen: dict[Any, int] = {}
    for i, row in enumerate(data):
        where = f"--results {path}: entry [{i}]"
        if not isinstance(row, dict):
            raise FileFormatError(f"{where} is {_kind(row)}; every entry is {{\"question_id\": int, \"answer\": str}}")
        for key in ("question_id", "answer"):
            if key not in row:
                raise FileFormatError(f"{where} has no {key!r} (keys: {sorted(row)}); every entry is "
                                      '{"question_id": int, "answer": str}')
        qid, answer = row["question_id"], row["answer"]
        if not _is_int(qid):
            # The official loader compares ids with the annotation's ints, so "42" never matches.
            raise FileFormatError(f"{where}: question_id {_kind(qid)} must be an integer as in the annotations")
        if not isinstance(answer, str):
            raise FileFormatError(f"{where} (question_id {qid}): answer {_kind(answer)} must be a string "
                                  f"(write {json.dumps(str(answer))})")
        _unique(qid, i, seen, where, "a results file")
        answers[qid] = answer
    return answers


def read_vqa_questions(path: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """question_id -> question entry from a VQA questions file."""
    data = _read_json(path, "--questions")
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise _wrong_document(path, "--questions", data)
    questions: dict[int, dict[str, Any]] = {}
    seen: dict[Any, int] = {}
    for i, entry in enumerate(data["questions"]):
        where = f"--questions {path}: questions[{i}]"
        if not isinstance(entry, dict) or not _is_int(entry.get("question_id")):
            raise FileFormatError(f"{where} has no integer 'question_id': {str(entry)[:200]}")
        _unique(entry["question_id"], i, seen, where, "a questions file")
        questions[entry["question_id"]] = entry
    return questions


def read_vqa_annotations(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The annotation entries of a VQA annotation file, each checked."""
    data = _read_json(path, "--annotations")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise _wrong_document(path, "--annotations", data)
    annotations = data["annotations"]
    if not annotations:
        raise FileFormatError(f"--annotations {path} has no annotations")
    seen: dict[Any, int] = {}
    for i, entry in enumerate(annotations):
        where = f"--annotations {path}: annotations[{i}]"
        if not isinstance(entry, dict) or not _is_int(entry.get("question_id")):
            raise FileFormatError(f"{where} has no integer 'question_id': {str(entry)[:200]}")
        where += f" (question_id {entry['question_id']})"
        for key in ("answer_type", "question_type"):
            if not isinstance(entry.get(key), str):
                raise FileFormatError(f"{where}: {key!r} must be a string, got {_kind(entry.get(key))}")
        answers = entry.get("answers")
        if not isinstance(answers, list) or not answers:
            raise FileFormatError(f"{where}: 'answers' must be a non-empty list of {{\"answer\": str, ...}}, "
                                  f"got {_kind(answers)}")
        for j, ans in enumerate(answers):
            if not isinstance(ans, dict) or not isinstance(ans.get("answer"), str):
                raise FileFormatError(f"{where}: answers[{j}] must be {{\"answer\": str, ...}}, got {_kind(ans)}")
        _unique(entry["question_id"], i, seen, where, "an annotation file")
    return annotations


def _bool_text(value: str) -> bool | None:
    # The official script compares prediction.lower() with label.lower(): only true/false
    # in any case can ever be right, and no spaces are stripped.
    low = value.lower()
    return {"true": True, "false": False}.get(low)


def read_nlvr2_predictions(path: str | os.PathLike) -> dict[str, bool]:
    """identifier -> prediction from an NLVR2 predictions CSV (``identifier,True|False`` lines)."""
    text = _read_text(path, "--predictions")
    predictions: dict[str, bool] = {}
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        row = line.strip()
        if not row:
            continue  # a trailing newline or blank line carries no prediction
        where = f"--predictions {path}: line {lineno} ({row[:80]!r})"
        fields = row.split(",")
        value = _bool_text(fields[1]) if len(fields) == 2 else None
        if value is None:
            header = " If it is a header, remove it: the official file has none." if lineno == 1 else ""
            raise FileFormatError(f"{where} is not 'identifier,True|False' (True/False in any case, no spaces, "
                                  f"no other column).{header}")
        identifier = fields[0]
        _first_time(first_line, identifier, lineno, where, "; give one prediction per example")
        predictions[identifier] = value
    if not predictions:
        raise FileFormatError(f"--predictions {path} has no 'identifier,True|False' line")
    return predictions


def read_nlvr2_labels(path: str | os.PathLike) -> dict[str, bool]:
    """identifier -> label from an NLVR2 JSON-lines split file (train.json / dev.json / test1.json)."""
    text = _read_text(path, "--labels")
    labels: dict[str, bool] = {}
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"--labels {path}: line {lineno}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            whole = " (the file looks like one JSON document; NLVR2 splits are JSON lines, one example per line)" \
                if lineno == 1 and line.lstrip()[:1] in "[{" else ""
            raise FileFormatError(f"{where} is not a JSON object ({err}){whole}") from None
        if isinstance(entry, list):
            raise FileFormatError(f"{where} is a JSON list; NLVR2 splits are JSON lines, one example object per "
                                  'line: {"identifier": "dev-850-0-0", "label": "True", ...}')
        if not isinstance(entry, dict) or not isinstance(entry.get("identifier"), str):
            raise FileFormatError(f"{where} has no string 'identifier'; each line is one NLVR2 example "
                                  '{"identifier": "dev-850-0-0", "label": "True", ...}')
        identifier = entry["identifier"]
        label = _bool_text(entry["label"]) if isinstance(entry.get("label"), str) else None
        if label is None:
            raise FileFormatError(f"{where} ({identifier}): label {_kind(entry.get('label'))} is not 'True'/'False'"
                                  " (an unlabelled split such as test2 cannot be scored)")
        _first_time(first_line, identifier, lineno, where)
        labels[identifier] = label
    if not labels:
        raise FileFormatError(f"--labels {path} has no examples")
    return labels


def _first_time(first_line: dict[str, int], identifier: str, lineno: int, where: str, fix: str = "") -> None:
    """Record where ``identifier`` first appears; a second appearance is an error naming both lines."""
    if identifier in first_line:
        raise FileFormatError(f"{where}: identifier {identifier!r} again (first on line {first_line[identifier]}){fix}")
    first_line[identifier] = lineno


def id_mismatch(got: Any, expected: Any, *, got_name: str, expected_name: str, ids: str) -> str | None:
    """None when the two id collections are the same set, else a message with counts and examples."""
    got_set, expected_set = set(got), set(expected)
    if got_set == expected_set:
        return None
    missing = sorted(expected_set - got_set, key=str)
    extra = sorted(got_set - expected_set, key=str)
    parts = []
    if missing:
        parts.append(f"{len(missing)} {ids} of {expected_name} missing from {got_name} (e.g. {missing[:5]})")
    if extra:
        parts.append(f"{len(extra)} {ids} in {got_name} that {expected_name} does not have (e.g. {extra[:5]})")
    return "; ".join(parts)
