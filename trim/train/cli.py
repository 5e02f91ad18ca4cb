"""``trim train RECIPE.yaml [key.sub=value ...]``: check a recipe, then train it.

    trim train recipes/shapes_vqa_dual_tiny_full.yaml
    trim train recipes/shapes_vqa_dual_tiny_smarttrim.yaml objective.target=0.33 name=st_033
    trim train RECIPE.yaml train.resume=latest             # continue after a crash / preemption
    trim train RECIPE.yaml --check                          # run every check a real run makes before its first
                                                            # step (data, objective, resume, output dir; no
                                                            # weights loaded), print the resolved recipe

Launchers (see docs/training.md and launch/): torchrun, ``accelerate launch -m trim.train``,
``deepspeed --module trim.train`` (its ``--local_rank`` argument is accepted) and srun.
"""

from __future__ import annotations

import argparse
import sys

from trim.errors import TrimError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trim train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="YAML recipe (recipes/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 objective.target=0.33")
    p.add_argument("--check", action="store_true", help="run every check that needs no weights; print the resolved recipe and exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    from trim.config import load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except TrimError as err:
        print(f"trim train: {type(err).__module__}.{type(err).__name__}: {err}", file=sys.stderr)
        return 2
    from trim.train.trainer import Trainer

    try:
        if args.check:
            return _check(Trainer(recipe))
        summary = Trainer(recipe).run()
    except TrimError as err:
        print(f"trim train: {type(err).__module__}.{type(err).__name__}: {err}", file=sys.stderr)
        return 2
    final = summary.get("final_eval") or {}
    if final and summary.get("is_main"):
        from trim.train.trainer import eval_headline

        print(f"{recipe.name}: step {summary['steps']}, val {eval_headline(final)}, "
              f"cost ratio {final['cost_ratio']:.4f}, wall {summary['wall_time_s']:.1f}s")
    return 0


def _check(trainer) -> int:
    """Everything the run would check before its first step, without loading weights; then the recipe."""
    plan = trainer.check()
    steps = trainer.recipe.train.steps
    print(trainer.recipe.to_yaml(), end="")
    if plan.finished(steps):
        print(f"# {plan.resume_dir} is already at step {plan.resume_step} (train.steps={steps}): nothing to do",
              file=sys.stderr)
    elif plan.resume_dir is not None:
        print(f"# resumes from {plan.resume_dir} at step {plan.resume_step}", file=sys.stderr)
    return 0
