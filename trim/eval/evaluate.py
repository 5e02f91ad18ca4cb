"""`trim eval CHECKPOINT`: one exact pass over a split, metrics, cost, measured speed, figures.

The pass
    The checkpoint directory is the only model input (``load_model``); the data is a shard
    root (``manifest.json``, ``tokenizer.json``, ``vqa/answers.json``). ``build_loader`` in
    ``mode="eval"`` reads every shard of the split once, split disjointly over ranks and
    workers, and the model runs with ``trim="eval"``: kept tokens gathered, kept heads sliced,
    so the cost ratio is what the physical forward paid, padding to the batch maximum included.

Several processes (``torchrun``)
    With ``WORLD_SIZE > 1`` the process group is initialised from the environment (nccl on
    GPUs, gloo on CPU). Each rank evaluates its shards and the per-sample results are
    gathered with ``all_gather_object``; rank 0 drops duplicate ids (counted in the JSON)
    and, for a whole split, checks the number of distinct ids against the manifest, so a
    lost shard or a corrupt sample is an error rather than a silently smaller test set.
    Results are sorted by id, so 1 and N processes give the same predictions and metrics.
    The cost ratio can differ slightly: padding depends on which samples share a batch.

Speed (design invariant 5, "saved = measured")
    On rank 0, after the pass: the same weights run trim="off" and trim="eval" alternately
    (``time_interleaved``) on one fixed batch from the set (the first batch rank 0 read),
    after warm-up, median of repeats; once at the eval batch size (throughput, samples/s)
    and once on its first sample (latency, ms per batch of 1).

Relevance recall
    When the shards carry relevance masks (the synthetic world), the loader puts them on the
    model's patch grid and the pass records, per token-trimmed image layer, how many relevant
    patches each sample kept (``relevance``: recall, kept fraction, lift).

Blind (``blind=True``, ``--blind``)
    Every image is replaced by a constant (``trim.eval.blind``) and the results go to
    ``<stem>_blind.json``: the accuracy the text alone gives. No speed measurement, overlays or
    relevance: the timing and the kept patches of a constant image mean nothing.

This module only orchestrates (check, set up, pass, merge, score, time, write); each step
lives in its own module: ``group`` (process group, gather), ``split`` (the data read),
``collect`` (per-sample results, merge across ranks), ``relevance`` (relevance recall), ``blind``
(the constant image), ``scores`` (official metrics),
``stats`` (cost and kept tokens), ``speed`` (timing), ``plots`` (figures), ``output``
(files), ``result`` (the JSON record, the printed summary).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trim.errors import ConfigError
from trim.eval.blind import blind_batch
from trim.eval.collect import Collector, merge, trimmed_layers
from trim.models.base import MODEL_INPUTS
from trim.eval.errors import EvalError
from trim.eval.group import ProcessGroup, open_group
from trim.eval.metrics.vqa import DEFAULT_VQA_METRIC, VQA_METRICS
from trim.eval.output import check_writable, output_stem, write_json, write_predictions
from trim.eval.plots import write_eval_figures
from trim.eval.result import build_result, run_name, summary
from trim.eval.scores import Scores, score
from trim.eval.speed import measure_speed
from trim.eval.split import EvalSplit, read_split
from trim.models import load_model, read_config
from trim.models.io import resolve_checkpoint
from trim.prune.keep_ratio import model_keep_ratio
from trim.ranks import rank_and_world, rank_slice, slice_batch

__all__ = ["TASKS", "EvalError", "evaluate", "evaluate_budgets", "summary"]

TASKS = ("vqa", "nlvr2", "seg")


@dataclass(frozen=True)
class EvalOptions:
    task: str
    split: str
    batch_size: int
    workers: int
    max_samples: int | None
    warmup: int
    repeats: int
    figures: int
    answers: str | os.PathLike | None
    speed: bool
    progress: bool
    budget: float | None = None  # served through the checkpoint's calibration (None: its default)
    vqa_metric: str = DEFAULT_VQA_METRIC  # which official VQA tool the accuracy reproduces
    blind: bool = False  # every image replaced by a constant (trim.eval.blind)

    def check(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"--task {self.task!r}; choose one of {TASKS}")
        if self.batch_size < 1 or self.workers < 0 or (self.max_samples is not None and self.max_samples < 1):
            raise ConfigError(f"--batch-size {self.batch_size}, --workers {self.workers}, --max-samples "
                              f"{self.max_samples}: batch size and max samples must be >= 1, workers >= 0")
        if self.warmup < 0 or self.repeats < 1:
            raise ConfigError(f"--warmup {self.warmup} must be >= 0 and --repeats {self.repeats} >= 1")
        if self.vqa_metric not in VQA_METRICS:
            raise ConfigError(f"--vqa-metric {self.vqa_metric!r}; choose one of {VQA_METRICS} (docs/metrics.md)")
        if self.budget is not None and not 0.0 < self.budget <= 1.0:
            raise ConfigError(f"--budget {self.budget:g} is not a cost ratio; use values in (0, 1]")


@dataclass
class _Run:
    """What every step of one evaluation reads."""

    opts: EvalOptions
    ckpt: Path
    out_dir: Path
    group: ProcessGroup
    model: Any
    recipe: dict[str, Any]
    split: EvalSplit
    started: float

    def log(self, msg: str) -> None:
        if self.group.rank == 0:
            print(msg, file=sys.stderr, flush=True)


def evaluate(
    checkpoint: str | os.PathLike,
    task: str,
    data: str | os.PathLike,
    *,
    split: str = "val",
    batch_size: int = 32,
    workers: int = 0,
    out: str | os.PathLike | None = None,
    max_samples: int | None = None,
    device: str | None = None,
    warmup: int = 2,
    repeats: int = 5,
    figures: int = 4,
    answers: str | os.PathLike | None = None,
    speed: bool = True,
    progress: bool = True,
    vqa_metric: str = DEFAULT_VQA_METRIC,
    blind: bool = False,
    n_clicks: int = 5,
    size_buckets: str = "relative",
) -> dict[str, Any] | None:
    """Evaluate a checkpoint on one split; returns the results dict on rank 0 (None elsewhere).

    Writes ``<out or checkpoint>/eval/<stem>.json`` (stem ``<task>`` for val, ``<task>_<split>``
    otherwise, ``_blind`` after it with ``blind``), the predictions export, and the figures beside it.
    ``blind``: every image replaced by a constant (`trim.eval.blind`). See docs/evaluation.md.
    ``task="seg"`` (a sam-family checkpoint) runs `trim.eval.seg.evaluate_seg` with ``n_clicks`` and
    ``size_buckets``; its batch size counts images.
    """
    results = evaluate_budgets(checkpoint, task, data, [None], split=split, batch_size=batch_size, workers=workers,
                               out=out, max_samples=max_samples, device=device, warmup=warmup, repeats=repeats,
                               figures=figures, answers=answers, speed=speed, progress=progress,
                               vqa_metric=vqa_metric, blind=blind, n_clicks=n_clicks, size_buckets=size_buckets)
    return None if results is None else results[0]


_DEFAULTS: dict[str, Any] = {"split": "val", "batch_size": 32, "workers": 0, "max_samples": None, "warmup": 2,
                             "repeats": 5, "figures": 4, "answers": None, "speed": True, "progress": True,
                             "vqa_metric": DEFAULT_VQA_METRIC, "blind": False, "n_clicks": 5,
                             "size_buckets": "relative"}


def evaluate_budgets(checkpoint: str | os.PathLike, task: str, data: str | os.PathLike,
                     budgets: Sequence[float | None], *, out: str | os.PathLike | None = None,
                     device: str | None = None, **options: Any) -> list[dict[str, Any]] | None:
    """`evaluate` once per budget (None: the checkpoint's default) with one model load and data
    check; budget b writes ``eval/<stem>_budget<b>.json``. The list of results on rank 0.

    ``options``: `evaluate`'s keyword arguments. Every budget is checked against the
    checkpoint's calibration before the first pass (an uncalibrated model or a budget out of
    its range is a `CalibrationError` naming the range).
    """
    unknown = sorted(set(options) - set(_DEFAULTS))
    if unknown:
        raise TypeError(f"evaluate_budgets() got unexpected options {unknown}; known: {sorted(_DEFAULTS)}")
    if not budgets:
        raise ConfigError("--budget needs at least one value")
    kw = {**_DEFAULTS, **options}
    if task == "seg":
        return [_evaluate_seg(checkpoint, data, budgets, out=out, device=device, options=kw)]
    base = EvalOptions(task, kw["split"], kw["batch_size"], kw["workers"], kw["max_samples"], kw["warmup"],
                       kw["repeats"], kw["figures"], kw["answers"], kw["speed"], kw["progress"],
                       vqa_metric=kw["vqa_metric"], blind=bool(kw["blind"]))
    runs = [dataclasses.replace(base, budget=None if b is None else float(b)) for b in budgets]
    for opts in runs:
        opts.check()
    started = time.perf_counter()
    ckpt = resolve_checkpoint(checkpoint, "CHECKPOINT")
    out_dir = _results_dir(ckpt, out)
    group = open_group(device)
    try:
        run = _setup(runs[0], ckpt, out_dir, group, Path(data), started)
        for opts in runs:
            run.model.budget_shift(opts.budget)
        results = []
        for i, opts in enumerate(runs):
            run = dataclasses.replace(run, opts=opts, started=started if i == 0 else time.perf_counter())
            if opts.budget is not None:
                run.log(f"budget {opts.budget:g}: logit shift {run.model.budget_shift(opts.budget):+.3f}")
            results.append(_evaluate(run, last=i == len(runs) - 1))
        return results if group.rank == 0 else None
    finally:
        group.close()


def _evaluate_seg(checkpoint: str | os.PathLike, data: str | os.PathLike, budgets: Sequence[float | None], *,
                  out: str | os.PathLike | None, device: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """The seg evaluation (`trim.eval.seg`): one budget, real images."""
    from trim.eval.seg import SegOptions, evaluate_seg

    if list(budgets) != [None]:
        raise ConfigError("--budget serves a calibrated budget, and the sam family has no budget calibration; "
                          "evaluate a seg checkpoint without --budget")
    if options["blind"]:
        raise ConfigError("--blind replaces the image with a constant to measure what the text alone gives; seg "
                          "prompts have no text, so evaluate a seg checkpoint without --blind")
    seg = SegOptions(split=options["split"], batch_size=options["batch_size"], workers=options["workers"],
                     max_samples=options["max_samples"], n_clicks=options["n_clicks"],
                     size_buckets=options["size_buckets"], warmup=options["warmup"], repeats=options["repeats"],
                     figures=options["figures"], speed=options["speed"], progress=options["progress"])
    return evaluate_seg(checkpoint, data, out=out, device=device, options=seg)


def _results_dir(ckpt: Path, out: str | os.PathLike | None) -> Path:
    directory = Path(out if out is not None else ckpt) / "eval"
    if rank_and_world()[0] == 0:  # only rank 0 writes
        check_writable(directory, f"--out {out}" if out is not None else f"--out (default: the checkpoint {ckpt})")
    return directory


def _setup(opts: EvalOptions, ckpt: Path, out_dir: Path, group: ProcessGroup, root: Path, started: float) -> _Run:
    """Load the model and check it against the task and the data."""
    model = load_model(ckpt).to(group.device).eval()
    cfg = model.config
    if cfg.task != opts.task:
        raise ConfigError(f"{ckpt} is a {cfg.task} model (config.json: model.task={cfg.task!r}); "
                          f"evaluate it with --task {cfg.task}")
    recipe = read_config(ckpt)
    split = read_split(root, opts.task, opts.split, cfg, recipe, opts.answers)
    run = _Run(opts, ckpt, out_dir, group, model, recipe, split, started)
    run.log(f"trim eval: {ckpt} ({cfg.family} {opts.task}, {cfg.vision.image_size}px) on {root} "
            f"{opts.task}/{opts.split} ({split.expected} samples, {len(split.shards)} shards), {group.world} "
            f"process(es), device {group.device}")
    return run


def _evaluate(run: _Run, last: bool = True) -> dict[str, Any] | None:
    cfg, group = run.model.config, run.group
    collector = Collector(run.opts.task, run.split.answers, trimmed_layers(run.model), cfg.vision.grid,
                          run.opts.figures if group.rank == 0 and not run.opts.blind else 0)
    parts = group.gather_results(lambda: _run_pass(run, collector))
    if group.rank != 0:
        return None
    if last:
        group.close()  # nothing collective from here on: the other ranks may leave
    merged = merge(parts, run.opts.task)
    complete = _check_complete(run, merged)
    scores = score(run.opts.task, merged, vqa_metric=run.opts.vqa_metric)
    speed = None
    if run.opts.speed and not run.opts.blind and collector.fixed_batch is not None:
        run.log(f"timing full vs trimmed ({run.opts.warmup} warm-up, {run.opts.repeats} repeats) ...")
        speed = measure_speed(run.model, collector.fixed_batch, group.device, warmup=run.opts.warmup,
                              repeats=run.opts.repeats, budget=run.opts.budget)
    return _write(run, merged, complete, scores, speed, collector)


def _run_pass(run: _Run, collector: Collector) -> dict[str, Any]:
    """This rank's share of the split through the model; returns what it sends to rank 0."""
    from tqdm import tqdm

    opts, group = run.opts, run.group
    loader = run.split.loader(run.model.config, opts.batch_size, opts.workers)
    total = run.split.rank_total(group.rank, group.world)
    cap = None  # --max-samples, shared over the ranks
    if opts.max_samples is not None:
        start, stop = rank_slice(opts.max_samples, group.rank, group.world)
        cap = stop - start
        total = min(total, cap)
    done = 0
    with tqdm(total=total or None, desc=f"eval {opts.task}/{opts.split}", unit="sample",
              disable=not (opts.progress and group.rank == 0), file=sys.stderr) as bar, torch.inference_mode():
        for batch in loader:
            if cap is not None and done >= cap:
                break
            n = int(batch["pixel_values"].shape[0])
            if cap is not None and done + n > cap:
                batch, n = slice_batch(batch, 0, cap - done), cap - done
            if opts.blind:
                batch = blind_batch(batch)
            inputs = {k: batch[k].to(group.device) for k in MODEL_INPUTS if k in batch}
            collector.add(batch, run.model(inputs, trim="eval", track_alive=collector.track_alive(batch),
                                           budget=opts.budget))
            done += n
            bar.update(n)
    return collector.payload(loader.stats.as_dict())


def _check_complete(run: _Run, merged: dict[str, Any]) -> bool:
    """Whether this is the whole split; a whole split must have exactly the manifest's samples."""
    n, split = len(merged["ids"]), run.split
    complete = run.opts.max_samples is None
    if complete and n != split.expected:
        reading = merged["stats"]
        raise EvalError(f"read {n} distinct samples of {split.task}/{split.name} but {split.root}/manifest.json "
                        f"records {split.expected} ({reading['samples']} decoded, skipped "
                        f"{reading['skipped'] or 'none'}, {reading['shard_errors']} shards cut short, "
                        f"{merged['duplicates']} duplicate ids); the set is incomplete, so its metrics would not be "
                        "the official ones. Check the shards with `trim data inspect ROOT --check`")
    if n == 0:
        raise EvalError(f"no samples were evaluated ({split.task}/{split.name} of {split.root})")
    if merged["duplicates"]:
        run.log(f"warning: {merged['duplicates']} duplicate ids were read and dropped (the shards overlap)")
    return complete


def _write(run: _Run, merged: dict[str, Any], complete: bool, scores: Scores, speed: dict[str, Any] | None,
           collector: Collector) -> dict[str, Any]:
    """The predictions export, the figures and the JSON record; returns the record."""
    task, split = run.opts.task, run.opts.split
    run.out_dir.mkdir(parents=True, exist_ok=True)
    stem = output_stem(task, split, run.opts.budget, blind=run.opts.blind)
    export = write_predictions(task, dict(zip(merged["ids"], merged["predictions"])), run.out_dir, stem)
    figures = write_eval_figures(run.out_dir, stem, f"{run_name(run.recipe, run.ckpt)} {task}/{split}",
                                 merged["sample_cost"], scores.difficulty, scores.difficulty_label, collector.figures,
                                 per_image_names=task == "nlvr2")
    result = build_result(ckpt=run.ckpt, recipe=run.recipe, model_config=run.model.config, split=run.split,
                          merged=merged, complete=complete, processes=run.group.world,
                          batch_size=run.opts.batch_size, scores=scores, speed=speed, predictions_file=export.name,
                          figures=figures, seconds=time.perf_counter() - run.started, budget=run.opts.budget,
                          calibration=getattr(run.model, "calibration", None), vqa_metric=run.opts.vqa_metric,
                          blind=run.opts.blind, keep_ratio=model_keep_ratio(run.model))
    result["path"] = str(write_json(result, run.out_dir / f"{stem}.json"))
    return result
