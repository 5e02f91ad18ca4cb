"""SmartTrim end to end on the synthetic shapes VQA task, on this machine.

    python benchmarks/train_shapes.py [--data runs/bench_shapes/data] [--out runs/bench_shapes] [--scale 1.0]

1. writes the synthetic data if ``--data`` has none (10k train / 1k val VQA questions, 64 px);
2. trains the full tiny dual-stream model (recipes/shapes_vqa_dual_tiny_full.yaml);
3. plain fine-tuning from it (method none, trimming off): the step-time baseline;
4. SmartTrim from it at final cost-ratio targets 0.5 and 0.33
   (recipes/shapes_vqa_dual_tiny_smarttrim.yaml, same steps and batch as step 3);
5. prints val accuracy (VQA soft accuracy), val cost ratio (per sample: FLOPs of the trimmed
   model with inference's decisions / FLOPs of the full model, trimmer overhead included), the
   median training step time of each run, SmartTrim's step time relative to plain fine-tuning,
   and each run's wall time (process start to exit, evaluation and checkpoints included);
6. measures the step-time ratio once more in one process, interleaved: the same SmartTrim
   model, the same batches, one plain fine-tuning step (trim off) then one SmartTrim step
   (student + teacher pass, all loss terms), alternating, each with backward and AdamW step.
   On a shared machine this is the robust number: load changes between the runs above shift
   their medians, but hit both sides of an interleaved pair alike.

``--step-ratio-only`` runs step 6 alone, on the SmartTrim recipe's model with random weights
and 1k synthetic questions (no training runs; about a minute).

Every run is a real ``python -m trim.train`` subprocess; ``--scale`` multiplies all step
counts (0.1 for a smoke run). Runs already complete in ``--out`` are not repeated unless
``--fresh`` is given.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sh(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0


def train(name: str, recipe: str, out: Path, data: Path, overrides: list[str], fresh: bool) -> dict:
    run = out / name
    summary_path = run / "summary.json"
    if summary_path.is_file() and not fresh:
        summary = json.loads(summary_path.read_text())
        summary["wall_s"] = summary.get("bench_wall_s", summary["wall_time_s"])
        return summary
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "trim.train", str(ROOT / "recipes" / recipe), f"name={name}",
           f"output_dir={out}", f"data.root={data}", "train.progress=false", *overrides]
    print(f"  {name}: {' '.join(cmd[3:])}", flush=True)
    wall = sh(cmd, out / f"{name}.log")
    summary = json.loads(summary_path.read_text())
    summary["bench_wall_s"] = summary["wall_s"] = wall
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def interleaved_step_times(run: Path, data: Path, *, rounds: int = 30, batch_size: int = 32) -> tuple[float, float]:
    """Median seconds of a plain fine-tuning step and of a SmartTrim step, alternating (see 6.)."""
    from trim.config import load_recipe
    from trim.models import load_model

    step_dir = run / (run / "latest").read_text().strip()
    config = json.loads((step_dir / "config.json").read_text())
    recipe = load_recipe({k: v for k, v in config.items() if k != "model_source"}, [f"data.root={data}"])
    return time_steps(load_model(step_dir).train(), recipe, data, rounds=rounds, batch_size=batch_size)


def fresh_step_times(data: Path, *, rounds: int = 30, batch_size: int = 32) -> tuple[float, float]:
    """`interleaved_step_times` on the SmartTrim recipe's model with random weights (no training
    run needed): the masked training layout computes every token whatever the decisions, so the
    step time does not depend on what the weights have learnt."""
    import torch
    import yaml

    from trim.config import load_recipe
    from trim.models import create_model

    full = yaml.safe_load((ROOT / "recipes/shapes_vqa_dual_tiny_full.yaml").read_text())["model"]
    raw = yaml.safe_load((ROOT / "recipes/shapes_vqa_dual_tiny_smarttrim.yaml").read_text())
    raw["model"] = {**full, "trim": raw["model"]["trim"]}
    recipe = load_recipe(raw, [f"data.root={data}"])
    torch.manual_seed(0)
    return time_steps(create_model(recipe.model.config).train(), recipe, data, rounds=rounds, batch_size=batch_size)


def time_steps(model, recipe, data: Path, *, rounds: int, batch_size: int) -> tuple[float, float]:
    """Alternate one plain fine-tuning step and one SmartTrim step on the same batches; median of each."""
    from trim.data import build_loader, load_tokenizer, split_urls

    loader = build_loader(split_urls(data, "vqa", "train"), "vqa", tokenizer=load_tokenizer(data), batch_size=batch_size,
                          mode="train", image_size=recipe.data.image_size)
    times = time_step_pairs(model, recipe, [b for b, _ in zip(loader, range(8))], rounds=rounds)
    return times["plain"], times["smarttrim"]


def time_step_pairs(model, recipe, batches: list, *, rounds: int, warmup: int = 5) -> dict[str, float]:
    """Median seconds of a plain fine-tuning step (trim off) and a SmartTrim step (student, teacher
    pass and every loss term of ``recipe.objective``), each with backward and an AdamW step,
    called alternately on the same batches so that machine load hits both alike.

    Keys ``plain`` and ``smarttrim``: the whole step; ``*_compute``: forward and backward only
    (on a CPU at small batches the optimizer's pass over the weights is a large, equal share)."""
    import statistics

    import torch

    from trim.config import load_recipe
    from trim.train.objectives import build_objective

    task = recipe.data.task
    smarttrim = build_objective(recipe.objective, task)
    plain = build_objective(load_recipe(recipe.to_dict(), ["objective.method=none"]).objective, task)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def teacher(batch, prefix):
        with torch.no_grad():
            return model(batch, trim="off", resume=prefix)

    def step(objective, batch) -> tuple[float, float]:
        t0 = time.perf_counter()
        objective(model, batch, 10_000, teacher=teacher).loss.backward()  # past the curriculum: the final target
        t1 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return t1 - t0, time.perf_counter() - t0

    times: dict[str, list[float]] = {}
    for i in range(rounds + warmup):
        batch = batches[i % len(batches)]
        for name, objective in (("plain", plain), ("smarttrim", smarttrim)):
            compute, total = step(objective, batch)
            if i >= warmup:  # the first calls per input shape are slow on CPU
                times.setdefault(name, []).append(total)
                times.setdefault(f"{name}_compute", []).append(compute)
    return {k: statistics.median(v) for k, v in times.items()}


def write_data(data: Path, out: Path, train: int, val: int) -> None:
    if not (data / "manifest.json").is_file():
        print(f"writing synthetic data to {data}", flush=True)
        sh([sys.executable, "-m", "trim.cli", "data", "synth", "--out", str(data), "--train", str(train), "--val",
            str(val), "--test", "0", "--image-size", "64", "--tasks", "vqa", "--quiet"], out / "data.log")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="runs/bench_shapes/data")
    p.add_argument("--out", default="runs/bench_shapes")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every run's steps (0.1: smoke run)")
    p.add_argument("--fresh", action="store_true", help="retrain runs that already finished")
    p.add_argument("--step-ratio-only", action="store_true",
                   help="only step 6, on the SmartTrim recipe's model with random weights (no training runs)")
    p.add_argument("--rounds", type=int, default=30, help="alternating pairs timed in step 6")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in step 6 (default: torch's); 1 is steadier on a machine shared with other jobs")
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    data, out = Path(args.data).resolve(), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    if args.step_ratio_only:
        write_data(data, out, 1000, 0)
        plain_s, st_s = fresh_step_times(data, rounds=args.rounds)
        print(f"interleaved in one process (tiny dual SmartTrim recipe, random weights, same 32-sample batches, "
              f"{args.rounds} alternating pairs): plain fine-tuning step {plain_s:.4f} s, SmartTrim step {st_s:.4f} s "
              f"-> {st_s / plain_s:.2f}x")
        return 0
    write_data(data, out, 10_000, 1000)

    import yaml

    full_recipe = yaml.safe_load((ROOT / "recipes/shapes_vqa_dual_tiny_full.yaml").read_text())
    st_recipe = yaml.safe_load((ROOT / "recipes/shapes_vqa_dual_tiny_smarttrim.yaml").read_text())
    full_steps = max(10, int(full_recipe["train"]["steps"] * args.scale))
    st_steps = max(10, int(st_recipe["train"]["steps"] * args.scale))
    curriculum = max(5, int(st_recipe["objective"]["curriculum"]["steps"] * args.scale))
    every = lambda n: [f"train.save_every={n}", f"train.eval_every={n}"]  # noqa: E731

    print(f"training on {data} -> {out}", flush=True)
    rows = []
    full = train("full", "shapes_vqa_dual_tiny_full.yaml", out, data,
                 [f"train.steps={full_steps}", *every(full_steps)], args.fresh)
    rows.append(("full model (no trimming)", full))
    init = f"model.init_from={out / 'full'}"
    plain = train("plain_ft", "shapes_vqa_dual_tiny_smarttrim.yaml", out, data,
                  [init, "objective.method=none", "model.trim={}", f"train.steps={st_steps}", *every(st_steps)],
                  args.fresh)
    rows.append(("plain fine-tuning from it", plain))
    for target in (0.5, 0.33):
        name = f"smarttrim_{str(target).replace('.', '')}"
        run = train(name, "shapes_vqa_dual_tiny_smarttrim.yaml", out, data,
                    [init, f"objective.target={target}", f"train.steps={st_steps}",
                     f"objective.curriculum.steps={curriculum}", *every(st_steps)], args.fresh)
        rows.append((f"SmartTrim, target {target}", run))

    base = plain["step_time_median_s"]
    print()
    print(f"Synthetic shapes VQA (10k train / 1k val questions, 64 px), tiny dual-stream model; "
          f"{full_steps} full-model steps, {st_steps} steps per fine-tuning run; batch 32; this machine.")
    header = f"| {'run':<28} | steps | val acc | val cost ratio | step time (s) | vs plain FT | wall (s) |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for label, s in rows:
        ev = s.get("final_eval") or {}
        ratio = s["step_time_median_s"] / base if base else float("nan")
        print(f"| {label:<28} | {s['steps']:>5} | {ev.get('accuracy', float('nan')):>7.4f} | "
              f"{ev.get('cost_ratio', float('nan')):>14.4f} | {s['step_time_median_s']:>13.4f} | {ratio:>10.2f}x | "
              f"{s['wall_s']:>8.1f} |")
    plain_s, st_s = interleaved_step_times(out / "smarttrim_05", data, rounds=args.rounds)
    print(f"\ninterleaved in one process (SmartTrim 0.5 model, same 32-sample batches, {args.rounds} alternating pairs): "
          f"plain fine-tuning step {plain_s:.4f} s, SmartTrim step {st_s:.4f} s -> {st_s / plain_s:.2f}x")
    print(f"total wall time of this script: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
