"""Per-sample results of the eval pass: collected on each rank, merged on rank 0.

Each rank keeps compact arrays (ids, predictions, cost, kept tokens/heads per recorded layer,
relevance counts per token-trimmed image layer when the data carry relevance masks, the task's
extra columns) so they travel cheaply through ``all_gather_object``; rank 0 also
keeps what the kept-token overlays of the first few samples need. `merge` joins the ranks'
parts, drops duplicate ids (first wins) and sorts by id, so 1 and N processes agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from trim.models.base import MODEL_INPUTS
from trim.eval.errors import EvalError
from trim.eval.relevance import COUNT_FIELDS, layer_counts, patch_alive
from trim.models.streams import CROSS_IMAGE, IMAGE_STREAMS, TRIM_KEYS, VILT, split_record_name

# The loader's normalisation ((x / 255 - mean) / std); the overlays undo it.
PIXEL_MEAN = (0.5, 0.5, 0.5)
PIXEL_STD = (0.5, 0.5, 0.5)
# Per-sample columns each task keeps beside the prediction (what its metrics need).
EXTRA_KEYS = {"vqa": ("answers", "answer_type", "question_type"), "nlvr2": ("label", "loss")}


@dataclass
class KeptFigure:
    """What an overlay needs of one sample (kept on rank 0 for the first few samples)."""

    id: Any
    text: str
    prediction: str
    image: np.ndarray  # (images, H, W, 3) float in [0, 1]
    masks: dict[int, dict[Any, np.ndarray]]  # image index -> layer key -> (g, g) bool


def trimmed_layers(model: Any) -> dict[str, list[tuple[int, Any]]]:
    """Image stream -> [(layer, figure key)] of its token-trimmed layers (what the overlays show)."""
    cfg = model.config
    out: dict[str, list[tuple[int, Any]]] = {}
    for stream in IMAGE_STREAMS:
        if (stream == VILT) != (cfg.family == "vilt"):  # ViLT records only "vilt"; the dual model never does
            continue
        layers = sorted(getattr(cfg.trim, TRIM_KEYS[stream][0]))
        # Integer keys sort first in plot_kept_tokens: the vision tower's layers, then the cross layers.
        out[stream] = [(i, f"cross {i}" if stream == CROSS_IMAGE else i) for i in layers]
    return out


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _images(batch: dict[str, Any]) -> np.ndarray:
    """(B, images, H, W, 3) in [0, 1]: the batch's pixels with the loader's normalisation undone."""
    pixels = batch["pixel_values"].detach().float().cpu()
    if pixels.dim() == 4:
        pixels = pixels[:, None]  # one image per sample (VQA)
    mean = torch.tensor(PIXEL_MEAN).view(1, 1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(1, 1, 3, 1, 1)
    return (pixels * std + mean).clamp(0, 1).permute(0, 1, 3, 4, 2).numpy()


class Collector:
    """Per-sample results of one rank, as compact arrays for ``all_gather_object``."""

    def __init__(self, task: str, answers: list[str] | None, trimmed: dict[str, list[tuple[int, Any]]],
                 grid: int, n_figures: int) -> None:
        self.task, self.answers, self.grid = task, answers, grid
        self.trimmed = trimmed  # image stream -> [(layer, figure key)]
        self.n_figures = n_figures
        self.ids: list[Any] = []
        self.predictions: list[Any] = []
        self.cost: list[np.ndarray] = []  # what each sample's batch ran (padding, head unions)
        self.sample_cost: list[np.ndarray] = []  # what each sample kept on its own
        self.tokens: list[np.ndarray] = []
        self.heads: list[np.ndarray] = []
        self.layout: list[tuple[str, int]] | None = None  # (record name, layer) of each kept column
        self.extra: dict[str, list[Any]] = {key: [] for key in EXTRA_KEYS[task]}
        self.figures: list[KeptFigure] = []
        self.fixed_batch: dict[str, torch.Tensor] | None = None  # the batch the speed measurement times
        # (image stream, layer) of each token-trimmed image layer, in forward order: relevance's columns
        self.relevance_layers = [(stream, layer) for stream, layers in trimmed.items() for layer, _ in layers]
        self.relevance: list[np.ndarray] = []
        self.has_relevance = False

    @property
    def wants_alive(self) -> bool:
        """Whether the overlays still need alive positions."""
        return len(self.figures) < self.n_figures and any(self.trimmed.values())

    def track_alive(self, batch: dict[str, Any]) -> bool:
        """Whether the model must record alive positions for ``batch`` (overlays, relevance recall)."""
        return self.wants_alive or ("relevance" in batch and bool(self.relevance_layers))

    def add(self, batch: dict[str, Any], out: Any) -> None:
        if self.fixed_batch is None:
            self.fixed_batch = {k: batch[k].detach().clone() for k in MODEL_INPUTS if k in batch}
        n = int(batch["pixel_values"].shape[0])
        layout = self._check_layout(out.records)
        self.cost.append(_numpy(out.cost_ratio).astype(np.float64))
        self.sample_cost.append(_numpy(out.sample_cost).astype(np.float64))
        for column, field_name in ((self.tokens, "tokens"), (self.heads, "heads")):
            column.append(np.stack([_numpy(getattr(out.records[s][i], field_name)) for s, i in layout], 1)
                          if layout else np.zeros((n, 0)))
        self._add_relevance(batch, out.records, n)
        add_task = self._add_vqa if self.task == "vqa" else self._add_nlvr2
        predictions, texts = add_task(batch, out.logits.float())
        self.predictions += predictions
        if self.wants_alive:
            self._keep_figures(batch, out.records, texts, predictions)

    def _add_relevance(self, batch: dict[str, Any], records: dict[str, list[Any]], n: int) -> None:
        """This batch's relevance counts; zeros for a batch without masks (it adds nothing to the sums)."""
        shape = (n, len(self.relevance_layers), len(COUNT_FIELDS))
        if "relevance" in batch and self.relevance_layers:
            self.has_relevance = True
            self.relevance.append(layer_counts(records, batch["relevance"], self.relevance_layers, self.grid).numpy())
        else:
            self.relevance.append(np.zeros(shape))

    def _check_layout(self, records: dict[str, list[Any]]) -> list[tuple[str, int]]:
        layout = [(stream, i) for stream, recs in records.items() for i in range(len(recs))]
        if self.layout is None:
            self.layout = layout
        elif layout != self.layout:
            raise EvalError(f"the model recorded layers {layout[:4]}... in one batch and {self.layout[:4]}... in "
                            "another; kept-token statistics need the same layers every batch")
        return layout

    def _add_vqa(self, batch: dict[str, Any], logits: torch.Tensor) -> tuple[list[Any], list[str]]:
        predictions = [self.answers[k] for k in logits.argmax(-1).tolist()]
        self.ids += [int(q) for q in batch["question_id"]]
        for key in EXTRA_KEYS["vqa"]:
            self.extra[key].extend(batch[key])
        return predictions, batch["question"]

    def _add_nlvr2(self, batch: dict[str, Any], logits: torch.Tensor) -> tuple[list[Any], list[str]]:
        labels = batch["labels"].to(logits.device)
        # Difficulty for the cost figure; test splits have no label (-1), hence NaN.
        loss = torch.full((len(labels),), float("nan"))
        labelled = labels >= 0
        if labelled.any():
            loss[labelled.cpu()] = F.cross_entropy(logits[labelled], labels[labelled], reduction="none").cpu()
        self.ids += [str(i) for i in batch["identifier"]]
        self.extra["label"].extend(labels.cpu().tolist())
        self.extra["loss"].extend(loss.tolist())
        return (logits.argmax(-1) == 1).tolist(), batch["sentence"]

    def _keep_figures(self, batch: dict[str, Any], records: dict[str, list[Any]], texts: list[str],
                      predictions: list[Any]) -> None:
        images = _images(batch)
        ids = self.ids[-len(predictions):]
        for b in range(min(len(predictions), self.n_figures - len(self.figures))):
            masks = self._patch_masks(records, b)
            if masks:
                self.figures.append(KeptFigure(ids[b], str(texts[b]), str(predictions[b]), images[b], masks))

    def _patch_masks(self, records: dict[str, list[Any]], b: int) -> dict[int, dict[Any, np.ndarray]]:
        """Image index -> figure key -> which patches of sample ``b`` the layer processed."""
        g2 = self.grid * self.grid
        masks: dict[int, dict[Any, np.ndarray]] = {}
        for name, recs in records.items():
            stream, image_index = split_record_name(name)
            for layer, key in self.trimmed.get(stream, []):
                alive = recs[layer].alive
                if alive is None or alive.shape[1] < g2:
                    continue
                patch = patch_alive(alive, self.grid)[b].reshape(self.grid, self.grid).cpu().numpy().astype(bool)
                masks.setdefault(image_index or 0, {})[key] = patch
        return masks

    def payload(self, reading: dict[str, Any]) -> dict[str, Any]:
        """What this rank sends to rank 0; ``reading`` is the loader's statistics."""
        width = len(self.layout or [])

        def cat(xs: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
            return np.concatenate(xs, 0) if xs else np.zeros(shape)

        return {"ids": self.ids, "predictions": self.predictions, "extra": self.extra, "layout": self.layout,
                "cost": cat(self.cost, (0,)), "sample_cost": cat(self.sample_cost, (0,)), "tokens": cat(self.tokens, (0, width)),
                "heads": cat(self.heads, (0, width)), "stats": reading,
                "relevance": cat(self.relevance, (0, len(self.relevance_layers), len(COUNT_FIELDS)))
                if self.has_relevance else None, "relevance_layers": self.relevance_layers}


def merge(parts: list[dict[str, Any]], task: str) -> dict[str, Any]:
    """Concatenate the ranks' payloads, drop duplicate ids (first wins), sort by id."""
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

    def column(get: Callable[[dict[str, Any], int], Any]) -> list[Any]:
        return [get(parts[r], i) for r, i in where]

    def per_layer(key: str) -> np.ndarray:
        return np.array(column(lambda p, i: p[key][i]), dtype=np.float64).reshape(len(order), len(layout))

    merged = {
        "ids": order,
        "predictions": column(lambda p, i: p["predictions"][i]),
        "cost": np.array(column(lambda p, i: p["cost"][i]), dtype=np.float64),
        "sample_cost": np.array(column(lambda p, i: p["sample_cost"][i]), dtype=np.float64),
        "tokens": per_layer("tokens"),
        "heads": per_layer("heads"),
        "layout": layout,
        "duplicates": duplicates,
        "stats": _merge_reading([p["stats"] for p in parts]),
        "relevance": _merge_relevance(parts, where),
        "relevance_layers": parts[0]["relevance_layers"] if parts else [],
    }
    for key in EXTRA_KEYS[task]:
        merged[key] = column(lambda p, i, key=key: p["extra"][key][i])
    return merged


def _merge_relevance(parts: list[dict[str, Any]], where: list[tuple[int, int]]) -> np.ndarray | None:
    """Per-sample relevance counts in merged order, or None when no rank saw a relevance mask."""
    if all(p["relevance"] is None for p in parts):
        return None
    layers = len(parts[0]["relevance_layers"])
    rows = [np.zeros((layers, len(COUNT_FIELDS))) if parts[r]["relevance"] is None else parts[r]["relevance"][i]
            for r, i in where]
    return np.array(rows, dtype=np.float64).reshape(len(where), layers, len(COUNT_FIELDS))


def _merge_reading(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """The loaders' statistics summed over ranks."""
    total: dict[str, Any] = {"samples": 0, "skipped": {}, "shard_errors": 0}
    for s in stats:
        total["samples"] += s["samples"]
        total["shard_errors"] += s["shard_errors"]
        for reason, n in s["skipped"].items():
            total["skipped"][reason] = total["skipped"].get(reason, 0) + n
    return total
