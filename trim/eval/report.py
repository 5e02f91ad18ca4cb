"""`trim eval report`: accuracy vs measured speedup across several `trim eval` results.

Each eval JSON contributes one point: its headline accuracy (VQA overall, NLVR2 accuracy,
both in percent) against the wall-clock speedup measured in that same evaluation (full vs
trimmed, same weights and batch: design invariant 5). Points are grouped by the training
method recorded in the checkpoint (``objective.method``), one Pareto plot per task, and a
markdown table lists every point with its cost ratio and raw timings.

Evaluations at an asked budget (``trim eval --budget``) form their own group per checkpoint,
"<run>: one model, budgets", drawn as one curve: the accuracy-vs-speedup trade-off one
calibrated model serves, next to the models trained per target.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trim.errors import TrimError

__all__ = ["ReportError", "load_eval", "report_points", "markdown_table", "write_report"]


class ReportError(TrimError):
    """An eval JSON is missing, unreadable, or not from `trim eval`."""


def load_eval(path: str | os.PathLike) -> dict[str, Any]:
    from trim.eval.result import EVAL_FORMAT

    path = Path(path)
    if not path.is_file():
        raise ReportError(f"{path} does not exist; pass the JSON files `trim eval` wrote (CKPT/eval/<task>.json)")
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as exn:
        raise ReportError(f"{path} is not valid JSON ({exn})") from exn
    found = result.get("format") if isinstance(result, dict) else None
    if found != EVAL_FORMAT:
        raise ReportError(f"{path} is not a `trim eval` result (format {found!r}, expected {EVAL_FORMAT!r}); "
                          "metrics files of other tools cannot be placed on the plot")
    result["_path"] = str(path)
    return result


def _names(results: list[dict[str, Any]]) -> list[str]:
    """Point labels: the run name, made unique with the folder holding eval/ when needed."""
    base = [str(r.get("name") or Path(r["checkpoint"]).name) + _at_budget(r) for r in results]
    # Same run twice (e.g. two --out folders of one checkpoint): add the folder holding eval/.
    names = [f"{b} ({Path(r['_path']).parent.parent.name})" if base.count(b) > 1 else b
             for b, r in zip(base, results)]
    return [f"{n} #{i + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _at_budget(result: dict[str, Any]) -> str:
    budget = result.get("budget")
    blind = " (blind)" if result.get("images") == "blind" else ""
    return ("" if budget is None else f" @{budget:g}") + blind


def _group(result: dict[str, Any]) -> str:
    """The training method, or for a --budget evaluation the one model's budget curve."""
    if result.get("budget") is not None:
        return f"{result.get('name') or Path(result['checkpoint']).name}: one model, budgets"
    return str((result.get("run") or {}).get("method") or result["model"]["family"])


def report_points(results: list[dict[str, Any]], speed: str = "throughput") -> list[dict[str, Any]]:
    """One row per result: name, group, task, accuracy, speedup and what they came from."""
    rows = []
    for result, name in zip(results, _names(results)):
        measured = (result.get("speed") or {}).get(speed) or {}
        run = result.get("run") or {}
        target = run.get("target")
        last = (result.get("relevance") or {}).get("last") or {}  # eval JSONs without relevance: "-"
        rows.append({
            "name": name,
            "group": _group(result),
            "budget_curve": result.get("budget") is not None,
            "task": result["task"],
            "split": result["split"],
            "samples": result["samples"],
            "complete": result["complete"],
            "target": target,
            "budget": result.get("budget"),
            "accuracy": result.get("accuracy"),
            "accuracy_name": result.get("accuracy_name", "accuracy"),
            "cost_ratio": result["cost_ratio"]["mean"],
            "relevance_recall": last.get("recall"),
            "relevance_lift": last.get("lift"),
            "images": result.get("images", "real"),
            "speedup": measured.get("speedup"),
            "trimmed": measured.get("trimmed_samples_per_s", measured.get("trimmed_ms")),
            "full": measured.get("full_samples_per_s", measured.get("full_ms")),
            "batch_size": measured.get("batch_size"),
            "device": (result.get("speed") or {}).get("device"),
            # eval JSONs from before --vqa-metric existed were scored the LAVIS way
            "vqa_metric": result.get("vqa_metric", "lavis") if result["task"] == "vqa" else None,
            "source": result["_path"],
        })
    return rows


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(rows: list[dict[str, Any]], speed: str = "throughput") -> str:
    """One line per point; the last column marks the points on the Pareto front (``pareto``)."""
    unit = "samples/s" if speed == "throughput" else "ms"
    head = (f"| name | method | task/split | samples | target | budget | accuracy (%) | cost ratio | "
            f"relevance recall | lift | speedup ({speed}) | trimmed {unit} | full {unit} | batch | device | Pareto |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        split = r["split"] + ("" if r["complete"] else " (subset)")
        lines.append(
            f"| {r['name']} | {r['group']} | {r['task']}/{split} | {r['samples']} | {_fmt(r['target'], 'g')} | "
            f"{_fmt(r.get('budget'), 'g')} | "
            f"{_fmt(r['accuracy'], '.2f')} | {r['cost_ratio']:.3f} | {_fmt(r.get('relevance_recall'), '.3f')} | "
            f"{_fmt(r.get('relevance_lift'), '.2f')} | {_fmt(r['speedup'], '.2f')} | "
            f"{_fmt(r['trimmed'], '.2f')} | {_fmt(r['full'], '.2f')} | {_fmt(r['batch_size'], 'd')} | "
            f"{r['device'] or '-'} | {'yes' if r.get('pareto') else ''} |")
    return "\n".join(lines)


def write_report(paths: Sequence[str | os.PathLike], out: str | os.PathLike, *, speed: str = "throughput",
                 title: str | None = None) -> dict[str, Any]:
    """Write ``report.md``, ``report.json`` and ``pareto_<task>.png`` into ``out``."""
    from trim.eval.metrics._io import atomic_write_text
    from trim.eval.plots import pareto_front, plot_pareto

    if speed not in ("throughput", "latency"):
        raise ReportError(f"speed={speed!r}; choose 'throughput' or 'latency'")
    if not paths:
        raise ReportError("no eval JSON given; pass the files `trim eval` wrote")
    results = [load_eval(p) for p in paths]
    rows = report_points(results, speed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    title = title or "trim: accuracy vs measured speedup"
    sections = [f"# {title}", ""]
    figures: list[str] = []
    for task in sorted({r["task"] for r in rows}):
        task_rows = [r for r in rows if r["task"] == task]
        plotted = [r for r in task_rows if r["accuracy"] is not None and r["speedup"] is not None]
        notes = []
        if len(plotted) < len(task_rows):
            notes.append(f"{len(task_rows) - len(plotted)} result(s) lack an accuracy (unlabelled split) or a speed "
                         "measurement (--no-speed, --blind) and are only in the table.")
        devices = {r["device"] for r in plotted}
        if len(devices) > 1:
            notes.append(f"speedups were measured on different devices ({', '.join(sorted(map(str, devices)))}); "
                         "each is a within-run ratio, but they are not directly comparable.")
        metrics = {r["vqa_metric"] for r in plotted if r.get("vqa_metric")}
        if len(metrics) > 1:
            notes.append(f"VQA accuracies were computed with different official tools ({', '.join(sorted(metrics))}; "
                         "docs/metrics.md); re-score with one `--vqa-metric` before comparing them.")
        front_names: set[str] = set()
        if plotted:
            front = pareto_front([{"name": r["name"], "speedup": r["speedup"], "accuracy": r["accuracy"]}
                                  for r in plotted])
            front_names = {p["name"] for p in front}
            path = plot_pareto([{k: r[k] for k in ("name", "speedup", "accuracy", "group", "budget_curve", "budget")}
                                for r in plotted],
                               out / f"pareto_{task}.png", title=f"{task}: accuracy vs measured {speed} speedup",
                               accuracy_label=plotted[0]["accuracy_name"])
            figures.append(path.name)
        sections += [f"## {task}", ""]
        if plotted:
            sections += [f"![{task} Pareto](pareto_{task}.png)", ""]
        for r in task_rows:
            r["pareto"] = r["name"] in front_names
        sections += [markdown_table(task_rows, speed), ""]
        sections += [f"*{n}*" for n in notes] + ([""] if notes else [])
    sections += ["Speedup: wall-clock time of the full model (trim='off') / the trimmed model (trim='eval'), "
                 "measured in the same `trim eval` run on the same weights and batch, interleaved, after warm-up, "
                 f"median of repeats ({speed}: " + ("the eval batch size" if speed == "throughput" else "batch 1")
                 + "). Cost ratio: mean per-sample FLOPs ratio over the set, padding counted. Relevance recall "
                 "and lift: at the last token-trimmed image layer, on data with relevance masks (the kept share of "
                 "the patches the question depends on; lift = recall / chance, 1.0 = chance). (blind): every image "
                 "replaced by a constant (`trim eval --blind`). Budget: the mean "
                 "cost ratio asked of a calibrated checkpoint (`trim eval --budget`; `trim calibrate` fits one logit "
                 "shift per budget on held-out inputs, so one set of weights serves them all).", ""]
    markdown = "\n".join(sections)
    md_path = atomic_write_text(out / "report.md", markdown)
    atomic_write_text(out / "report.json", json.dumps({"speed": speed, "points": rows}, indent=1) + "\n")
    return {"path": str(md_path), "figures": figures, "points": rows, "markdown": markdown}
