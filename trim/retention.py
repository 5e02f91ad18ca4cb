"""`trim bench retention`: does a pruning method keep accuracy, at what cost and speed, and does
it keep what the question needs? Every method trained and evaluated the same way, one table.

    trim bench retention [--task vqa|nlvr2] [--targets 0.5 0.33] [--methods smarttrim random ...]
                         [--seed 0] [--image-size 64] [--min-objects 1 --max-objects 3 --size-scale 1.5]
                         [--out runs/retention]

1. write the synthetic world's shards (once; the world's knobs and seed are flags),
2. pretrain the vision tower on the world's patches (`trim pretrain-vision`), train the tiny
   dual-stream model in full from it (NLVR2: the VQA model first, then NLVR2 from it, as METER
   fine-tunes NLVR2 from a vision-language model; from the tower alone the tiny NLVR2 model
   stays at chance), evaluate it, and evaluate it **blind** (every image replaced by a
   constant): the gap between the two is how much the task needs the image,
3. for every method x target: start from the full model, train with the same recipe, budget
   curriculum, distillation and steps (`objective.method` is the only difference; on CPU the
   runs train side by side, one per core: `trim.side_by_side`), then evaluate each in turn,
4. print one table (method, target, per-sample cost, cost as a batch of 32 ran, accuracy, change vs full, relevance recall and
   lift at the last trimmed layer, measured speedup at batch 1 and 32) and write report.md and
   the Pareto figure with every method.

Each step goes through the command a user would type (printed as it runs). Re-runs reuse
what is finished: training resumes from its latest checkpoint (a finished run is left as it
is) and an evaluation newer than its checkpoint is kept.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trim.data.synthetic import World
from trim.side_by_side import Job, default_jobs, threads_per_job, train_side_by_side

METHODS = ("smarttrim", "random", "evit", "text_agnostic", "static_heads", "fixed_ratio")
TARGETS = (0.5, 0.33)


# The world the comparison runs on: few, large objects, so the full model learns to look.
SCENES = World(min_objects=1, max_objects=3, size_scale=1.5)


TRAIN_VAL_SAMPLES = 1_000  # periodic validation and calibration inside `trim train`
# Training scenes per task when --train-samples is not given. NLVR2 needs more: on 20,000 pairs the
# full model fitted them (train loss 0.33) and stopped at 80% on val; on 60,000 it passes 90%.
TRAIN_SAMPLES = {"vqa": 20_000, "nlvr2": 60_000}


@dataclass
class SynthData:
    """The synthetic data the comparison runs on (`trim data synth` flags)."""

    seed: int = 0
    image_size: int = 64
    scenes: World = SCENES
    train_samples: int = TRAIN_SAMPLES["vqa"]
    # The evaluation split: at 5,000 an accuracy near 85% is known to +-1 point (95%), at 1,000 only to +-2,
    # too coarse to tell methods apart that differ by a point. Training validates on its first TRAIN_VAL_SAMPLES.
    val_samples: int = 5_000

    def synth_argv(self, out: Path, task: str) -> list[str]:
        # seg shards too: their masks and attributes pretrain the vision tower; NLVR2 starts from a VQA model
        w = self.scenes
        tasks = "vqa,nlvr2,seg" if task == "nlvr2" else f"{task},seg"
        return ["data", "synth", "--out", str(out), "--train", str(self.train_samples), "--val",
                str(self.val_samples), "--test", "0", "--tasks", tasks, "--image-size", str(self.image_size),
                "--seed", str(self.seed), "--min-objects", str(w.min_objects), "--max-objects",
                str(w.max_objects), "--size-scale", str(w.size_scale)]  # fmt: skip


@dataclass
class Plan:
    """What to train and evaluate."""

    task: str = "vqa"
    runs: Sequence[tuple[str, float]] = (("smarttrim", 0.5), ("smarttrim", 0.33))  # (method, target)
    pretrain_steps: int = 800  # trim pretrain-vision
    full_steps: int | None = None  # None: the recipe's
    trim_steps: int | None = None
    eval_batch_size: int = 32
    jobs: int | None = None  # pruned runs trained at once (None: one per CPU core; 1 on a GPU)
    extra: list[str] = field(default_factory=list)  # more recipe overrides for every run


def run_name(task: str, method: str, target: float | None = None) -> str:
    base = f"shapes_{task}_dual_tiny"
    return f"{base}_full" if target is None else f"{base}_{method}_{str(target).replace('.', '')}"


def run_trim(argv: list[str], trim_main: Callable[[list[str]], int] | None = None) -> None:
    """Run one `trim` command as a user would, printing it first; stop on failure."""
    if trim_main is None:
        from trim.cli import main as trim_main
    print(f"\n$ trim {shlex.join(argv)}", flush=True)
    code = trim_main(argv)
    if code:
        raise SystemExit(f"`trim {shlex.join(argv)}` failed with exit code {code}")


def _latest_checkpoint(run: Path) -> Path | None:
    from trim.errors import CheckpointError
    from trim.models.io import resolve_checkpoint

    try:
        return resolve_checkpoint(run)
    except CheckpointError:  # no finished checkpoint yet: the evaluation must run
        return None


def _is_fresh(result: Path, run: Path) -> bool:
    """An eval JSON newer than the checkpoint it evaluated: reuse it."""
    ckpt = _latest_checkpoint(run)
    return ckpt is not None and result.is_file() and result.stat().st_mtime > (ckpt / "config.json").stat().st_mtime


def evaluate(run: Path, task: str, data: Path, *, batch_size: int, extra: Sequence[str] = (),
             stem: str | None = None, out: Path | None = None) -> Path:  # fmt: skip
    """`trim eval` of a run's latest checkpoint into OUT/eval/ (default: RUN/eval/), unless a fresh
    result is there."""
    out = out or run
    result = out / "eval" / f"{stem or task}.json"
    if not _is_fresh(result, run):
        run_trim(["eval", str(run), "--task", task, "--data", str(data), "--out", str(out), "--batch-size",
                  str(batch_size), "--quiet", *extra])  # fmt: skip
    return result


def train_argv(recipe: str, out: Path, data: Path, name: str, overrides: Sequence[str]) -> list[str]:
    """`trim train` of ``recipe`` into OUT/NAME, resuming whatever an earlier call left there."""
    common = [f"data.root={data}", f"output_dir={out}", f"name={name}", "train.resume=latest"]
    return ["train", recipe, *common, *overrides]


def _train_steps(argv: Sequence[str]) -> int:
    """train.steps of a `trim train RECIPE KEY=VALUE...` command (for its progress bar)."""
    from trim.config import apply_override, read_yaml

    raw = read_yaml(argv[1])
    for item in argv[2:]:
        apply_override(raw, item)
    return int(raw["train"]["steps"])


def train(recipe: str, out: Path, data: Path, name: str, overrides: Sequence[str]) -> Path:
    run_trim(train_argv(recipe, out, data, name, overrides))
    return out / name


def run_plan(plan: Plan, world: SynthData, out: Path) -> dict[str, Any]:
    """Train and evaluate everything ``plan`` names; returns {"full", "blind", "trimmed": [...]} eval paths."""
    task, data = plan.task, out / "data"
    if not (data / "manifest.json").is_file():
        run_trim(world.synth_argv(data, task))
    seed = [f"train.seed={world.seed}", f"data.val_samples={min(world.val_samples, TRAIN_VAL_SAMPLES)}", *plan.extra]
    full_steps = [f"train.steps={plan.full_steps}"] if plan.full_steps else []
    vqa_recipe = "recipes/shapes_vqa_dual_tiny_full.yaml"
    vision = out / "vision_pretrained"
    if not (vision / "model.safetensors").is_file():
        run_trim(["pretrain-vision", vqa_recipe, "--data", str(data), "--out", str(vision), "--steps",
                  str(plan.pretrain_steps), "--seed", str(world.seed), *plan.extra])  # fmt: skip
    if task == "vqa":
        full = train(vqa_recipe, out, data, run_name(task, "full"), seed + full_steps + [f"model.init_from={vision}"])
    else:  # NLVR2 fine-tunes the VQA model (its head is left behind)
        vqa = train(vqa_recipe, out, data, run_name("vqa", "full"), seed + [f"model.init_from={vision}"])
        full = train(f"recipes/shapes_{task}_dual_tiny_full.yaml", out, data, run_name(task, "full"),
                     seed + full_steps + [f"model.init_from={vqa}"])  # fmt: skip
    paths: dict[str, Any] = {
        "full": evaluate(full, task, data, batch_size=plan.eval_batch_size),
        "blind": evaluate(full, task, data, batch_size=plan.eval_batch_size, extra=["--blind"], stem=f"{task}_blind"),
        "trimmed": [],
    }
    steps = [f"train.steps={plan.trim_steps}", f"objective.curriculum.steps={plan.trim_steps // 2}"] \
        if plan.trim_steps else []  # fmt: skip
    recipe = f"recipes/shapes_{task}_dual_tiny_smarttrim.yaml"
    trims = {run_name(task, method, target): train_argv(
        recipe, out, data, run_name(task, method, target),
        seed + steps + [f"model.init_from={full}", f"objective.method={method}", f"objective.target={target}"])
        for method, target in plan.runs}  # fmt: skip
    jobs = plan.jobs or default_jobs(len(trims))
    if jobs > 1:  # train side by side, then evaluate one at a time: timing needs the whole machine
        train_side_by_side([Job(argv, out / name, _train_steps(argv)) for name, argv in trims.items()],
                           at_once=jobs, threads=threads_per_job(jobs))  # fmt: skip
    for name, argv in trims.items():
        if jobs == 1:
            run_trim(argv)
        paths["trimmed"].append(evaluate(out / name, task, data, batch_size=plan.eval_batch_size))
    return paths


def table_rows(full: dict[str, Any], blind: dict[str, Any], trimmed: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per evaluation, full and blind first; accuracy change measured against the full model."""
    from trim.eval.result import own_cost

    def row(result: dict[str, Any], method: str, target: float | None) -> dict[str, Any]:
        speed = result.get("speed") or {}
        last = (result.get("relevance") or {}).get("last") or {}
        return {
            "method": method,
            "target": target,
            "cost": own_cost(result)["mean"],  # what each sample kept
            "cost_ran": (speed.get("throughput") or {}).get("cost_ratio"),  # what the timed batch ran
            "accuracy": result["accuracy"],
            "ci95": result.get("accuracy_ci95"),
            "change": None if method == "full" else result["accuracy"] - full["accuracy"],
            "recall": last.get("recall"),
            "lift": last.get("lift"),
            "speedup_b1": (speed.get("latency") or {}).get("speedup"),
            "speedup_batch": (speed.get("throughput") or {}).get("speedup"),
            "batch": (speed.get("throughput") or {}).get("batch_size"),
        }

    rows = [row(full, "full", None), row(blind, "blind (no image)", None)]
    rows += [row(r, (r.get("run") or {}).get("method", "?"), (r.get("run") or {}).get("target")) for r in trimmed]
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    def f(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    batch = next((r["batch"] for r in rows if r["batch"]), 32)
    head = (f"{'method':<17} {'target':>6} {'cost':>6} {f'ran@{batch}':>7} {'accuracy':>8} {'+-95%':>5} {'vs full':>7} "
            f"{'rel.recall':>10} {'lift':>5} {'speedup@1':>9} {f'speedup@{batch}':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<17} {f(r['target'], 'g'):>6} {r['cost']:>6.3f} {f(r.get('cost_ran'), '.3f'):>7} "
                     f"{r['accuracy']:>8.2f} {f(r.get('ci95'), '.2f'):>5} "
                     f"{f(r['change'], '+.2f'):>7} {f(r['recall'], '.3f'):>10} {f(r['lift'], '.2f'):>5} "
                     f"{f(r['speedup_b1'], '.2f'):>9} {f(r['speedup_batch'], '.2f'):>10}")
    return "\n".join(lines)


def print_table(paths: dict[str, Any]) -> str:
    from trim.eval.report import load_eval

    rows = table_rows(load_eval(paths["full"]), load_eval(paths["blind"]), [load_eval(p) for p in paths["trimmed"]])
    text = format_table(rows)
    print("\n" + text, flush=True)
    return text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trim bench retention", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("vqa", "nlvr2"), default="vqa")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--targets", nargs="+", type=float, default=list(TARGETS))
    p.add_argument("--out", default="runs/retention")
    w, scenes = SynthData(), SCENES
    p.add_argument("--seed", type=int, default=w.seed, help="data and training seed")
    p.add_argument("--image-size", type=int, default=w.image_size)
    p.add_argument("--min-objects", type=int, default=scenes.min_objects)
    p.add_argument("--max-objects", type=int, default=scenes.max_objects)
    p.add_argument("--size-scale", type=float, default=scenes.size_scale)
    p.add_argument("--train-samples", type=int,
                   help=f"training scenes of every task (default: {', '.join(f'{k} {v}' for k, v in TRAIN_SAMPLES.items())})")
    p.add_argument("--val-samples", type=int, default=w.val_samples)
    p.add_argument("--pretrain-steps", type=int, default=Plan.pretrain_steps, help="trim pretrain-vision steps")
    p.add_argument("--full-steps", type=int, help="training steps of the full model (default: the recipe's)")
    p.add_argument("--trim-steps", type=int, help="training steps of each pruned model (default: the recipe's)")
    p.add_argument("--jobs", type=int, help="pruned runs trained at once (default: one per CPU core at one thread "
                                            "each; 1 on a GPU); evaluations and their timing run one at a time")
    p.add_argument("overrides", nargs="*", help="more recipe overrides for every run (key=value)")
    return p


def world_of(a: argparse.Namespace) -> SynthData:
    """The world the flags ask for; impossible settings stop here, before any data is written."""
    try:
        scenes = World(a.min_objects, a.max_objects, a.size_scale)
    except ValueError as exn:
        raise SystemExit(f"trim bench retention: --min-objects/--max-objects/--size-scale: {exn}") from None
    return SynthData(a.seed, a.image_size, scenes, a.train_samples or TRAIN_SAMPLES[a.task], a.val_samples)


def main(argv: list[str]) -> int:
    a = _parser().parse_args(argv)
    start, out = time.time(), Path(a.out)
    world = world_of(a)
    extra = [f"model.vision.image_size={a.image_size}", f"data.image_size={a.image_size}", *a.overrides]
    runs = [(method, target) for target in a.targets for method in a.methods]
    plan = Plan(a.task, runs, a.pretrain_steps, a.full_steps, a.trim_steps, jobs=a.jobs, extra=extra)
    paths = run_plan(plan, world, out)
    text = print_table(paths)
    from trim.eval.report import write_report

    write_report([paths["full"], *paths["trimmed"]], out, title=f"trim retention: {a.task}")
    (out / "retention.txt").write_text(text + "\n")
    (out / "retention.json").write_text(json.dumps({"world": {**vars(world), "scenes": vars(world.scenes)}, "paths": {
        "full": str(paths["full"]), "blind": str(paths["blind"]), "trimmed": [str(p) for p in paths["trimmed"]]}},
        indent=1) + "\n")  # fmt: skip
    print(f"\nretention done in {time.time() - start:.0f}s; table in {out}/retention.txt, Pareto plot and report.md in {out}/")
    return 0
