"""The ``eval/<stem>.json`` record of one evaluation (format ``trim-eval/1``, docs/evaluation.md) and the
lines `trim eval` prints about it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trim.eval.blind import BLIND_NOTE
from trim.eval.relevance import relevance_summary
from trim.eval.scores import Scores
from trim.eval.split import EvalSplit
from trim.eval.stats import KEPT_NOTE, cost_summary, kept_summary
from trim.prune.keep_ratio import CALIBRATION_SKIPPED

EVAL_FORMAT = "trim-eval/1"


def run_name(recipe: dict[str, Any], ckpt: Path) -> str:
    """The recipe's name, else the run folder of a step_* checkpoint, else the checkpoint folder."""
    return str(recipe.get("name") or (ckpt.parent.name if ckpt.name.startswith("step_") else ckpt.name))


def _run(recipe: dict[str, Any], budget: float | None) -> dict[str, Any]:
    objective = recipe.get("objective") or {}
    method = objective.get("method")
    # A plain fine-tuning run carries the recipe's default target, which means nothing there.
    return {"method": method, "target": objective.get("target") if method not in (None, "none") else None,
            "budget": budget}


def _calibration(calibration: Any, budget: float | None, keep_ratio: float | None = None) -> dict[str, Any] | None:
    """What the budget knob did: the budget served and its logit shift (None: uncalibrated; for a
    fixed-ratio baseline, why calibration was skipped and the keep ratio it runs at)."""
    if calibration is None:
        return None if keep_ratio is None else {"skipped": CALIBRATION_SKIPPED, "keep_ratio": keep_ratio}
    lo, hi = calibration.budget_range
    return {"target": calibration.target, "budget": calibration.target if budget is None else budget,
            "shift": round(calibration.shift_for(budget), 6), "range": [lo, hi],
            "fitted_cost": calibration.mean_cost}


def own_cost(result: dict[str, Any]) -> dict[str, Any]:
    """The summary of what each sample kept (``sample_cost``); results written before it existed
    have ``cost_ratio`` only."""
    return result.get("sample_cost") or result["cost_ratio"]


def build_result(*, ckpt: Path, recipe: dict[str, Any], model_config: Any, split: EvalSplit, merged: dict[str, Any],
                 complete: bool, processes: int, batch_size: int, scores: Scores, speed: dict[str, Any] | None,
                 predictions_file: str, figures: list[str], seconds: float, budget: float | None = None,
                 calibration: Any = None, vqa_metric: str | None = None, blind: bool = False,
                 keep_ratio: float | None = None) -> dict[str, Any]:
    cfg, n = model_config, len(merged["ids"])
    relevance = merged["relevance"]
    return {
        "format": EVAL_FORMAT,
        "name": run_name(recipe, ckpt),
        "task": split.task,
        "split": split.name,
        "checkpoint": str(ckpt.resolve()),
        "data": str(split.root.resolve()),
        "run": _run(recipe, budget),
        "budget": budget,  # asked with --budget; None: the checkpoint's default (its calibrated target)
        "calibration": _calibration(calibration, budget, keep_ratio),
        "model": {"family": cfg.family, "image_size": cfg.vision.image_size, "num_labels": cfg.num_labels,
                  "trim": cfg.to_dict()["trim"]},
        "samples": n,
        "manifest_samples": split.expected,
        "complete": complete and n == split.expected,
        "duplicates_dropped": merged["duplicates"],
        "reading": merged["stats"],
        "processes": processes,
        "batch_size": batch_size,
        "max_text_len": split.max_text_len,
        "trim": "eval",
        "images": "blind" if blind else "real",
        "images_note": BLIND_NOTE if blind else None,
        "accuracy": None if scores.accuracy is None else round(float(scores.accuracy), 4),
        "accuracy_name": "VQA accuracy (%)" if split.task == "vqa" else "NLVR2 accuracy (%)",
        "accuracy_ci95": None if scores.ci95 is None else round(scores.ci95, 4),  # +- points, over the samples
        # Which official VQA tool the numbers reproduce (docs/metrics.md); also in metrics.metric.
        "vqa_metric": vqa_metric if split.task == "vqa" else None,
        "metrics": scores.metrics,
        "cost_ratio": cost_summary(merged["cost"]),  # as run: padding to a batch's longest, head unions
        "sample_cost": cost_summary(merged["sample_cost"]),  # what each sample kept: the budget calibrated
        "kept": kept_summary(cfg.trim, merged),
        "kept_note": KEPT_NOTE,
        # Only when the data carry relevance masks (the synthetic world) and some image layer trims tokens.
        "relevance": relevance_summary(relevance, merged["relevance_layers"])
        if relevance is not None and merged["relevance_layers"] else None,
        "speed": speed,
        "speedup": speed["throughput"]["speedup"] if speed else None,
        "exports": {"predictions": predictions_file},
        "figures": figures,
        "eval_seconds": round(seconds, 2),
    }


def _ci(result: dict[str, Any]) -> str:
    ci = result.get("accuracy_ci95")
    return "" if ci is None else f" (+-{ci:.2f} points, 95% interval over {result['samples']} samples)"


def summary(result: dict[str, Any]) -> str:
    """The lines `trim eval` prints."""
    budget = f" at budget {result['budget']:g}" if result.get("budget") is not None else ""
    blind = " BLIND" if result.get("images") == "blind" else ""
    lines = [f"{result['name']}{budget}{blind}: {result['task']}/{result['split']}, {result['samples']} samples "
             f"({'whole split' if result['complete'] else 'subset'}), {result['processes']} process(es)"]
    if blind:
        lines.append(f"blind: {result['images_note']}")
    m = result["metrics"]
    if m is None:
        lines.append("metrics: none (the split has no answers/labels); submit the predictions file")
    elif result["task"] == "vqa":
        per_type = ", ".join(f"{k} {v:.2f}" for k, v in sorted(m["perAnswerType"].items()))
        lines.append(f"VQA accuracy {m['overall']:.2f}{_ci(result)}  ({per_type}; metric {m.get('metric', 'lavis')})")
    else:
        lines.append(f"NLVR2 accuracy {m['accuracy']:.4f}{_ci(result)}, consistency {m['consistency']:.4f}")
    c, own = result["cost_ratio"], own_cost(result)
    lines.append(f"cost ratio per sample mean {own['mean']:.3f} (median {own['median']:.3f}, min {own['min']:.3f}, "
                 f"max {own['max']:.3f}); as run in batches of {result['batch_size']} {c['mean']:.3f}")
    if result.get("relevance"):
        lines.append(relevance_line(result["relevance"]))
    skipped = (result.get("calibration") or {}).get("skipped")
    if skipped:
        lines.append(f"calibration skipped at keep ratio {result['calibration']['keep_ratio']:.3f}: {skipped}")
    s = result["speed"]
    if s:
        t, lat = s["throughput"], s["latency"]
        lines.append(f"throughput @ batch {t['batch_size']}: trimmed {t['trimmed_samples_per_s']:.1f} vs full "
                     f"{t['full_samples_per_s']:.1f} samples/s = {t['speedup']:.2f}x; latency @ batch 1: trimmed "
                     f"{lat['trimmed_ms']:.2f} vs full {lat['full_ms']:.2f} ms = {lat['speedup']:.2f}x "
                     f"({s['device']}, median of {s['repeats']})")
    lines.append(f"wrote {result['path']} (+ {result['exports']['predictions']}, {len(result['figures'])} figures) "
                 f"in {result['eval_seconds']:.1f}s")
    return "\n".join(lines)


def relevance_line(relevance: dict[str, Any]) -> str:
    """One printed line: recall / kept / lift per trimmed image layer, then the last layer's lift and the mean."""
    def number(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    layers = "; ".join(f"{r['stream']} {r['layer']}: recall {number(r['recall'], '.3f')} kept "
                       f"{number(r['kept'], '.3f')} lift {number(r['lift'], '.2f')}" for r in relevance["layers"])
    last, mean = relevance["last"], relevance["mean"]
    return (f"relevance (relevant patches kept; lift 1.0 = chance): {layers}; lift at the last layer "
            f"{number(last['lift'], '.2f')}, mean {number(mean['lift'], '.2f')}")
