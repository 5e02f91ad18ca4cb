"""`trim eval score`: the official numbers for a results file in the official format,
whatever model wrote it.

    trim eval score --task vqa --results R.json --questions Q.json --annotations A.json [--vqa-metric lavis|vqa-tools]
    trim eval score --task nlvr2 --predictions P.csv --labels dev.json
    (add --json to print the metrics as JSON)

As the official tools, the results must answer exactly the annotated questions (NLVR2:
predict exactly the labelled examples); a missing or an extra id is an error naming the
file and some of the ids, since either means the files do not belong together.
See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from trim.eval.errors import FileFormatError
from trim.eval.metrics.nlvr2 import nlvr2_metrics
from trim.eval.metrics.official_io import (id_mismatch, read_nlvr2_labels, read_nlvr2_predictions,
                                           read_vqa_annotations, read_vqa_questions, read_vqa_results)
from trim.eval.metrics.vqa import DEFAULT_VQA_METRIC, VQA_METRICS, vqa_accuracy

__all__ = ["score_vqa_files", "score_nlvr2_files", "format_vqa", "format_nlvr2", "score_parser", "run_score"]

VQA_METRIC_HELP = ("which official VQA tool to reproduce: 'lavis' (LAVIS's vqa_eval.py, GT-Vision-Lab's tool "
                   "before 2021) or 'vqa-tools' (GT-Vision-Lab/VQA vqaEval.py, current master); default "
                   f"{DEFAULT_VQA_METRIC} (docs/metrics.md)")


def score_vqa_files(results: str | os.PathLike, questions: str | os.PathLike, annotations: str | os.PathLike,
                    metric: str = DEFAULT_VQA_METRIC) -> dict[str, Any]:
    """`vqa_accuracy` of a results file against the questions + annotation files."""
    answers = read_vqa_results(results)
    question_ids = read_vqa_questions(questions)
    annotated = read_vqa_annotations(annotations)
    qids = [a["question_id"] for a in annotated]
    problem = id_mismatch(qids, question_ids, got_name=f"--annotations {annotations}",
                          expected_name=f"--questions {questions}", ids="question ids")
    if problem:
        raise FileFormatError(f"the questions and annotation files do not belong together: {problem}")
    problem = id_mismatch(answers, qids, got_name=f"--results {results}",
                          expected_name=f"--annotations {annotations}", ids="question ids")
    if problem:
        raise FileFormatError(f"{problem}. The official tool scores exactly the annotated questions: answer each "
                              "once, and score against the annotation file of the split you predicted")
    result = vqa_accuracy(answers, annotated, metric=metric)
    result["files"] = {"results": str(results), "questions": str(questions), "annotations": str(annotations)}
    return result


def score_nlvr2_files(predictions: str | os.PathLike, labels: str | os.PathLike) -> dict[str, Any]:
    """`nlvr2_metrics` of a predictions CSV against a labelled JSON-lines split."""
    predicted = read_nlvr2_predictions(predictions)
    labelled = read_nlvr2_labels(labels)
    problem = id_mismatch(predicted, labelled, got_name=f"--predictions {predictions}",
                          expected_name=f"--labels {labels}", ids="identifiers")
    if problem:
        # The official script ignores extra predictions, but they mean the files do not match.
        raise FileFormatError(f"{problem}. Predict exactly the examples of the labelled split")
    result = nlvr2_metrics(predicted, labelled)
    result["files"] = {"predictions": str(predictions), "labels": str(labels)}
    return result


def _table(scores: dict[str, float]) -> list[str]:
    width = max(len(k) for k in scores)
    return [f"  {k:<{width}}  {v:6.2f}" for k, v in sorted(scores.items())]


def format_vqa(result: dict[str, Any]) -> str:
    files = result["files"]
    lines = [f"VQA accuracy ({result['metric']}): {result['overall']:.2f} over {result['n']} questions",
             f"  results {files['results']}, annotations {files['annotations']}",
             "per answer type:", *_table(result["perAnswerType"]),
             "per question type:", *_table(result["perQuestionType"])]
    return "\n".join(lines)


def format_nlvr2(result: dict[str, Any]) -> str:
    files = result["files"]
    n, groups = result["n"], result["n_groups"]
    return "\n".join([
        f"NLVR2: {n} examples, {groups} sentences (predictions {files['predictions']}, labels {files['labels']})",
        f"accuracy    {result['accuracy']:.4f}  ({round(result['accuracy'] * n)} of {n} correct)",
        f"consistency {result['consistency']:.4f}  ({round(result['consistency'] * groups)} of {groups} sentences "
        "all correct)",
    ])


def score_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trim eval score", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, choices=("vqa", "nlvr2"))
    vqa = p.add_argument_group("vqa (official VQA v2 files)")
    vqa.add_argument("--results", help='results JSON: [{"question_id": int, "answer": str}, ...]')
    vqa.add_argument("--questions", help="questions JSON (v2_OpenEnded_mscoco_<split>_questions.json)")
    vqa.add_argument("--annotations", help="annotation JSON (v2_mscoco_<split>_annotations.json)")
    vqa.add_argument("--vqa-metric", choices=VQA_METRICS, help=VQA_METRIC_HELP)
    nlvr2 = p.add_argument_group("nlvr2 (official NLVR2 files)")
    nlvr2.add_argument("--predictions", help="predictions CSV: one 'identifier,True|False' line per example")
    nlvr2.add_argument("--labels", help="the labelled split, JSON lines (dev.json, test1.json)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON (per question included)")
    return p


_TASK_FLAGS = {"vqa": ("results", "questions", "annotations"), "nlvr2": ("predictions", "labels")}


def run_score(argv: list[str]) -> int:
    parser = score_parser()
    args = parser.parse_args(argv)
    flags = vars(args)
    needed = _TASK_FLAGS[args.task]
    missing = [f"--{k}" for k in needed if flags[k] is None]
    foreign = [f"--{k.replace('_', '-')}" for task, keys in _TASK_FLAGS.items() if task != args.task for k in keys
               if flags[k] is not None]
    if args.task == "nlvr2" and args.vqa_metric is not None:
        foreign.append("--vqa-metric")
    if missing or foreign:
        parser.error(f"--task {args.task} needs {', '.join(f'--{k}' for k in needed)}"
                     + (f"; missing {', '.join(missing)}" if missing else "")
                     + (f"; {', '.join(foreign)} belong(s) to the other task" if foreign else ""))
    try:
        if args.task == "vqa":
            result = score_vqa_files(args.results, args.questions, args.annotations,
                                     args.vqa_metric or DEFAULT_VQA_METRIC)
        else:
            result = score_nlvr2_files(args.predictions, args.labels)
    except FileFormatError as exn:
        print(f"trim eval score: {type(exn).__name__}: {exn}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_vqa(result) if args.task == "vqa" else format_nlvr2(result))
    return 0
