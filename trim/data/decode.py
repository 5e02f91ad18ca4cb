"""Per-task decoding of one webdataset sample, and collation of decoded samples into a batch.

Runs inside the loader workers. A sample that cannot be used raises ``SkipSample`` with a
reason from ``SKIP_REASONS``; the stream counts it, logs it with its shard and key, and
goes on.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from trim.data.answers import soft_labels
from trim.data.relevance import RELEVANCE_FILE, patch_relevance, read_relevance_png
from trim.data.seg import choose_objects, letterbox_image, letterbox_masks, pad_objects, rle_total

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SKIP_REASONS = {
    "missing_key": "a file the task needs (image or json) is not in the sample",
    "truncated": "the shard ended in the middle of the sample",
    "bad_image": "the image bytes do not decode",
    "bad_json": "the json does not parse or lacks a required field",
    "duplicate_file": "the same file name appears twice in one sample",
    "bad_mask": "a segmentation mask (RLE) is malformed or does not match its image's size",
    "no_objects": "a segmentation sample has no object mask left at the model's image size (training)",
}


class SkipSample(Exception):
    def __init__(self, reason: str, detail: str):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _image_bytes(sample: Mapping[str, Any], prefix: str = "") -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if prefix + ext in sample:
            return sample[prefix + ext]
    have = sorted(k for k in sample if not k.startswith("__"))
    raise SkipSample("missing_key", f"no {prefix}{{{','.join(IMAGE_EXTENSIONS)}}} file; the sample has {have}")


def load_image(data: bytes, image_size: int) -> torch.Tensor:
    """uint8 (3, S, S) tensor, resized to a square of side ``image_size``."""
    try:
        image = Image.open(io.BytesIO(data))
        # JPEG can decode at 1/2, 1/4, 1/8 scale for free when the target is much smaller.
        image.draft("RGB", (image_size, image_size))
        image = image.convert("RGB")
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.BICUBIC)
    except (OSError, ValueError, Image.DecompressionBombError) as exn:
        raise SkipSample("bad_image", f"{type(exn).__name__}: {exn}") from None
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def _json(sample: Mapping[str, Any]) -> dict:
    if "json" not in sample:
        have = sorted(k for k in sample if not k.startswith("__"))
        raise SkipSample("missing_key", f"no json file; the sample has {have}")
    try:
        record = json.loads(sample["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise SkipSample("bad_json", str(exn)) from None
    if not isinstance(record, dict):
        raise SkipSample("bad_json", f"expected an object, got {type(record).__name__}")
    return record


def _field(record: Mapping[str, Any], name: str):
    if name not in record:
        raise SkipSample("bad_json", f"field {name!r} missing; the json has {sorted(record)}")
    return record[name]


def _label(value) -> int:
    """NLVR2 label (True/False, "True"/"False", or absent on an unlabelled split) -> 1/0/-1."""
    if value is None:
        return -1
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return int(value.lower() == "true")
    raise SkipSample("bad_json", f"label {value!r} is not True/False")


class Decoder:
    """Sample dict (bytes) -> decoded dict for one task. Picklable, so workers get a copy.

    ``relevance_grid``: decode the sample's relevance masks (trim.data.relevance), if it has
    any, onto this patch grid (key ``relevance``); None leaves them unread (training).
    ``seg_objects``: keep this many objects per seg image (all when None); ``seg_shuffle``
    chooses them at random, seeded by ``seed``, ``epoch`` (set by the loader) and the sample key.
    """

    def __init__(self, task: str, image_size: int, answer_to_id: Mapping[str, int] | None = None,
                 relevance_grid: int | None = None, *, seg_objects: int | None = None, seg_shuffle: bool = False,
                 seed: int = 0):  # fmt: skip
        self.task, self.image_size, self.answer_to_id = task, image_size, answer_to_id
        self.relevance_grid = relevance_grid
        self.seg_objects, self.seg_shuffle, self.seed, self.epoch = seg_objects, seg_shuffle, seed, 0

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        if "__duplicate__" in sample:
            raise SkipSample("duplicate_file", sample["__duplicate__"])
        try:
            return getattr(self, f"_{self.task}")(sample)
        except SkipSample as skip:
            if skip.reason == "missing_key" and sample.get("__truncated__"):
                raise SkipSample("truncated", skip.detail) from None
            raise

    def _vqa(self, sample):
        record = _json(sample)
        answers = record.get("answers") or []
        try:
            raw = [a["answer"] if isinstance(a, Mapping) else str(a) for a in answers]
        except KeyError:
            raise SkipSample("bad_json", "an entry of 'answers' has no 'answer'") from None
        return {
            "image": load_image(_image_bytes(sample), self.image_size),
            "question": str(_field(record, "question")),
            "question_id": int(_field(record, "question_id")),
            "image_id": record.get("image_id"),
            "question_type": str(record.get("question_type") or ""),
            "answer_type": str(record.get("answer_type") or ""),
            "answers": raw,
            "labels": soft_labels(raw, self.answer_to_id or {}),
            **self._relevance(sample, [""]),
        }

    def _nlvr2(self, sample):
        record = _json(sample)
        left = load_image(_image_bytes(sample, "left."), self.image_size)
        right = load_image(_image_bytes(sample, "right."), self.image_size)
        return {
            "images": torch.stack([left, right]),
            "sentence": str(_field(record, "sentence")),
            "identifier": str(_field(record, "identifier")),
            "label": _label(record.get("label")),
            **self._relevance(sample, ["left.", "right."]),
        }

    def _relevance(self, sample: Mapping[str, Any], prefixes: list[str]) -> dict[str, torch.Tensor]:
        """``{"relevance": bool (grid * grid,)}`` (one image; ``(images, grid * grid)`` for several, as
        ``image`` / ``images``), or nothing when not asked for or not stored."""
        names = [prefix + RELEVANCE_FILE for prefix in prefixes]
        if self.relevance_grid is None or not all(name in sample for name in names):
            return {}
        try:
            masks = [read_relevance_png(sample[name]) for name in names]
        except (OSError, ValueError) as exn:
            raise SkipSample("bad_image", f"relevance mask: {type(exn).__name__}: {exn}") from None
        patches = torch.stack([patch_relevance(mask, self.relevance_grid) for mask in masks])
        return {"relevance": patches if len(prefixes) > 1 else patches[0]}

    def _seg(self, sample):
        """SA-1B record -> letterboxed image, its objects' masks / boxes / points (docs/data.md).

        With ``seg_objects`` only that many usable objects (non-empty after the resize) are kept,
        chosen at random in training (`trim.data.seg.choose_objects`); an image with none is skipped.
        """
        from pycocotools import mask as mask_utils

        record = _json(sample)
        info = _field(record, "image")
        annotations = _field(record, "annotations")
        s = self.image_size
        try:
            width, height = int(info["width"]), int(info["height"])
            rles = [{"size": [int(v) for v in a["segmentation"]["size"]], "counts": a["segmentation"]["counts"]}
                    for a in annotations]  # fmt: skip
            boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
            areas = torch.tensor([float(a["area"]) for a in annotations], dtype=torch.float32)
            centres = (boxes[:, :2] + boxes[:, 2:] / 2).tolist()
            points = [a.get("point_coords") or [c] for a, c in zip(annotations, centres)]
        except (KeyError, TypeError, ValueError) as exn:
            raise SkipSample("bad_json", f"annotation not in the SA-1B schema ({type(exn).__name__}: {exn})") from None
        for i, rle in enumerate(rles):
            if rle["size"] != [height, width]:
                raise SkipSample("bad_mask", f"annotation {i}: mask size {rle['size']} != image size {[height, width]}")
            if rle_total(rle["counts"]) != height * width:
                raise SkipSample("bad_mask", f"annotation {i}: the RLE counts do not cover the {height}x{width} image")
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode("ascii")
            elif isinstance(rle["counts"], list):  # uncompressed RLE, as COCO crowd masks
                rles[i] = mask_utils.frPyObjects(rle, height, width)
        try:
            image, resized, original = letterbox_image(_image_bytes(sample), s)
        except (OSError, ValueError, Image.DecompressionBombError) as exn:
            raise SkipSample("bad_image", f"{type(exn).__name__}: {exn}") from None
        if original != (height, width):
            raise SkipSample("bad_json", f"'image' says {height}x{width} but the image is {original[0]}x{original[1]}")
        decoded = mask_utils.decode(rles) if rles else np.zeros((height, width, 0), np.uint8)
        masks = letterbox_masks(torch.from_numpy(np.ascontiguousarray(decoded.transpose(2, 0, 1))), resized, s)
        scale = torch.tensor([resized[1] / width, resized[0] / height] * 2)
        xyxy = torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1) * scale
        points = torch.tensor([p[0] for p in points], dtype=torch.float32).reshape(-1, 2) * scale[:2]
        key = str(sample.get("__key__", ""))
        attributes = ([{k: a[k] for k in ATTRIBUTE_KEYS} for a in annotations]
                      if all(k in a for a in annotations for k in ATTRIBUTE_KEYS) else None)
        if self.seg_objects is not None:
            usable = [i for i in range(masks.shape[0]) if masks[i].any()]
            if not usable:
                raise SkipSample("no_objects", f"none of the {masks.shape[0]} masks is left at {s}px")
            keep = choose_objects(usable, self.seg_objects, shuffle=self.seg_shuffle, seed=self.seed,
                                  epoch=self.epoch, key=key)  # fmt: skip
            masks, xyxy, points, areas = masks[keep], xyxy[keep], points[keep], areas[keep]
            attributes = None if attributes is None else [attributes[i] for i in keep]
        return {
            "image": image,
            "valid_size": resized,
            "original_size": original,
            "masks": masks,
            "boxes": xyxy,
            "points": points,
            "areas": areas,
            "image_id": info.get("image_id", key),
            "attributes": attributes,
        }


# The synthetic world's extra keys per object (trim pretrain-vision); real SA-1B / COCO have none.
ATTRIBUTE_KEYS = ("shape", "color", "size")
SEG_LIST_KEYS = ("masks", "boxes", "points", "areas", "image_id", "attributes", "valid_size", "original_size")
VQA_LIST_KEYS = ("question_id", "answers", "question_type", "answer_type", "question", "image_id")


def _relevance(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The batch's ``relevance`` if any sample has one; a sample without gets no relevant patch."""
    shapes = {s["relevance"].shape for s in samples if "relevance" in s}
    if not shapes:
        return {}
    (shape,) = shapes  # one grid per loader
    return {"relevance": torch.stack([s.get("relevance", torch.zeros(shape, dtype=torch.bool)) for s in samples])}


class Collate:
    """Decoded samples -> batch dict; tokenises the text of the whole batch at once."""

    def __init__(self, task: str, tokenizer, *, max_text_len: int, num_answers: int,
                 mean: Sequence[float], std: Sequence[float], seg_objects: int | None = None):  # fmt: skip
        self.task, self.tokenizer, self.max_text_len, self.num_answers = task, tokenizer, max_text_len, num_answers
        self.seg_objects = seg_objects  # seg: also the objects padded to this many per image (training)
        # (x / 255 - mean) / std as one subtraction and one multiplication, in place
        self.offset = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) * 255.0
        self.scale = 1.0 / (torch.tensor(std, dtype=torch.float32).view(3, 1, 1) * 255.0)

    def _pixels(self, images: list[torch.Tensor]) -> torch.Tensor:
        raw = torch.stack(images)
        out = torch.empty(raw.shape, dtype=torch.float32)
        if torch.utils.data.get_worker_info() is not None:
            # Written straight into shared memory, as torch's default_collate does: otherwise
            # the batch (113 MB at 64 x 384px) is copied once more to cross to the main process.
            out.share_memory_()
        return torch.sub(raw, self.offset, out=out).mul_(self.scale)

    def _text(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_text_len, return_tensors="pt")
        return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        if self.task == "vqa":
            labels = torch.zeros(len(samples), self.num_answers)
            for i, s in enumerate(samples):
                for class_id, score in s["labels"]:
                    labels[i, class_id] = score
            return {
                "pixel_values": self._pixels([s["image"] for s in samples]),
                **self._text([s["question"] for s in samples]),
                "labels": labels,
                **{k: [s[k] for s in samples] for k in VQA_LIST_KEYS},
                **_relevance(samples),
            }
        if self.task == "nlvr2":
            return {
                "pixel_values": self._pixels([s["images"] for s in samples]),
                **self._text([s["sentence"] for s in samples]),
                "labels": torch.tensor([s["label"] for s in samples], dtype=torch.long),
                "identifier": [s["identifier"] for s in samples],
                "sentence": [s["sentence"] for s in samples],
                **_relevance(samples),
            }
        return self._seg(samples)

    def _seg(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        pixels = self._pixels([s["image"] for s in samples])
        for i, s in enumerate(samples):  # SAM pads after normalising: the padding is 0, the mean colour
            h, w = s["valid_size"]
            pixels[i, :, h:, :] = 0
            pixels[i, :, :, w:] = 0
        if self.seg_objects is None:  # every object, as lists (evaluation)
            return {"pixel_values": pixels, **{k: [s[k] for s in samples] for k in SEG_LIST_KEYS}}
        per_image = {k: [s[k] for s in samples] for k in ("image_id", "valid_size", "original_size")}
        return {"pixel_values": pixels, **per_image, **pad_objects(samples, self.seg_objects)}
