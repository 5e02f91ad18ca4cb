"""`trim calibrate CHECKPOINT --data ROOT`: fit the budget a trained model keeps, and its budget knob.

    trim calibrate CHECKPOINT --data SHARDS [--split val] [--samples 512] [--target T] [--batch-size 32]
                   [--device cpu|cuda]

Reads up to ``--samples`` inputs of the split (no labels are used, so the val split's inputs
serve), fits one global logit shift per budget (`trim.prune.calibrate`) and writes the
``calibration`` section into the checkpoint's ``config.json`` (every other key kept, written
atomically). ``--target`` defaults to the training recipe's ``objective.target``. Afterwards
``trim eval CHECKPOINT`` serves the target, and ``trim eval CHECKPOINT --budget 0.5 0.4`` any
budget in the calibrated range. Training calls `calibrate_checkpoint` on its final checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from trim.errors import ConfigError, TrimError
from trim.models.base import MODEL_INPUTS
from trim.prune.calibrate import CALIBRATION_SAMPLES, Calibration, calibrate, held_out_inputs



def recipe_target(recipe: dict[str, Any], ckpt: Path) -> float:
    """The cost target the checkpoint was trained for (``objective.target`` of its config.json)."""
    objective = recipe.get("objective") or {}
    target = objective.get("target")
    if objective.get("method") in (None, "none") or target is None:
        raise ConfigError(f"{ckpt}/config.json records no training target (objective.method="
                          f"{objective.get('method')!r}); pass --target, the mean cost ratio to calibrate for")
    return float(target)


def held_out_batches(ckpt: Path, model: Any, recipe: dict[str, Any], data: str | os.PathLike, *, split: str,
                     samples: int, batch_size: int) -> list[dict[str, Any]]:
    """Up to ``samples`` inputs of ``data``'s ``<task>/<split>``, read as `trim eval` reads them."""
    from trim.eval.split import read_split

    cfg = model.config
    source = read_split(Path(data), cfg.task, split, cfg, recipe, None)
    batches = held_out_inputs(source.loader(cfg, batch_size, 0), MODEL_INPUTS, samples, batch_size)
    if not batches:
        raise ConfigError(f"{data}: {cfg.task}/{split} gave no samples to calibrate {ckpt} on; pick a split with "
                          "samples (--split)")
    return batches


def calibrate_checkpoint(checkpoint: str | os.PathLike, data: str | os.PathLike | None = None, *,
                         batches: Iterable[dict] | None = None, target: float | None = None, split: str = "val",
                         samples: int = CALIBRATION_SAMPLES, batch_size: int = 32,
                         device: str | torch.device | None = None) -> Calibration:
    """Load ``checkpoint``, fit its calibration on held-out inputs and store it in its config.json.

    Inputs: ``batches`` (dicts with pixel_values / input_ids / attention_mask; what the trainer
    passes) or the shard root ``data`` (its ``split``); at most ``samples`` of them either way.
    ``target`` defaults to the recipe's ``objective.target``. Loading from disk makes it
    independent of how training wrapped or sharded the model (DDP, ZeRO-3): call it on the main
    process once the final checkpoint is complete.
    """
    from trim.models import load_model, read_config
    from trim.models.io import resolve_checkpoint, write_calibration

    ckpt = resolve_checkpoint(checkpoint, "CHECKPOINT")
    recipe = read_config(ckpt)
    target = recipe_target(recipe, ckpt) if target is None else float(target)
    if not 0.0 < target <= 1.0:
        raise ConfigError(f"--target {target:g} is not a cost ratio; use a value in (0, 1]")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(ckpt).to(dev).eval()
    if batches is None:
        if data is None:
            raise ConfigError("calibrate_checkpoint needs held-out inputs: pass data=SHARD_ROOT or batches=")
        batches = held_out_batches(ckpt, model, recipe, data, split=split, samples=samples, batch_size=batch_size)
        source = {"data": str(Path(data).resolve()), "split": split}
    else:
        batches = held_out_inputs(batches, MODEL_INPUTS, samples, batch_size)
        source = {"data": "batches passed by the caller"}
    cal = calibrate(model, batches, target, source=source)
    write_calibration(ckpt, cal)
    return cal


def describe(cal: Calibration) -> str:
    lo, hi = cal.budget_range
    lines = [f"calibrated for target {cal.target:g}: logit shift {cal.shift:+.4f}, mean cost {cal.mean_cost:.4f} "
             f"per sample on {cal.samples} samples", f"budgets served: {lo:g}..{hi:g}",
             "budget  shift"]
    lines += [f"{b:6.3f}  {s:+.4f}" for b, s in cal.table]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trim calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="model directory, or a run folder whose 'latest' names one")
    p.add_argument("--data", required=True, help="shard root (manifest.json, tokenizer.json, <task>/<split>-*.tar)")
    p.add_argument("--split", default="val", help="split whose inputs the fit reads (default val; labels unused)")
    p.add_argument("--samples", type=int, default=CALIBRATION_SAMPLES, help=f"inputs to fit on (default {CALIBRATION_SAMPLES})")
    p.add_argument("--target", type=float, help="mean cost ratio the model serves by default "
                                                "(default: the recipe's objective.target)")
    p.add_argument("--batch-size", type=int, default=32, help="default 32")
    p.add_argument("--device", help="cpu, cuda (default: cuda if available)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.samples < 1 or args.batch_size < 1:
        print(f"trim calibrate: --samples {args.samples} and --batch-size {args.batch_size} must be >= 1",
              file=sys.stderr)
        return 2
    try:
        cal = calibrate_checkpoint(args.checkpoint, args.data, target=args.target, split=args.split,
                                   samples=args.samples, batch_size=args.batch_size, device=args.device)
    except TrimError as exn:
        print(f"trim calibrate: {type(exn).__name__}: {exn}", file=sys.stderr)
        return 1
    print(describe(cal))
    return 0


if __name__ == "__main__":
    sys.exit(main())
