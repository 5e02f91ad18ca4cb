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
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from trim.errors import CheckpointError, ConfigError, DataError, TrimError

__all__ = ["EVAL_FORMAT", "SEG_UNAVAILABLE", "EvalError", "evaluate", "resolve_checkpoint", "output_stem"]

EVAL_FORMAT = "trim-eval/1"
TASKS = ("vqa", "nlvr2", "seg")
# The loader's normalisation ((x / 255 - mean) / std); the overlays undo it.
PIXEL_MEAN = (0.5, 0.5, 0.5)
PIXEL_STD = (0.5, 0.5, 0.5)
MODEL_INPUTS = ("pixel_values", "input_ids", "attention_mask")
HISTOGRAM_BINS = 20
SEG_UNAVAILABLE = (
    "--task seg: trim has no SAM-style prompted segmentation model yet (the SAM encoder / prompt encoder / mask "
    "decoder and big.LITTLE routing come in a later issue), so there is no checkpoint to evaluate on seg shards. "
    "The metric itself is ready: trim.eval.metrics.seg.evaluate_prompted (docs/metrics.md). "
    "Use --task vqa or --task nlvr2."
)
# Which trim.* config keys put a token / head trimmer on each recorded stream.
_TRIM_KEYS = {
    "vision": ("vision_token_layers", "vision_head_layers"),
    "vilt": ("vision_token_layers", "vision_head_layers"),
    "text": ("text_token_layers", "text_head_layers"),
    "cross_text": ("cross_token_layers", "cross_head_layers"),
    "cross_image": ("cross_token_layers", "cross_head_layers"),
}
# Streams whose alive mask ends with the image patch grid (kept-token overlays).
_IMAGE_STREAMS = ("vision", "vilt", "cross_image")


class EvalError(TrimError):
    """The evaluation could not give a trustworthy result (lost samples, a rank failed, ...)."""


# ----------------------------------------------------------------------------- small helpers


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A model directory (``config.json`` + ``model.safetensors``), or a training run folder
    whose ``latest`` file names one."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    pointer = path / "latest"
    if pointer.is_file() and (path / pointer.read_text().strip() / "config.json").is_file():
        return path / pointer.read_text().strip()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a directory written by save_model or "
                              "`trim train` (e.g. runs/<name>/step_<N>, or runs/<name> to take its latest)")
    raise CheckpointError(f"{path} has no config.json (nor a 'latest' file naming a checkpoint); pass a model "
                          "directory holding config.json and model.safetensors")


def output_stem(task: str, split: str) -> str:
    """File stem of the results: ``<task>`` for the val split, ``<task>_<split>`` otherwise."""
    return task if split == "val" else f"{task}_{split}"


def _safe_name(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(value))[:80]


def _rank_share(n: int, rank: int, world: int) -> int:
    base, extra = divmod(n, world)
    return base + (1 if rank < extra else 0)


def _slice(batch: dict[str, Any], n: int) -> dict[str, Any]:
    return {k: v[:n] if isinstance(v, (torch.Tensor, list, tuple)) else v for k, v in batch.items()}


def _stats(values: np.ndarray) -> dict[str, float]:
    return {"mean": float(values.mean()), "median": float(np.median(values)), "std": float(values.std()),
            "min": float(values.min()), "max": float(values.max())}


# ----------------------------------------------------------------------------- distributed


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    created: bool = False  # this module initialised the process group (and tears it down)

    def gather(self, payload: Any) -> list[Any]:
        if self.world == 1:
            return [payload]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, payload)
        return out

    def close(self) -> None:
        if self.created and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.created = False


def _setup(device: str | None) -> _Dist:
    """Rank, world and device; initialises the process group from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device.startswith("cuda") if device else torch.cuda.is_available()
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available here; use --device cpu")
    if world == 1:
        return _Dist(device=torch.device(device or ("cuda" if use_cuda else "cpu")))
    dist = torch.distributed
    created = False
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")
        created = True
    return _Dist(dist.get_rank(), dist.get_world_size(), dev, created)


# ----------------------------------------------------------------------------- per-rank pass


@dataclass
class _Figure:
    """What an overlay needs of one sample (kept on rank 0 for the first few samples)."""

    id: Any
    text: str
    prediction: str
    image: np.ndarray  # (images, H, W, 3) float in [0, 1]
    masks: dict[int, dict[Any, np.ndarray]]  # image index -> layer key -> (g, g) bool


class _Collector:
    """Per-sample results of one rank, as compact arrays for ``all_gather_object``."""

    def __init__(self, task: str, answers: list[str] | None, trimmed_layers: dict[str, list[tuple[int, Any]]],
                 grid: int, n_figures: int) -> None:
        self.task, self.answers, self.grid = task, answers, grid
        self.trimmed_layers = trimmed_layers  # stream base -> [(layer, figure key)]
        self.n_figures = n_figures
        self.ids: list[Any] = []
        self.predictions: list[Any] = []
        self.cost: list[np.ndarray] = []
        self.tokens: list[np.ndarray] = []
        self.heads: list[np.ndarray] = []
        self.layout: list[tuple[str, int]] | None = None
        self.extra: dict[str, list[Any]] = {}
        self.figures: list[_Figure] = []
        self.fixed_batch: dict[str, torch.Tensor] | None = None

    @property
    def wants_alive(self) -> bool:
        return len(self.figures) < self.n_figures and any(self.trimmed_layers.values())

    def _layout(self, records: dict[str, list[Any]]) -> list[tuple[str, int]]:
        layout = [(stream, i) for stream, recs in records.items() for i in range(len(recs))]
        if self.layout is None:
            self.layout = layout
        elif layout != self.layout:
            raise EvalError(f"the model recorded layers {layout[:4]}... in one batch and {self.layout[:4]}... in "
                            "another; kept-token statistics need the same layers every batch")
        return layout

    def add(self, batch: dict[str, Any], out: Any) -> None:
        n = int(batch["pixel_values"].shape[0])
        if self.fixed_batch is None:
            self.fixed_batch = {k: batch[k].detach().clone() for k in MODEL_INPUTS if k in batch}
        logits = out.logits.float()
        layout = self._layout(out.records)
        self.cost.append(out.cost_ratio.detach().float().cpu().numpy().astype(np.float64))
        self.tokens.append(np.stack([out.records[s][i].tokens.detach().float().cpu().numpy() for s, i in layout], 1)
                           if layout else np.zeros((n, 0)))
        self.heads.append(np.stack([out.records[s][i].heads.detach().float().cpu().numpy() for s, i in layout], 1)
                          if layout else np.zeros((n, 0)))
        if self.task == "vqa":
            best = logits.argmax(-1).tolist()
            predictions = [self.answers[k] for k in best]
            self.ids += [int(q) for q in batch["question_id"]]
            for key in ("answers", "answer_type", "question_type"):
                self.extra.setdefault(key, []).extend(batch[key])
            texts = batch["question"]
        else:
            labels = batch["labels"].to(logits.device)
            predictions = (logits.argmax(-1) == 1).tolist()
            loss = torch.full((n,), float("nan"))
            labelled = labels >= 0
            if labelled.any():
                loss[labelled.cpu()] = F.cross_entropy(logits[labelled], labels[labelled], reduction="none").cpu()
            self.ids += [str(i) for i in batch["identifier"]]
            self.extra.setdefault("label", []).extend(labels.cpu().tolist())
            self.extra.setdefault("loss", []).extend(loss.tolist())
            texts = batch["sentence"]
        self.predictions += predictions
        if self.wants_alive:
            self._keep_figures(batch, out, texts, predictions)

    def _keep_figures(self, batch: dict[str, Any], out: Any, texts: list[str], predictions: list[Any]) -> None:
        pixels = batch["pixel_values"].detach().float().cpu()
        if pixels.dim() == 4:
            pixels = pixels[:, None]  # (B, images, C, H, W)
        mean = torch.tensor(PIXEL_MEAN).view(1, 1, 3, 1, 1)
        std = torch.tensor(PIXEL_STD).view(1, 1, 3, 1, 1)
        images = (pixels * std + mean).clamp(0, 1).permute(0, 1, 3, 4, 2).numpy()
        g2 = self.grid * self.grid
        ids = self.ids[-len(predictions):]
        for b in range(min(len(predictions), self.n_figures - len(self.figures))):
            masks: dict[int, dict[Any, np.ndarray]] = {}
            for stream, recs in out.records.items():
                base, _, suffix = stream.partition("/")
                image_index = int(suffix.removeprefix("image")) if suffix else 0
                for layer, key in self.trimmed_layers.get(base, []):
                    alive = recs[layer].alive
                    if alive is None or alive.shape[1] < g2:
                        continue
                    patch = alive[b, -g2:].reshape(self.grid, self.grid).cpu().numpy().astype(bool)
                    masks.setdefault(image_index, {})[key] = patch
            if masks:
                prediction = str(predictions[b])
                self.figures.append(_Figure(ids[b], str(texts[b]), prediction, images[b], masks))

    def payload(self, stats: dict[str, Any]) -> dict[str, Any]:
        cat = (lambda xs, w: np.concatenate(xs, 0) if xs else np.zeros((0, w)))
        width = len(self.layout or [])
        return {"ids": self.ids, "predictions": self.predictions, "extra": self.extra, "layout": self.layout,
                "cost": np.concatenate(self.cost) if self.cost else np.zeros(0),
                "tokens": cat(self.tokens, width), "heads": cat(self.heads, width), "stats": stats}


def _trimmed_layers(model: Any) -> dict[str, list[tuple[int, Any]]]:
    """Stream base -> [(layer, figure key)] of the image streams' token-trimmed layers."""
    trim_cfg = model.config.trim
    out: dict[str, list[tuple[int, Any]]] = {}
    for stream in _IMAGE_STREAMS:
        if stream == "vilt" and model.config.family != "vilt":
            continue
        if stream in ("vision", "cross_image") and model.config.family != "dual":
            continue
        layers = sorted(getattr(trim_cfg, _TRIM_KEYS[stream][0]))
        # Integer keys sort first in plot_kept_tokens: the vision tower's layers, then the cross layers.
        out[stream] = [(i, i if stream != "cross_image" else f"cross {i}") for i in layers]
    return out


# ----------------------------------------------------------------------------- rank 0: merge


def _merge(parts: list[dict[str, Any]], task: str) -> dict[str, Any]:
    """Concatenate the ranks' results, drop duplicate ids (first wins), sort by id."""
    layout = next((p["layout"] for p in parts if p["layout"] is not None), [])
    seen: dict[Any, tuple[int, int]] = {}
    duplicates = 0
    for r, part in enumerate(parts):
        for i, sample_id in enumerate(part["ids"]):
            if sample_id in seen:
                duplicates += 1
            else:
                seen[sample_id] = (r, i)
    order = sorted(seen)
    where = [seen[k] for k in order]
    width = len(layout)

    def column(get: Callable[[dict[str, Any], int], Any]) -> list[Any]:
        return [get(parts[r], i) for r, i in where]

    merged = {
        "ids": order,
        "predictions": column(lambda p, i: p["predictions"][i]),
        "cost": np.array(column(lambda p, i: p["cost"][i]), dtype=np.float64),
        "tokens": np.array(column(lambda p, i: p["tokens"][i]), dtype=np.float64).reshape(len(order), width),
        "heads": np.array(column(lambda p, i: p["heads"][i]), dtype=np.float64).reshape(len(order), width),
        "layout": layout,
        "duplicates": duplicates,
    }
    keys = ("answers", "answer_type", "question_type") if task == "vqa" else ("label", "loss")
    for key in keys:
        merged[key] = column(lambda p, i, key=key: p["extra"][key][i])
    stats = {"samples": 0, "skipped": {}, "shard_errors": 0}
    for part in parts:
        stats["samples"] += part["stats"]["samples"]
        stats["shard_errors"] += part["stats"]["shard_errors"]
        for reason, n in part["stats"]["skipped"].items():
            stats["skipped"][reason] = stats["skipped"].get(reason, 0) + n
    merged["stats"] = stats
    return merged


def _metrics(task: str, merged: dict[str, Any]) -> tuple[dict[str, Any] | None, float | None, np.ndarray | None, str]:
    """(official metrics, headline accuracy in percent, per-sample difficulty, difficulty label)."""
    from trim.eval.metrics import nlvr2_metrics, vqa_accuracy

    ids, predictions = merged["ids"], merged["predictions"]
    if task == "vqa":
        questions = [{"question_id": q, "answers": a, "answer_type": at, "question_type": qt}
                     for q, a, at, qt in zip(ids, merged["answers"], merged["answer_type"], merged["question_type"])
                     if a]
        if not questions:
            return None, None, None, ""
        answered = {q["question_id"] for q in questions}
        result = vqa_accuracy({q: p for q, p in zip(ids, predictions) if q in answered}, questions)
        per_question = result.pop("per_question")
        difficulty = None
        if len(questions) == len(ids):
            difficulty = np.array([1.0 - per_question[q] / 100.0 for q in ids])
        return result, result["overall"], difficulty, "1 - VQA accuracy of the prediction"
    labels = {i: bool(lab) for i, lab in zip(ids, merged["label"]) if lab >= 0}
    if not labels:
        return None, None, None, ""
    result = nlvr2_metrics(dict(zip(ids, predictions)), labels)
    loss = np.array(merged["loss"], dtype=np.float64)
    difficulty = loss if len(labels) == len(ids) else None
    return result, 100.0 * result["accuracy"], difficulty, "cross-entropy of the label (trimmed model)"


def _kept(model: Any, merged: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    trim_cfg = model.config.trim
    kept: dict[str, list[dict[str, Any]]] = {}
    if not merged["ids"]:
        return kept
    tokens, heads = merged["tokens"].mean(0), merged["heads"].mean(0)
    for j, (stream, layer) in enumerate(merged["layout"]):
        token_key, head_key = _TRIM_KEYS.get(stream.partition("/")[0], (None, None))
        kept.setdefault(stream, []).append({
            "layer": layer, "tokens": round(float(tokens[j]), 4), "heads": round(float(heads[j]), 4),
            "token_trimmer": bool(token_key) and layer in getattr(trim_cfg, token_key),
            "head_trimmer": bool(head_key) and layer in getattr(trim_cfg, head_key)})
    return kept


# ----------------------------------------------------------------------------- rank 0: speed


def measure_speed(model: Any, batch: dict[str, torch.Tensor], device: torch.device, *, warmup: int,
                  repeats: int) -> dict[str, Any]:
    """Full (trim="off") vs trimmed (trim="eval") wall clock on ``batch`` and on its first sample."""
    from trim.eval.speed import median, time_interleaved

    batch = {k: v.to(device) for k, v in batch.items()}
    one = {k: v[:1] for k, v in batch.items()}
    result: dict[str, Any] = {
        "method": (f"same weights and inputs, trim='off' (full) and trim='eval' (trimmed) called alternately by "
                   f"trim.eval.speed.time_interleaved after {warmup} warm-up calls each; median of {repeats} "
                   "repeats. Fixed batch: the first batch of the set read by rank 0; latency uses its first sample"),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(), "warmup": warmup, "repeats": repeats,
    }
    for name, inputs in (("throughput", batch), ("latency", one)):
        times = time_interleaved({"full": lambda x=inputs: model(x, trim="off"),
                                  "trimmed": lambda x=inputs: model(x, trim="eval")},
                                 warmup=warmup, repeats=repeats, device=device)
        full, trimmed = median(times["full"]), median(times["trimmed"])
        with torch.inference_mode():
            ratio = float(model(inputs, trim="eval").cost_ratio.float().mean())
        n = int(inputs["pixel_values"].shape[0])
        entry = {"batch_size": n, "cost_ratio": round(ratio, 4), "speedup": round(full / trimmed, 4)}
        if name == "throughput":
            entry |= {"trimmed_samples_per_s": round(n / trimmed, 2), "full_samples_per_s": round(n / full, 2)}
        else:
            entry |= {"trimmed_ms": round(1e3 * trimmed, 3), "full_ms": round(1e3 * full, 3)}
        entry["seconds"] = {"trimmed": [round(t, 6) for t in times["trimmed"]],
                            "full": [round(t, 6) for t in times["full"]]}
        result[name] = entry
    return result


# ----------------------------------------------------------------------------- rank 0: figures


def _figures(task: str, merged: dict[str, Any], difficulty: np.ndarray | None, difficulty_label: str,
             figures: list[_Figure], out_dir: Path, stem: str, title: str) -> list[str]:
    from trim.eval.plots import plot_cost_histogram, plot_kept_tokens

    written = []
    if len(merged["cost"]):
        path = plot_cost_histogram(merged["cost"], out_dir / f"{stem}_cost_histogram.png",
                                   title=f"{title}: per-sample cost", difficulty=difficulty,
                                   difficulty_label=difficulty_label or "difficulty",
                                   cost_label="cost ratio (FLOPs trimmed / full, padding counted)")
        written.append(path.name)
    for fig in figures:
        for image_index, masks in sorted(fig.masks.items()):
            suffix = f"_image{image_index}" if task == "nlvr2" else ""
            caption = f"{fig.text}  (predicted: {fig.prediction})"
            path = plot_kept_tokens(fig.image[image_index], masks,
                                    out_dir / f"{stem}_kept_tokens_{_safe_name(fig.id)}{suffix}.png",
                                    question=caption)
            written.append(path.name)
    return written


# ----------------------------------------------------------------------------- the command


def _log(rank: int) -> Callable[[str], None]:
    return (lambda msg: print(msg, file=sys.stderr, flush=True)) if rank == 0 else (lambda msg: None)


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
) -> dict[str, Any] | None:
    """Evaluate a checkpoint on one split; returns the results dict on rank 0 (None elsewhere).

    Writes ``<out or checkpoint>/eval/<stem>.json`` (stem ``<task>`` for val, ``<task>_<split>``
    otherwise), the predictions export, and the figures beside it. See docs/evaluation.md.
    """
    if task == "seg":
        raise ConfigError(SEG_UNAVAILABLE)
    if task not in TASKS:
        raise ConfigError(f"--task {task!r}; choose one of {TASKS}")
    if batch_size < 1 or workers < 0 or (max_samples is not None and max_samples < 1):
        raise ConfigError(f"--batch-size {batch_size}, --workers {workers}, --max-samples {max_samples}: "
                          "batch size and max samples must be >= 1, workers >= 0")
    if warmup < 0 or repeats < 1:
        raise ConfigError(f"--warmup {warmup} must be >= 0 and --repeats {repeats} >= 1")
    started = time.perf_counter()
    ckpt = resolve_checkpoint(checkpoint)
    dist = _setup(device)
    try:
        return _evaluate(ckpt, task, Path(data), dist, split=split, batch_size=batch_size, workers=workers,
                         out=Path(out) if out is not None else ckpt, max_samples=max_samples, warmup=warmup,
                         repeats=repeats, n_figures=figures, answers=answers, speed=speed, progress=progress,
                         started=started)
    finally:
        dist.close()


def _evaluate(ckpt: Path, task: str, root: Path, dist: _Dist, *, split: str, batch_size: int, workers: int,
              out: Path, max_samples: int | None, warmup: int, repeats: int, n_figures: int,
              answers: str | os.PathLike | None, speed: bool, progress: bool, started: float) -> dict[str, Any] | None:
    from trim.data import build_loader, load_tokenizer, read_manifest
    from trim.data.shards import split_urls
    from trim.data.stream import expand_urls
    from trim.models import load_model, read_config

    log = _log(dist.rank)
    model = load_model(ckpt).to(dist.device).eval()
    cfg = model.config
    if cfg.task != task:
        raise ConfigError(f"{ckpt} is a {cfg.task} model (config.json: model.task={cfg.task!r}); "
                          f"evaluate it with --task {cfg.task}")
    recipe = read_config(ckpt)
    manifest = read_manifest(root)
    urls = split_urls(root, task, split)
    expected = int(manifest["tasks"][task][split]["samples"])
    shard_counts = manifest["tasks"][task][split].get("shards", {})
    tokenizer = load_tokenizer(root)
    if len(tokenizer) > cfg.text.vocab_size:
        raise ConfigError(f"{root}/tokenizer.json has {len(tokenizer)} tokens but the model's text vocabulary has "
                          f"{cfg.text.vocab_size}; evaluate on shards written with the training tokenizer")
    vocab = None
    if task == "vqa":
        vocab_path = Path(answers) if answers is not None else root / "vqa" / "answers.json"
        if not vocab_path.is_file():
            raise DataError(f"{vocab_path} does not exist; VQA predictions need the answer vocabulary the model was "
                            "trained with (pass --answers PATH)")
        vocab = json.loads(vocab_path.read_text())
        if len(vocab) != cfg.num_labels:
            raise ConfigError(f"{vocab_path} has {len(vocab)} answers but the model predicts {cfg.num_labels} "
                              "classes; pass the training vocabulary with --answers")
    if task == "nlvr2" and cfg.num_labels != 2:
        raise ConfigError(f"an NLVR2 model needs 2 labels (False, True); this one has {cfg.num_labels}")
    text = cfg.text
    usable = text.max_positions - (text.pad_token_id + 1 if text.roberta_positions else 0)
    max_text_len = min(int((recipe.get("data") or {}).get("max_text_len") or 40), usable)

    shards = expand_urls(urls)
    mine = [Path(u).name for u in shards[dist.rank::dist.world]]
    rank_total = sum(int(shard_counts.get(name, 0)) for name in mine)
    cap = _rank_share(max_samples, dist.rank, dist.world) if max_samples is not None else None
    log(f"trim eval: {ckpt} ({cfg.family} {task}, {cfg.vision.image_size}px) on {root} {task}/{split} "
        f"({expected} samples, {len(shards)} shards), {dist.world} process(es), device {dist.device}")

    collector = _Collector(task, vocab, _trimmed_layers(model), cfg.vision.grid, n_figures if dist.rank == 0 else 0)
    error: str | None = None
    stats: dict[str, Any] = {"samples": 0, "skipped": {}, "shard_errors": 0}
    try:
        loader = build_loader(urls, task, tokenizer=tokenizer, batch_size=batch_size, mode="eval",
                              image_size=cfg.vision.image_size, answer_vocab=vocab, num_workers=workers,
                              max_text_len=max_text_len, mean=PIXEL_MEAN, std=PIXEL_STD)
        from tqdm import tqdm

        total = min(rank_total, cap) if cap is not None else rank_total
        with tqdm(total=total or None, desc=f"eval {task}/{split}", unit="sample",
                  disable=not (progress and dist.rank == 0), file=sys.stderr) as bar, torch.inference_mode():
            done = 0
            for batch in loader:
                if cap is not None and done >= cap:
                    break
                n = int(batch["pixel_values"].shape[0])
                if cap is not None and done + n > cap:
                    batch, n = _slice(batch, cap - done), cap - done
                inputs = {k: batch[k].to(dist.device) for k in MODEL_INPUTS if k in batch}
                output = model(inputs, trim="eval", track_alive=collector.wants_alive)
                collector.add(batch, output)
                done += n
                bar.update(n)
        stats = loader.stats.as_dict()
        payload = collector.payload(stats)
    except Exception as exn:  # every rank must reach the gather, or the others wait forever
        if dist.world == 1:
            raise
        error = f"rank {dist.rank}: {type(exn).__name__}: {exn}"
        payload = {"error": error}
    parts = dist.gather(payload)
    failed = [p["error"] for p in parts if "error" in p]
    if failed:
        raise EvalError("evaluation failed on " + "; ".join(failed))
    if dist.rank != 0:
        return None
    dist.close()  # nothing collective from here on: the other ranks may leave

    merged = _merge(parts, task)
    n = len(merged["ids"])
    complete = max_samples is None
    if complete and n != expected:
        skipped = merged["stats"]
        raise EvalError(f"read {n} distinct samples of {task}/{split} but {root}/manifest.json records {expected} "
                        f"({skipped['samples']} decoded, skipped {skipped['skipped'] or 'none'}, "
                        f"{skipped['shard_errors']} shards cut short, {merged['duplicates']} duplicate ids); "
                        "the set is incomplete, so its metrics would not be the official ones. Check the shards "
                        "with `trim data inspect ROOT --check`")
    if n == 0:
        raise EvalError(f"no samples were evaluated ({task}/{split} of {root})")
    if merged["duplicates"]:
        log(f"warning: {merged['duplicates']} duplicate ids were read and dropped (the shards overlap)")

    metrics, accuracy, difficulty, difficulty_label = _metrics(task, merged)
    costs = merged["cost"]
    hi = max(1.0, float(costs.max()))
    counts, edges = np.histogram(costs, bins=HISTOGRAM_BINS, range=(0.0, hi))
    speed_result = None
    if speed and collector.fixed_batch is not None:
        log(f"timing full vs trimmed ({warmup} warm-up, {repeats} repeats) ...")
        speed_result = measure_speed(model, collector.fixed_batch, dist.device, warmup=warmup, repeats=repeats)

    out_dir = out / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = output_stem(task, split)
    predictions = dict(zip(merged["ids"], merged["predictions"]))
    if task == "vqa":
        from trim.eval.metrics import export_evalai

        export = export_evalai(predictions, out_dir / f"{stem}_predictions_evalai.json")
    else:
        from trim.eval.metrics import export_csv

        export = export_csv(predictions, out_dir / f"{stem}_predictions.csv")
    name = str(recipe.get("name") or (ckpt.parent.name if ckpt.name.startswith("step_") else ckpt.name))
    figure_files = _figures(task, merged, difficulty, difficulty_label, collector.figures, out_dir, stem,
                            f"{name} {task}/{split}")
    objective = recipe.get("objective") or {}
    result: dict[str, Any] = {
        "format": EVAL_FORMAT,
        "name": name,
        "task": task,
        "split": split,
        "checkpoint": str(ckpt.resolve()),
        "data": str(root.resolve()),
        # A plain fine-tuning run carries the recipe's default target, which means nothing there.
        "run": {"method": objective.get("method"),
                "target": objective.get("target") if objective.get("method") not in (None, "none") else None},
        "model": {"family": cfg.family, "image_size": cfg.vision.image_size, "num_labels": cfg.num_labels,
                  "trim": cfg.to_dict()["trim"]},
        "samples": n,
        "manifest_samples": expected,
        "complete": complete and n == expected,
        "duplicates_dropped": merged["duplicates"],
        "reading": merged["stats"],
        "processes": dist.world,
        "batch_size": batch_size,
        "max_text_len": max_text_len,
        "trim": "eval",
        "accuracy": None if accuracy is None else round(float(accuracy), 4),
        "accuracy_name": "VQA accuracy (%)" if task == "vqa" else "NLVR2 accuracy (%)",
        "metrics": metrics,
        "cost_ratio": {
            **{k: round(v, 6) for k, v in _stats(costs).items()},
            "histogram": {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]},
            "note": ("per-sample FLOPs of the physical trim='eval' forward / FLOPs of the full model; padding to the "
                     "batch maximum is counted, so it depends on which samples share a batch"),
        },
        "kept": _kept(model, merged),
        "kept_note": "mean over the set of the tokens each layer processed (alive, padding excluded) and heads kept",
        "speed": speed_result,
        "speedup": speed_result["throughput"]["speedup"] if speed_result else None,
        "exports": {"predictions": export.name},
        "figures": figure_files,
        "eval_seconds": round(time.perf_counter() - started, 2),
    }
    path = out_dir / f"{stem}.json"
    from trim.eval.metrics._io import atomic_write_text

    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    result["path"] = str(path)
    return result


def summary(result: dict[str, Any]) -> str:
    """The lines `trim eval` prints."""
    lines = [f"{result['name']}: {result['task']}/{result['split']}, {result['samples']} samples "
             f"({'whole split' if result['complete'] else 'subset'}), {result['processes']} process(es)"]
    m = result["metrics"]
    if m is None:
        lines.append("metrics: none (the split has no answers/labels); submit the predictions file")
    elif result["task"] == "vqa":
        per_type = ", ".join(f"{k} {v:.2f}" for k, v in sorted(m["perAnswerType"].items()))
        lines.append(f"VQA accuracy {m['overall']:.2f}  ({per_type})")
    else:
        lines.append(f"NLVR2 accuracy {m['accuracy']:.4f}, consistency {m['consistency']:.4f}")
    c = result["cost_ratio"]
    lines.append(f"cost ratio mean {c['mean']:.3f} (median {c['median']:.3f}, min {c['min']:.3f}, max {c['max']:.3f})")
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
