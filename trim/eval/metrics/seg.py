"""Prompted (SAM-style) segmentation evaluation: box, 1 click and N clicks.

Protocol (SAM paper sec. 7.1, clicks simulated as in RITM's ``Clicker``):

* **box**: the ground-truth box (COCO ``bbox``, else the mask's tight box) as the only
  prompt, ``(x0, y0, x1, y1)`` in pixels with x1 = x + w.
* **1 click**: one positive click at the object's deepest interior point, i.e. the
  maximum of the Euclidean distance transform of the ground-truth mask.
* **N clicks**: after each prediction, with FN = gt & ~pred and FP = pred & ~gt,

      d_FN = EDT(FN), d_FP = EDT(FP)      (error masks padded with a zero border)
      positive = max d_FN > max d_FP
      next click = argmax of d_FN (positive) or d_FP (negative), first in row-major order

  so the click goes to the interior of the larger error region, "larger" measured the
  way RITM measures it: by how deep its interior is. Pixels already clicked are
  excluded. The model is re-run with all clicks so far. If the prediction is already
  exact no click is added and the mask is kept (RITM would add a degenerate click).

With several output masks the one with the highest predicted IoU is taken. Scores are
IoU = |pred & gt| / |pred | gt| averaged over objects (mIoU, a fraction in [0, 1]),
overall and per COCO size bucket: small area < 32**2, large area > 96**2, medium
otherwise, with the area from the annotation's ``area`` (else the mask's pixel count).

The model is a callable ``predict_fn(image, points, labels, box) -> (masks, iou_preds)``:
``points`` is a (K, 2) float array of (x, y) pixel coordinates (SAM's order) and
``labels`` a (K,) int array (1 positive, 0 negative), both None for the box prompt;
``box`` is a (4,) float array or None. ``masks`` is (M, H, W) (or (H, W)): booleans, or
logits thresholded at ``mask_threshold`` (0.0, SAM's); ``iou_preds`` is (M,).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy.ndimage import distance_transform_edt

__all__ = [
    "Click",
    "decode_rle",
    "mask_iou",
    "size_bucket",
    "next_click",
    "PromptedSegEvaluator",
    "evaluate_prompted",
    "SMALL_AREA",
    "LARGE_AREA",
    "MODES",
]

SMALL_AREA = 32**2
LARGE_AREA = 96**2
MODES = ("box", "1click", "nclick")
BUCKETS = ("small", "medium", "large")

PredictFn = Callable[
    [np.ndarray, "np.ndarray | None", "np.ndarray | None", "np.ndarray | None"],
    tuple[Any, Any],
]


class Click(NamedTuple):
    """One simulated click in (row, column) pixel coordinates."""

    y: int
    x: int
    is_positive: bool


def decode_rle(ann: Mapping[str, Any], height: int | None = None, width: int | None = None) -> np.ndarray:
    """Decode a COCO annotation's ``segmentation`` to a bool (H, W) mask with pycocotools.

    Handles compressed RLE (``counts`` bytes or str), uncompressed RLE (``counts`` a list
    of run lengths, column-major, starting with a run of zeros) and polygons. Polygons
    carry no size, so ``height`` and ``width`` are required for them.
    """
    from pycocotools import mask as mask_utils  # C extension; only needed here

    segm = ann["segmentation"] if "segmentation" in ann else ann
    if isinstance(segm, Mapping):
        h, w = (int(v) for v in segm["size"])
        if isinstance(segm["counts"], list):  # uncompressed RLE -> compressed
            segm = mask_utils.frPyObjects(dict(segm), h, w)
        rle = segm
    elif isinstance(segm, list):
        if height is None or width is None:
            raise ValueError("polygon segmentation has no size; pass height= and width= (the image's)")
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, int(height), int(width)))
    else:
        raise ValueError(f"unsupported segmentation of type {type(segm).__name__}; expected an RLE dict or polygons")
    with warnings.catch_warnings():
        # pycocotools' own numpy-2 copy= DeprecationWarning; nothing the caller can fix.
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """|pred & gt| / |pred | gt| of two boolean masks; 1.0 when both are empty."""
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: prediction {pred.shape} vs ground truth {gt.shape}")
    union = np.logical_or(pred, gt).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(pred, gt).sum() / union)


def size_bucket(area: float) -> str:
    """COCO size bucket: 'small' (< 32**2), 'large' (> 96**2) or 'medium'."""
    if area < SMALL_AREA:
        return "small"
    if area > LARGE_AREA:
        return "large"
    return "medium"


def _interior_distance(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of each mask pixel to the nearest non-mask pixel, with the
    outside of the image counted as non-mask (a zero border) so that regions cut by the
    image edge do not look deeper than they are."""
    return distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]


def next_click(pred_mask: np.ndarray, gt_mask: np.ndarray, clicks: Sequence[Click] = ()) -> Click | None:
    """The next simulated click (RITM protocol, see the module docstring).

    Args:
        pred_mask: current prediction (H, W); for the first click pass an all-False mask.
        gt_mask: ground truth (H, W).
        clicks: clicks made so far, as ``Click`` or ``(y, x, is_positive)``; their pixels
            are never chosen again.

    Returns:
        ``Click(y, x, is_positive)``, or None when no unclicked error pixel is left.
    """
    pred, gt = np.asarray(pred_mask, dtype=bool), np.asarray(gt_mask, dtype=bool)
    if pred.shape != gt.shape or gt.ndim != 2:
        raise ValueError(f"expected two (H, W) masks of the same shape, got {pred.shape} and {gt.shape}")
    fn_dist = _interior_distance(gt & ~pred)
    fp_dist = _interior_distance(pred & ~gt)
    for y, x, *_ in clicks:
        fn_dist[y, x] = fp_dist[y, x] = 0.0
    fn_max, fp_max = fn_dist.max(), fp_dist.max()
    if fn_max == 0 and fp_max == 0:
        return None
    is_positive = bool(fn_max > fp_max)  # ties go negative, as in RITM
    dist = fn_dist if is_positive else fp_dist
    y, x = np.unravel_index(np.argmax(dist), dist.shape)  # first maximum in row-major order
    return Click(int(y), int(x), is_positive)


def _box_xyxy(sample: Mapping[str, Any], gt: np.ndarray) -> np.ndarray:
    if sample.get("bbox") is not None:
        x, y, w, h = (float(v) for v in sample["bbox"])  # COCO xywh
        return np.array([x, y, x + w, y + h], dtype=np.float32)
    ys, xs = np.nonzero(gt)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


class PromptedSegEvaluator:
    """Runs the prompted protocol sample by sample and accumulates per-object IoUs.

    ``update(sample)`` takes a mapping with ``image`` (H, W, 3) and either ``mask``
    (H, W) or a COCO ``segmentation`` (plus optional ``bbox`` and ``area``; a COCO
    annotation dict with the image added works as is). ``compute()`` returns, per mode,
    ``{'miou', 'small', 'medium', 'large', 'n', 'n_small', 'n_medium', 'n_large',
    'ious'}`` (a bucket's mIoU is None when it has no object); ``nclick`` adds
    ``n_clicks`` and ``miou_per_click`` (mIoU after 1..N clicks).
    """

    def __init__(
        self,
        predict_fn: PredictFn,
        n_clicks: int = 5,
        modes: Iterable[str] = MODES,
        mask_threshold: float = 0.0,
    ) -> None:
        self.modes = tuple(modes)
        unknown = [m for m in self.modes if m not in MODES]
        if unknown or not self.modes:
            raise ValueError(f"unknown prompt mode(s) {unknown}; choose from {MODES}")
        if n_clicks < 1:
            raise ValueError(f"n_clicks must be >= 1, got {n_clicks}")
        self.predict_fn = predict_fn
        self.n_clicks = n_clicks
        self.mask_threshold = mask_threshold
        self.areas: list[float] = []
        self.ious: dict[str, list[float]] = {m: [] for m in self.modes}
        self.click_ious: list[list[float]] = []  # per object, IoU after 1..n_clicks clicks

    def _predict(self, image: np.ndarray, points, labels, box) -> np.ndarray:
        masks, iou_preds = self.predict_fn(image, points, labels, box)
        masks = np.asarray(masks)
        if masks.ndim == 2:
            masks = masks[None]
        iou_preds = np.atleast_1d(np.asarray(iou_preds, dtype=np.float64))
        if masks.ndim != 3 or len(iou_preds) != len(masks):
            raise ValueError(
                f"predict_fn must return masks (M, H, W) and iou_preds (M,), got {masks.shape} and {iou_preds.shape}"
            )
        best = masks[int(np.argmax(iou_preds))]
        return best if best.dtype == bool else best > self.mask_threshold

    def _click_trajectory(self, image: np.ndarray, gt: np.ndarray, n_clicks: int) -> list[float]:
        """IoU after each of ``n_clicks`` simulated clicks."""
        pred = np.zeros_like(gt)
        clicks: list[Click] = []
        ious: list[float] = []
        for _ in range(n_clicks):
            click = next_click(pred, gt, clicks)
            if click is not None:  # None: prediction already exact, keep it
                clicks.append(click)
                points = np.array([[c.x, c.y] for c in clicks], dtype=np.float32)
                labels = np.array([int(c.is_positive) for c in clicks], dtype=np.int64)
                pred = self._predict(image, points, labels, None)
            ious.append(mask_iou(pred, gt))
        return ious

    def update(self, sample: Mapping[str, Any]) -> dict[str, float]:
        """Evaluate one object; returns its IoU per mode."""
        image = np.asarray(sample["image"])
        if "mask" in sample:
            gt = np.asarray(sample["mask"], dtype=bool)
        else:
            gt = decode_rle(sample, height=image.shape[0], width=image.shape[1])
        if gt.shape != image.shape[:2]:
            raise ValueError(f"mask shape {gt.shape} does not match image shape {image.shape[:2]}")
        if not gt.any():
            raise ValueError("ground-truth mask is empty; no box or click can be derived from it")
        area = float(sample["area"]) if sample.get("area") is not None else float(gt.sum())

        result: dict[str, float] = {}
        if "box" in self.modes:
            result["box"] = mask_iou(self._predict(image, None, None, _box_xyxy(sample, gt)), gt)
        if "nclick" in self.modes:
            trajectory = self._click_trajectory(image, gt, self.n_clicks)
            self.click_ious.append(trajectory)
            result["nclick"] = trajectory[-1]
            if "1click" in self.modes:  # the first click is the same; don't run it twice
                result["1click"] = trajectory[0]
        elif "1click" in self.modes:
            result["1click"] = self._click_trajectory(image, gt, 1)[0]

        self.areas.append(area)
        for mode in self.modes:
            self.ious[mode].append(result[mode])
        return result

    def compute(self) -> dict[str, dict[str, Any]]:
        """mIoU per mode, overall and per size bucket."""
        if not self.areas:
            raise ValueError("no samples were evaluated")
        buckets = [size_bucket(a) for a in self.areas]
        out: dict[str, dict[str, Any]] = {}
        for mode in self.modes:
            ious = self.ious[mode]
            res: dict[str, Any] = {"miou": float(np.mean(ious)), "n": len(ious)}
            for name in BUCKETS:
                chosen = [iou for iou, b in zip(ious, buckets) if b == name]
                res[name] = float(np.mean(chosen)) if chosen else None
                res[f"n_{name}"] = len(chosen)
            res["ious"] = list(ious)
            if mode == "nclick":
                res["n_clicks"] = self.n_clicks
                res["miou_per_click"] = [float(v) for v in np.mean(np.array(self.click_ious), axis=0)]
            out[mode] = res
        return out


def evaluate_prompted(
    predict_fn: PredictFn,
    samples: Iterable[Mapping[str, Any]],
    n_clicks: int = 5,
    modes: Iterable[str] = MODES,
    mask_threshold: float = 0.0,
) -> dict[str, dict[str, Any]]:
    """Evaluate ``predict_fn`` on ``samples`` with the prompted protocol; see
    ``PromptedSegEvaluator`` for the sample format and the returned fields."""
    evaluator = PromptedSegEvaluator(predict_fn, n_clicks=n_clicks, modes=modes, mask_threshold=mask_threshold)
    for sample in samples:
        evaluator.update(sample)
    return evaluator.compute()
