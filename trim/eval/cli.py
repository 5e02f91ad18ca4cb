"""`trim eval`: evaluate a checkpoint, or compare several evaluations.

    trim eval CHECKPOINT --task vqa|nlvr2|seg --data SHARDS [--split val] [--batch-size 32] [--workers 0]
              [--out DIR] [--max-samples N] [--device cpu|cuda] [--warmup 2] [--repeats 5] [--figures 4]
              [--budget 0.6 0.5 0.4 0.33]   # a calibrated checkpoint, once per budget (trim calibrate)
              [--vqa-metric lavis|vqa-tools] [--blind]
              [--clicks 5] [--size-buckets relative|coco]   # seg: box / 1-click / N-click mIoU
    torchrun --nproc_per_node 8 -m trim.cli eval CHECKPOINT --task vqa --data SHARDS   # several processes
    trim eval report EVAL_JSON... --out DIR [--speed throughput|latency]
    trim eval score --task vqa --results R.json --questions Q.json --annotations A.json [--vqa-metric ...]
    trim eval score --task nlvr2 --predictions P.csv --labels dev.json

See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trim.errors import TrimError
from trim.eval.metrics.vqa import DEFAULT_VQA_METRIC, VQA_METRICS
from trim.eval.score_files import VQA_METRIC_HELP


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trim eval", description=__doc__.split("\n\n")[0],
                                epilog="`trim eval report --help` compares several evaluations; `trim eval score "
                                       "--help` scores a results file in the official format.")
    p.add_argument("checkpoint", help="model directory (config.json + model.safetensors), or a run folder "
                                      "whose 'latest' names one")
    p.add_argument("--task", required=True, choices=("vqa", "nlvr2", "seg"),
                   help="vqa / nlvr2: a VL checkpoint; seg: a sam-family checkpoint (box, 1-click and N-click mIoU)")
    p.add_argument("--data", required=True, help="shard root (manifest.json, tokenizer.json, <task>/<split>-*.tar)")
    p.add_argument("--split", default="val", help="split of the manifest to evaluate (default val)")
    p.add_argument("--batch-size", type=int, default=32, help="per process (default 32)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per process (default 0)")
    p.add_argument("--out", help="results go to OUT/eval/ (default: CHECKPOINT/eval/)")
    p.add_argument("--max-samples", type=int, help="evaluate only about this many samples (a quick look: "
                                                   "not the whole split, so no manifest check)")
    p.add_argument("--device", help="cpu, cuda (default: cuda if available; under torchrun cuda:LOCAL_RANK)")
    p.add_argument("--answers", help="VQA answer vocabulary (default: DATA/vqa/answers.json)")
    p.add_argument("--warmup", type=int, default=2, help="speed: warm-up calls per side (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="speed: timed calls per side; the median is kept (default 5)")
    p.add_argument("--no-speed", action="store_true", help="skip the wall-clock measurement")
    p.add_argument("--figures", type=int, default=4, help="kept-token overlays of the first N samples (default 4)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--budget", type=float, nargs="+", metavar="B",
                   help="evaluate once per budget (mean cost ratio), served by the checkpoint's calibration "
                        "(`trim calibrate`); each writes eval/<task>_budget<B>.json. Default: the calibrated "
                        "target, or the trained decisions of an uncalibrated model")
    p.add_argument("--vqa-metric", choices=VQA_METRICS, default=DEFAULT_VQA_METRIC, help=VQA_METRIC_HELP)
    p.add_argument("--blind", action="store_true",
                   help="blind baseline: every image replaced by a constant (zeros after normalisation, the "
                        "normalisation's mean colour); writes eval/<task>_blind.json, no speed measurement")
    p.add_argument("--clicks", type=int, default=5, help="seg: clicks of the N-click protocol (default 5)")
    p.add_argument("--size-buckets", choices=("relative", "coco"), default="relative",
                   help="seg: object size buckets by COCO's thresholds on the area as a fraction of the image "
                        "(relative, default) or in original pixels (coco); docs/evaluation.md")
    return p


def _report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trim eval report",
                                description="Accuracy vs measured speedup across eval JSONs: Pareto plot + table.")
    p.add_argument("evals", nargs="+", help="eval JSON files written by `trim eval` (CKPT/eval/<task>.json)")
    p.add_argument("--out", required=True, help="folder for report.md, report.json and pareto_<task>.png")
    p.add_argument("--speed", choices=("throughput", "latency"), default="throughput",
                   help="which measured speedup is the x axis (default throughput)")
    p.add_argument("--title", help="title of the report")
    return p


def _is_subcommand(argv: list[str], name: str) -> bool:
    # A checkpoint folder that happens to be called "report" / "score" still evaluates.
    return bool(argv) and argv[0] == name and not (Path(name) / "config.json").is_file()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if _is_subcommand(argv, "score"):
        from trim.eval.score_files import run_score

        return run_score(argv[1:])
    if _is_subcommand(argv, "report"):
        args = _report_parser().parse_args(argv[1:])
        from trim.eval.report import write_report

        try:
            report = write_report(args.evals, args.out, speed=args.speed, title=args.title)
        except TrimError as exn:
            print(f"trim eval report: {type(exn).__name__}: {exn}", file=sys.stderr)
            return 1
        print(report["markdown"])
        print(f"wrote {report['path']} and {', '.join(report['figures'])}")
        return 0

    args = _eval_parser().parse_args(argv)
    from trim.eval.evaluate import evaluate_budgets, summary

    try:
        results = evaluate_budgets(args.checkpoint, args.task, args.data, args.budget or [None], split=args.split,
                                   batch_size=args.batch_size, workers=args.workers, out=args.out,
                                   max_samples=args.max_samples, device=args.device, warmup=args.warmup,
                                   repeats=args.repeats, figures=args.figures, answers=args.answers,
                                   speed=not args.no_speed, progress=not args.quiet, vqa_metric=args.vqa_metric,
                                   blind=args.blind, n_clicks=args.clicks, size_buckets=args.size_buckets)
    except TrimError as exn:
        print(f"trim eval: {type(exn).__name__}: {exn}", file=sys.stderr)
        return 1
    from trim.eval.seg import seg_summary

    for result in results or []:  # rank 0
        print(seg_summary(result) if result["task"] == "seg" else summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
