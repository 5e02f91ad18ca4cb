"""`trim demo` (what `make demo` runs): the whole pipeline on the embedded synthetic world.

1. write synthetic shapes VQA shards (no download),
2. train the tiny dual-stream model in full,
3. SmartTrim it from that checkpoint at final cost targets 0.5 and 0.33,
4. evaluate each checkpoint (official VQA accuracy, cost ratio, measured speed, figures),
   and the 0.5 model once more at several budgets (one trained model, the budget knob),
5. draw the accuracy-vs-speedup Pareto plot across them.

Everything goes to ``runs/demo/`` (``--out``). Each step runs through the same command a
user would type, so the demo doubles as a tour: the commands are printed as they run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

from trim.cli import main as trim_main

TARGETS = (0.5, 0.33)
BUDGETS = (0.6, 0.5, 0.4, 0.33)  # served by the 0.5 model's calibration


def run(argv: list[str]) -> None:
    print(f"\n$ trim {shlex.join(argv)}", flush=True)
    code = trim_main(argv)
    if code:
        raise SystemExit(f"trim demo: `trim {shlex.join(argv)}` failed with exit code {code}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="trim demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--train-samples", type=int, default=10000)
    p.add_argument("--val-samples", type=int, default=1000)
    p.add_argument("--full-steps", type=int, default=1200)
    p.add_argument("--trim-steps", type=int, default=600)
    a = p.parse_args(argv)
    out, start = Path(a.out), time.time()
    data = out / "data"
    if not (data / "manifest.json").is_file():
        run(["data", "synth", "--out", str(data), "--train", str(a.train_samples), "--val", str(a.val_samples),
             "--test", "200", "--tasks", "vqa", "--image-size", "64", "--seed", "0"])
    # resume=latest: a re-run (or one after a crash) continues where it stopped instead of refusing
    common = [f"data.root={data}", f"output_dir={out}", f"data.val_samples={a.val_samples}", "train.resume=latest"]
    full = "shapes_vqa_dual_tiny_full"
    run(["train", "recipes/shapes_vqa_dual_tiny_full.yaml", *common, f"train.steps={a.full_steps}"])
    runs = [full]
    for target in TARGETS:
        name = f"shapes_vqa_dual_tiny_smarttrim_{str(target).replace('.', '')}"
        run(["train", "recipes/shapes_vqa_dual_tiny_smarttrim.yaml", *common, f"name={name}",
             f"model.init_from={out / full}", f"objective.target={target}", f"train.steps={a.trim_steps}",
             # reach the final target halfway, then train at it
             f"objective.curriculum.steps={a.trim_steps // 2}"])
        runs.append(name)
    results = []
    for name in runs:
        run(["eval", str(out / name), "--task", "vqa", "--data", str(data), "--out", str(out / name)])
        results.append(out / name / "eval" / "vqa.json")
    knob = runs[1]
    run(["eval", str(out / knob), "--task", "vqa", "--data", str(data), "--out", str(out / knob), "--budget",
         *map(str, BUDGETS)])
    budget_results = [out / knob / "eval" / f"vqa_budget{b:g}.json" for b in BUDGETS]
    run(["eval", "report", *map(str, results + budget_results), "--out", str(out)])
    print(f"\n{'run':<40} {'budget':>6} {'VQA acc':>8} {'cost ratio':>10} {'speedup':>8} {'@ batch 1':>9}")
    labels = [(name, "-") for name in runs] + [(knob, f"{b:g}") for b in BUDGETS]
    for (name, budget), path in zip(labels, results + budget_results):
        r = json.loads(path.read_text())
        latency = r["speed"]["latency"]["speedup"]
        print(f"{name:<40} {budget:>6} {r['accuracy']:>8.2f} {r['cost_ratio']['mean']:>10.3f} {r['speedup']:>8.2f} "
              f"{latency:>9.2f}")
    print(f"\ndemo done in {time.time() - start:.0f}s; figures and reports in {out}/ "
          f"(pareto plot, per-run eval/ folders with cost histograms and kept-token overlays)")
    return 0
