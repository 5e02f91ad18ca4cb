"""`trim eval CHECKPOINT --task seg`: prompted segmentation (box / 1 click / N clicks), cost and encoder speed.

The pass
    Every image of the split is read once (``build_loader`` in eval mode, SAM's letterbox and
    normalisation) and encoded once; every object with a non-empty mask at the model's image size
    is then prompted by the protocol of `trim.eval.metrics.seg` (its ``PromptedSegEvaluator``): the
    annotation's box, the deepest interior point, and N clicks placed RITM's way on the previous
    prediction's error. A single click asks for SAM's three masks and keeps the one with the
    highest predicted IoU; a box and several clicks ask for one mask. Masks are scored in the
    model's input frame (the decoder's logits upsampled bilinearly, thresholded at 0). Objects whose
    mask vanishes at that size are counted (``objects_empty``), not scored.

Size buckets (``size_buckets``)
    ``relative`` (default): the object's area in its original image, as a fraction of that image,
    rescaled to COCO's typical 640 x 480 image before COCO's thresholds (small < 32^2, large > 96^2):
    small < 0.33 % of the image, large > 3 %. It does not depend on the resolution, so the 64-px
    synthetic world and SA-1B are bucketed alike. ``coco``: COCO's absolute pixel thresholds on the
    annotation's area in original pixels, for COCO itself.

Cost and speed
    The image encoder is what trimming prunes: the cost ratio is the encoder's ``cost_ratio`` under
    ``trim="eval"`` when the model trims (1.0 otherwise). Speed (invariant 5) times the image
    encoder on the first images of the split at batch 1 and batch 8 with `trim.eval.speed`'s
    interleaved loop: full (``trim="off"``) against trimmed (``trim="eval"``) when the model trims,
    the full encoder alone when it does not. With prompt-aware trimming each prompt is its own
    encoder pass; an image's cost is the mean over its prompts.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from trim.errors import ConfigError
from trim.eval.errors import EvalError
from trim.eval.metrics.seg import LARGE_AREA, MODES, SMALL_AREA, PromptedSegEvaluator
from trim.eval.output import check_writable, output_stem, write_json
from trim.eval.result import EVAL_FORMAT, run_name
from trim.eval.speed import median, time_interleaved
from trim.models.sam_prompts import encoder_trims, prompt_round
from trim.ranks import rank_and_world

SIZE_BUCKETS = ("relative", "coco")
COCO_IMAGE_AREA = 640 * 480  # the image size COCO's thresholds were set for (relative buckets)
SPEED_BATCHES = (1, 8)


@dataclass(frozen=True)
class SegOptions:
    split: str = "val"
    batch_size: int = 8
    workers: int = 0
    max_samples: int | None = None  # images
    n_clicks: int = 5
    size_buckets: str = "relative"
    warmup: int = 2
    repeats: int = 5
    figures: int = 4
    speed: bool = True
    progress: bool = True

    def check(self) -> None:
        if self.size_buckets not in SIZE_BUCKETS:
            raise ConfigError(f"--size-buckets {self.size_buckets!r}; choose one of {SIZE_BUCKETS}")
        if self.n_clicks < 1 or self.batch_size < 1 or self.workers < 0 or (self.max_samples or 1) < 1:
            raise ConfigError(f"--clicks {self.n_clicks}, --batch-size {self.batch_size}, --max-samples "
                              f"{self.max_samples} must be >= 1 and --workers {self.workers} >= 0")
        if self.warmup < 0 or self.repeats < 1:
            raise ConfigError(f"--warmup {self.warmup} must be >= 0 and --repeats {self.repeats} >= 1")


def encode(model: Any, pixels: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Image embeddings and the encoder's per-image cost ratio.

    ``Sam.forward`` is where trimming lives (``trim=``, ``cost_ratio``), so the encoder runs
    through it; one whole-image box per image rides along and its mask is not used (with
    prompt-aware trimming the encoder is conditioned on that box: `ImagePredictor` re-encodes).
    """
    size = pixels.shape[-1]
    whole = torch.tensor([0.0, 0.0, size, size], device=pixels.device).expand(pixels.shape[0], 1, 4)
    out = model(pixels, boxes=whole, trim=mode)
    return out.image_embeddings, out.cost_ratio


class ImagePredictor:
    """`PromptedSegEvaluator`'s ``predict_fn`` for one encoded image at a time (``set_image``).

    With prompt-aware trimming every prompt is its own encoder pass (`prompt_round`); ``costs``
    collects their cost ratios.
    """

    def __init__(self, model: Any, size: int, trim: str) -> None:
        self.model, self.size, self.trim = model, size, trim
        self.embedding: torch.Tensor | None = None
        self.pixels: torch.Tensor | None = None
        self.costs: list[float] = []

    def set_image(self, embedding: torch.Tensor, pixels: torch.Tensor) -> None:
        self.embedding, self.pixels, self.costs = embedding[None], pixels[None], []

    def __call__(self, image: np.ndarray, points: np.ndarray | None, labels: np.ndarray | None,
                 box: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        device = self.embedding.device
        prompts: dict[str, Any] = {}
        if box is not None:
            prompts["boxes"] = torch.as_tensor(box, dtype=torch.float32, device=device).view(1, 1, 4)
        if points is not None:
            prompts["points"] = torch.as_tensor(points, dtype=torch.float32, device=device).view(1, 1, -1, 2)
            prompts["point_labels"] = torch.as_tensor(labels, dtype=torch.long, device=device).view(1, 1, -1)
        ambiguous = box is None and points is not None and len(points) == 1  # SAM: 3 masks for one click
        out = prompt_round(self.model, self.pixels, self.embedding, trim=self.trim, multimask_output=ambiguous,
                           **prompts)  # fmt: skip
        if self.model.image_encoder.prompt_aware:
            self.costs.append(float(out.cost_ratio[0]))
        logits = F.interpolate(out.masks[0, 0].float()[None], size=(self.size, self.size), mode="bilinear",
                               align_corners=False)[0]  # fmt: skip
        return (logits > 0).cpu().numpy(), out.iou[0, 0].float().cpu().numpy()


def bucket_area(area: float, original: tuple[int, int], kind: str) -> float:
    """The area `trim.eval.metrics.seg.size_bucket` compares with COCO's thresholds (module docstring)."""
    return area if kind == "coco" else area / (original[0] * original[1]) * COCO_IMAGE_AREA


def evaluate_seg(checkpoint: str | os.PathLike, data: str | os.PathLike, *, out: str | os.PathLike | None = None,
                 device: str | None = None, options: SegOptions = SegOptions()) -> dict[str, Any]:
    """Evaluate a sam-family checkpoint on ``data``'s seg split; writes ``eval/seg[_<split>].json`` + a figure."""
    from trim.models import load_model, read_config
    from trim.models.io import resolve_checkpoint

    options.check()
    if rank_and_world()[1] > 1:
        raise ConfigError("trim eval --task seg runs in one process; start it without torchrun")
    started = time.perf_counter()
    ckpt = resolve_checkpoint(checkpoint, "CHECKPOINT")
    out_dir = Path(out if out is not None else ckpt) / "eval"
    check_writable(out_dir, f"--out {out}" if out is not None else f"--out (default: the checkpoint {ckpt})")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(ckpt).to(dev).eval()
    if model.config.task != "seg":
        raise ConfigError(f"{ckpt} is a {model.config.task} model (config.json: model.task={model.config.task!r}); "
                          f"evaluate it with --task {model.config.task}")
    split = _read_split(Path(data), options.split)
    size = model.config.sam.encoder.image_size
    log(f"trim eval: {ckpt} (sam seg, {size}px) on {data} seg/{options.split} ({split['expected']} images), "
        f"device {dev}")
    pass_result = _run_pass(model, split, size, dev, options)
    complete = options.max_samples is None
    if complete and pass_result["images"] != split["expected"]:
        reading = pass_result["reading"]
        raise EvalError(f"read {pass_result['images']} images of seg/{options.split} but {data}/manifest.json records "
                        f"{split['expected']} ({reading['skipped'] or 'none'} skipped, {reading['shard_errors']} shards "
                        "cut short); the set is incomplete. Check the shards with `trim data inspect ROOT --check`")
    if not pass_result["evaluator"].areas:
        raise EvalError(f"no object was evaluated in seg/{options.split} of {data}")
    speed = None
    if options.speed:
        log(f"timing the image encoder ({options.warmup} warm-up, {options.repeats} repeats) ...")
        speed = measure_encoder_speed(model, pass_result["speed_images"], dev, warmup=options.warmup,
                                      repeats=options.repeats)  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = output_stem("seg", options.split)
    recipe = read_config(ckpt)
    figures = []
    if pass_result["figure_items"]:
        from trim.eval.seg_plots import plot_seg_overlays

        figures = [plot_seg_overlays(pass_result["figure_items"], out_dir / f"{stem}_overlay.png",
                                     title=f"{run_name(recipe, ckpt)} seg/{options.split}: box prompts").name]
    result = _result(ckpt, recipe, model, Path(data), options, split, pass_result, complete, speed, figures,
                     time.perf_counter() - started)
    result["path"] = str(write_json(result, out_dir / f"{stem}.json"))
    return result


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _read_split(root: Path, split: str) -> dict[str, Any]:
    from trim.data import read_manifest
    from trim.data.shards import split_urls

    manifest = read_manifest(root)
    entry = manifest.get("tasks", {}).get("seg", {}).get(split)
    if entry is None:
        have = sorted(manifest.get("tasks", {}).get("seg", {}))
        raise ConfigError(f"{root}/manifest.json has no seg/{split} split (seg splits: {have or 'none'}); write it with "
                          "`trim data synth --tasks seg` or `trim data sa1b`, or pick --split")
    return {"urls": split_urls(root, "seg", split), "expected": int(entry["samples"])}


def _run_pass(model: Any, split: dict[str, Any], size: int, dev: torch.device, options: SegOptions) -> dict[str, Any]:
    """Every image encoded once, every object prompted; returns the evaluator and what the report needs."""
    from tqdm import tqdm

    from trim.data import build_loader
    from trim.data.seg import SAM_PIXEL_MEAN, SAM_PIXEL_STD

    loader = build_loader(split["urls"], "seg", batch_size=options.batch_size, mode="eval", image_size=size,
                          num_workers=options.workers, mean=SAM_PIXEL_MEAN, std=SAM_PIXEL_STD)  # fmt: skip
    trim = "eval" if encoder_trims(model) else "off"
    predictor = ImagePredictor(model, size, trim)
    evaluator = PromptedSegEvaluator(predictor, n_clicks=options.n_clicks, modes=MODES)
    mean = torch.tensor(SAM_PIXEL_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(SAM_PIXEL_STD).view(3, 1, 1) * 255
    images = empty = 0
    costs: list[float] = []
    speed_images: list[torch.Tensor] = []
    figure_items: list[dict[str, Any]] = []
    total = options.max_samples or split["expected"]
    with tqdm(total=total, desc="eval seg", unit="image", disable=not options.progress, file=sys.stderr) as bar, \
            torch.inference_mode():
        for batch in loader:
            pixels = batch["pixel_values"]
            if options.max_samples is not None:
                pixels = pixels[: options.max_samples - images]
            embeddings, cost = encode(model, pixels.to(dev), trim)
            speed_images += [p for p in pixels[: max(SPEED_BATCHES) - len(speed_images)]]
            for i in range(len(pixels)):
                predictor.set_image(embeddings[i], pixels[i].to(dev))
                image = (pixels[i] * std + mean).clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
                gts, predicted = [], []
                for j, mask in enumerate(batch["masks"][i].bool().numpy()):
                    if not mask.any():
                        empty += 1
                        continue
                    x0, y0, x1, y1 = batch["boxes"][i][j].tolist()
                    area = bucket_area(float(batch["areas"][i][j]), batch["original_size"][i], options.size_buckets)
                    evaluator.update({"image": image, "mask": mask, "bbox": [x0, y0, x1 - x0, y1 - y0], "area": area})
                    if len(figure_items) < options.figures:
                        gts.append(mask)
                        predicted.append(predictor(image, None, None, np.array([x0, y0, x1, y1]))[0][0])
                costs.append(float(np.mean(predictor.costs)) if predictor.costs else float(cost[i]))
                if gts:
                    figure_items.append({"image": image, "true": gts, "predicted": predicted,
                                         "box_ious": evaluator.ious["box"][-len(gts):]})
            images += len(pixels)
            bar.update(len(pixels))
            if options.max_samples is not None and images >= options.max_samples:
                break
    return {"evaluator": evaluator, "images": images, "objects_empty": empty, "costs": np.array(costs),
            "reading": loader.stats.as_dict(), "speed_images": torch.stack(speed_images) if speed_images else None,
            "figure_items": figure_items}


def measure_encoder_speed(model: Any, images: torch.Tensor, device: torch.device, *, warmup: int,
                          repeats: int) -> dict[str, Any]:
    """Encoder wall clock at batch 1 and 8 (fewer if the split has fewer images), full vs trimmed if it trims."""
    trims = encoder_trims(model)
    result: dict[str, Any] = {
        "method": (f"the image encoder through Sam.forward (one box per image), trim='off' (full)"
                   f"{' and trim=eval (trimmed) called alternately' if trims else ''} by "
                   f"trim.eval.speed.time_interleaved after {warmup} warm-up calls; median of {repeats} repeats, "
                   "on the first images of the split"),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(), "warmup": warmup, "repeats": repeats, "trimmed": trims,
        "note": None if trims else "the model has no trimming: only the full encoder is timed",
    }
    for batch_size in SPEED_BATCHES:
        x = images[:batch_size].to(device)
        candidates = {"full": lambda: encode(model, x, "off")}
        if trims:
            candidates["trimmed"] = lambda: encode(model, x, "eval")
        times = time_interleaved(candidates, warmup=warmup, repeats=repeats, device=device)
        full = median(times["full"])
        entry: dict[str, Any] = {"batch_size": len(x), "full_ms": round(1e3 * full, 3),
                                 "full_images_per_s": round(len(x) / full, 2)}
        if trims:
            trimmed = median(times["trimmed"])
            entry |= {"trimmed_ms": round(1e3 * trimmed, 3), "trimmed_images_per_s": round(len(x) / trimmed, 2),
                      "speedup": round(full / trimmed, 4)}
        result[f"batch{batch_size}"] = entry
    return result


def _result(ckpt: Path, recipe: dict[str, Any], model: Any, root: Path, options: SegOptions, split: dict[str, Any],
            pass_result: dict[str, Any], complete: bool, speed: dict[str, Any] | None, figures: list[str],
            seconds: float) -> dict[str, Any]:
    scores = pass_result["evaluator"].compute()
    for mode in scores.values():
        mode.pop("ious")  # one number per object: the JSON keeps the means
    costs = pass_result["costs"]
    objective = recipe.get("objective") or {}
    return {
        "format": EVAL_FORMAT, "name": run_name(recipe, ckpt), "task": "seg", "split": options.split,
        "checkpoint": str(ckpt.resolve()), "data": str(root.resolve()),
        "run": {"method": objective.get("method")},
        "model": {"family": "sam", "image_size": model.config.sam.encoder.image_size},
        "samples": pass_result["images"], "manifest_samples": split["expected"],
        "complete": complete and pass_result["images"] == split["expected"],
        "objects": scores["box"]["n"], "objects_empty": pass_result["objects_empty"],
        "reading": pass_result["reading"],
        "metrics": scores,
        "size_buckets": {"kind": options.size_buckets, "small_below": SMALL_AREA, "large_above": LARGE_AREA,
                         "area": "original pixels" if options.size_buckets == "coco" else
                         f"fraction of the image x {COCO_IMAGE_AREA} (640 x 480)"},
        "cost_ratio": {"mean": round(float(costs.mean()), 6), "min": round(float(costs.min()), 6),
                       "max": round(float(costs.max()), 6),
                       "note": "image encoder FLOPs under trim='eval' / full; 1.0 for a model without trimming"},
        "speed": speed,
        "figures": figures,
        "eval_seconds": round(seconds, 2),
    }


def seg_summary(result: dict[str, Any]) -> str:
    """The lines `trim eval --task seg` prints."""
    def miou(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    lines = [f"{result['name']}: seg/{result['split']}, {result['samples']} images, {result['objects']} objects "
             f"({'whole split' if result['complete'] else 'subset'}; {result['objects_empty']} empty at the model's "
             f"size, not scored)"]
    names = {"box": "box", "1click": "1-click", "nclick": f"{result['metrics'].get('nclick', {}).get('n_clicks')}-click"}
    for mode, m in result["metrics"].items():
        lines.append(f"{names[mode]:>8} mIoU {m['miou']:.4f}  (small {miou(m['small'])} n={m['n_small']}, medium "
                     f"{miou(m['medium'])} n={m['n_medium']}, large {miou(m['large'])} n={m['n_large']}; "
                     f"{result['size_buckets']['kind']} sizes)")
    if "nclick" in result["metrics"]:
        per_click = ", ".join(f"{v:.3f}" for v in result["metrics"]["nclick"]["miou_per_click"])
        lines.append(f"mIoU after 1..N clicks: {per_click}")
    c = result["cost_ratio"]
    lines.append(f"encoder cost ratio mean {c['mean']:.3f} (min {c['min']:.3f}, max {c['max']:.3f})")
    s = result["speed"]
    if s:
        parts = []
        for key in (f"batch{b}" for b in SPEED_BATCHES):
            e = s[key]
            if "speedup" in e:
                parts.append(f"batch {e['batch_size']}: trimmed {e['trimmed_ms']:.2f} vs full {e['full_ms']:.2f} ms "
                             f"= {e['speedup']:.2f}x")
            else:
                parts.append(f"batch {e['batch_size']}: full {e['full_ms']:.2f} ms ({e['full_images_per_s']:.1f} "
                             "images/s)")
        note = "" if s["trimmed"] else "; no trimming in this model"
        lines.append(f"encoder speed {'; '.join(parts)} ({s['device']}, median of {s['repeats']}{note})")
    lines.append(f"wrote {result['path']} (+ {len(result['figures'])} figure) in {result['eval_seconds']:.1f}s")
    return "\n".join(lines)
