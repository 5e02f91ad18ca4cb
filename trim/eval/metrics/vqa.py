"""VQA v2 accuracy exactly as the official evaluation tools compute it, in both variants.

Two copies of ``vqaEval.py`` are in use and they disagree on how answers are prepared;
``metric=`` picks one, named after the code it reproduces (docs/metrics.md):

``"lavis"`` -- ``lavis/common/vqa_tools/vqa_eval.py`` in salesforce/LAVIS, i.e.
GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` as it was before
March 2021, ported to Python 3. Per question:

    pred  = process_digit_article(process_punctuation(strip(pred)))      always
    gts   = [process_punctuation(a) for a in answers]  if len(set(answers)) > 1
            else answers                                  (untouched when all agree)

``"vqa-tools"`` -- GT-Vision-Lab/VQA master (commit a013f00, "Fixed processing answers
bug", 2021). Per question:

    gts, pred = [strip(a) for a in answers], strip(pred)                  always
    if len(set(gts)) > 1:                                                 (after the strip)
        gts  = [process_digit_article(process_punctuation(a)) for a in gts]
        pred = process_digit_article(process_punctuation(pred))
    (when all agree neither side is normalised: "two" vs ten "2" scores 0)

Both then score ``acc_q = 1/10 * sum_i min(1, #{j != i : gts[j] == pred} / 3)``, the mean
over the leave-one-annotator-out subsets (k matching answers of 10: 0, .3, .6, .9, 1 for
k = 0..4+), and report ``round(100 * sum(acc) / n, 2)`` overall, per answer type and per
question type, and ``round(100 * acc_q, 2)`` per question. ``strip`` is: newlines and tabs
to spaces, then strip the ends.

Quirks kept on purpose because the official numbers depend on them:

* the period regex ``(?!<=\\d)(\\.)(?!\\d)`` is a negative *look-ahead* for "<=digit"
  (a typo for a look-behind), so it strips every period not followed by a digit, and
  ``re.UNICODE`` is passed as the ``count`` argument, so at most 32 are stripped;
* annotator i's subset drops every answer *entry equal to* entry i (the tools compare the
  answer dicts); with the annotation files' distinct ``answer_id`` this is "drop annotator
  i", but two identical dicts leave together.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from trim.eval.metrics._io import atomic_write_text

__all__ = [
    "normalize_answer",
    "process_punctuation",
    "process_digit_article",
    "question_accuracy",
    "vqa_accuracy",
    "export_evalai",
    "VQA_METRICS",
    "DEFAULT_VQA_METRIC",
]

# The variants, each named after the evaluation code it reproduces (module docstring).
VQA_METRICS = ("lavis", "vqa-tools")
# LAVIS's copy: what trim computed before the choice existed (so earlier eval JSONs stay
# comparable), and what the vision-language papers that evaluate with LAVIS or a vendored
# pre-2021 vqaEval.py report as val accuracy. docs/metrics.md has the full argument.
DEFAULT_VQA_METRIC = "lavis"

# The official contractions table (apostrophe-less spelling -> spelling with apostrophes).
# Keys with capitals ("Im", "Ive", "Id've") can never match: words are lower-cased first.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't",
    "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
# Order does not matter: each mark's rule looks at the original text only.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
               ">", "<", "@", "`", ",", "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: see the module docstring
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The official call is periodStrip.sub("", text, re.UNICODE): the flag lands in `count`.
_PERIOD_STRIP_COUNT = int(re.UNICODE)  # == 32


def process_punctuation(text: str) -> str:
    """The official punctuation pass.

    Each character of ``PUNCTUATION`` is deleted when it touches a space somewhere in
    the *input* ("red, white" -> "red white") or when the input has a comma between
    two digits anywhere ("1,000" -> "1000"); otherwise it becomes a space
    ("t-shirt" -> "t shirt"). Then periods not followed by a digit are deleted
    ("yes." -> "yes", "3.5" stays).
    """
    # The tests look at the original text, not the partially cleaned one; keep that.
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The official word pass: lower-case, split on whitespace, number words 0-10 (and
    'none') to digits, drop a/an/the, expand the contractions table, join with spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _strip_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(answer: str) -> str:
    """The official processing of a *predicted* answer: newlines/tabs to spaces, strip,
    ``process_punctuation`` then ``process_digit_article``.

    >>> normalize_answer("Two dogs.")
    '2 dogs'
    """
    return process_digit_article(process_punctuation(_strip_whitespace(answer)))


def check_vqa_metric(metric: str) -> str:
    if metric not in VQA_METRICS:
        raise ValueError(f"VQA metric {metric!r} is not one of {VQA_METRICS}: 'lavis' reproduces LAVIS's "
                         "vqa_eval.py, 'vqa-tools' GT-Vision-Lab/VQA's vqaEval.py (docs/metrics.md)")
    return metric


def _answer_entries(question: Mapping[str, Any]) -> list[Any]:
    """The question's answers as given: strings, or the annotation file's answer dicts."""
    raw = question["answers"]
    ok = isinstance(raw, list) and raw and all(
        isinstance(a, str) or (isinstance(a, Mapping) and isinstance(a.get("answer"), str)) for a in raw)
    if not ok:
        raise ValueError(
            f"question {question.get('question_id')!r}: 'answers' must be a non-empty list "
            f"of strings (or of {{'answer': str}} dicts), got {raw!r}"
        )
    return list(raw)


def prepare(prediction: str, answers: list[str], metric: str = DEFAULT_VQA_METRIC) -> tuple[str, list[str]]:
    """The prediction and ground-truth answers of one question as ``metric``'s tool
    prepares them before comparing strings (module docstring)."""
    if metric == "lavis":
        gts = [process_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
        return normalize_answer(prediction), gts
    check_vqa_metric(metric)
    gts, pred = [_strip_whitespace(a) for a in answers], _strip_whitespace(prediction)
    if len(set(gts)) > 1:  # decided after the strip: "yes" and "yes " agree
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
        pred = process_digit_article(process_punctuation(pred))
    return pred, gts


def question_accuracy(prediction: str, answers: list[str], entries: list[Any] | None = None) -> float:
    """Leave-one-out accuracy of a *prepared* prediction against prepared answers:
    mean over i of min(1, #{j : entries[j] != entries[i], answers[j] == prediction} / 3).

    ``entries`` are what the tools compare to leave annotator i out: the answer dicts (with
    the prepared answer). Without them annotator i alone leaves, which is what distinct
    ``answer_id``s give.
    """
    if entries is None:
        entries = list(range(len(answers)))
    per_subset = [
        min(1.0, float(sum(a == prediction and e != entry for a, e in zip(answers, entries))) / 3)
        for entry in entries
    ]
    return float(sum(per_subset)) / len(per_subset)


def _question_accuracy(prediction: str, question: Mapping[str, Any], metric: str) -> float:
    raw = _answer_entries(question)
    answers = [a["answer"] if isinstance(a, Mapping) else a for a in raw]
    pred, gts = prepare(prediction, answers, metric)
    entries = None
    if all(isinstance(a, Mapping) for a in raw):
        entries = [{**a, "answer": g} for a, g in zip(raw, gts)]
    return question_accuracy(pred, gts, entries)


def _qid(key: Any) -> Any:
    # JSON object keys come back as strings; question ids are ints in the annotations.
    return int(key) if isinstance(key, str) and key.isdigit() else key


def _rounded_mean(values: list[float], digits: int) -> float:
    # Same expression order as the official setAccuracy, so floats round identically.
    return round(100 * float(sum(values)) / len(values), digits)


def vqa_accuracy(
    predictions: Mapping[Any, str],
    questions: Iterable[Mapping[str, Any]],
    digits: int = 2,
    metric: str = DEFAULT_VQA_METRIC,
) -> dict[str, Any]:
    """Official VQA v2 accuracy, as ``metric``'s tool computes it.

    Args:
        predictions: question_id -> predicted answer string (raw; it is normalised here).
        questions: dicts with ``question_id``, ``answers`` (10 strings, or the raw
            annotation's ``{'answer': ...}`` dicts), ``answer_type``, ``question_type``.
        digits: rounding, 2 as the official tools.
        metric: ``"lavis"`` or ``"vqa-tools"``, the tool to reproduce (module docstring).

    Returns:
        ``{'overall': float, 'perAnswerType': {type: float}, 'perQuestionType':
        {type: float}, 'per_question': {question_id: float}, 'n': int, 'metric': str}``,
        accuracies in percent. Like the official tools, every question needs exactly one
        prediction.
    """
    check_vqa_metric(metric)
    questions = list(questions)
    preds = {_qid(k): v for k, v in predictions.items()}
    qids = [_qid(q["question_id"]) for q in questions]
    missing = [q for q in qids if q not in preds]
    extra = sorted(set(preds) - set(qids), key=str)
    if missing or extra:
        raise ValueError(
            f"predictions do not match the questions: {len(missing)} question(s) without a "
            f"prediction (e.g. {missing[:5]}), {len(extra)} prediction(s) for unknown "
            f"question ids (e.g. {extra[:5]}); the official tool requires the same set, so "
            "predict every question or pass only the questions you predicted"
        )
    if not questions:
        raise ValueError("vqa_accuracy needs at least one question")

    all_acc: list[float] = []
    by_answer_type: dict[str, list[float]] = {}
    by_question_type: dict[str, list[float]] = {}
    per_question: dict[Any, float] = {}
    for qid, question in zip(qids, questions):
        prediction = preds[qid]
        if not isinstance(prediction, str):
            raise TypeError(f"prediction for question {qid!r} must be a str, got {type(prediction).__name__}")
        try:
            answer_type, question_type = question["answer_type"], question["question_type"]
        except KeyError as err:
            raise ValueError(f"question {qid!r} has no {err.args[0]!r}; take it from the VQA annotation file") from None
        acc = _question_accuracy(prediction, question, metric)
        all_acc.append(acc)
        by_answer_type.setdefault(answer_type, []).append(acc)
        by_question_type.setdefault(question_type, []).append(acc)
        per_question[qid] = round(100 * acc, digits)

    return {
        "overall": _rounded_mean(all_acc, digits),
        "perAnswerType": {k: _rounded_mean(v, digits) for k, v in by_answer_type.items()},
        "perQuestionType": {k: _rounded_mean(v, digits) for k, v in by_question_type.items()},
        "per_question": per_question,
        "n": len(all_acc),
        "metric": metric,
    }


def export_evalai(predictions: Mapping[Any, str], path: str | os.PathLike) -> Path:
    """Write the EvalAI submission JSON ``[{"question_id": int, "answer": str}, ...]``
    (sorted by question id). Answers are written as predicted: EvalAI normalises them."""
    rows = []
    for key, answer in predictions.items():
        qid = _qid(key)
        if not isinstance(qid, int):
            raise ValueError(f"EvalAI needs integer question ids, got {key!r}")
        if not isinstance(answer, str):
            raise TypeError(f"answer for question {qid} must be a str, got {type(answer).__name__}")
        rows.append({"question_id": qid, "answer": answer})
    rows.sort(key=lambda r: r["question_id"])
    return atomic_write_text(path, json.dumps(rows))
