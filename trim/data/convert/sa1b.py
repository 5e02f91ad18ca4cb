"""Segmentation data -> ``<out>/seg`` shards in the SA-1B per-image schema.

SA-1B ships ``sa_<n>.jpg`` beside ``sa_<n>.json``::

    {"image": {"image_id", "width", "height", "file_name"},
     "annotations": [{"id", "segmentation": {"size": [h, w], "counts": "<COCO RLE>"},
                      "bbox": [x, y, w, h], "area", "predicted_iou", "stability_score",
                      "point_coords": [[x, y]], "crop_box"}]}

COCO ``instances_*.json`` (polygons, or uncompressed RLE for crowds) is converted to the
same schema, compressed RLE, with ``category_id`` and ``iscrowd`` kept, for evaluating
segmentation on COCO. Images without any annotation are skipped and counted: a
prompted mask decoder has nothing to be evaluated on there.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from trim.data.convert.common import Summary, image_extension, index_images, load_json, read_checked_image
from trim.data.shards import ShardSink
from trim.errors import DataError


def _check_sa1b(record: dict) -> str | None:
    """What is wrong with an SA-1B record (None if it follows the schema)."""
    if not isinstance(record.get("image"), dict) or not isinstance(record.get("annotations"), list):
        return "needs 'image' (object) and 'annotations' (list)"
    info = record["image"]
    if not all(k in info for k in ("width", "height")):
        return "'image' needs width and height"
    for i, ann in enumerate(record["annotations"]):
        seg = ann.get("segmentation")
        if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg or "bbox" not in ann or "area" not in ann:
            return f"annotation {i} needs segmentation {{size, counts}} (RLE), bbox and area"
        if list(seg["size"]) != [info["height"], info["width"]]:
            return f"annotation {i} mask size {seg['size']} != image [height, width] {[info['height'], info['width']]}"
    return None


def convert_sa1b(
    out: str | Path,
    *,
    split: str,
    images: str | Path,
    annotations: str | Path | None = None,
    shard_size: int = 1000,
    progress: bool = True,
) -> Summary:
    """SA-1B folder(s) -> shards; ``annotations`` defaults to the image folder (as SA-1B unpacks)."""
    out, images = Path(out), Path(images)
    ann_dir = Path(annotations) if annotations is not None else images
    json_files = sorted(ann_dir.glob("*.json"))
    if not json_files:
        raise DataError(f"no SA-1B annotation files (*.json) in {ann_dir}")
    index = index_images(images)
    summary = Summary(f"sa1b {split}")
    with ShardSink(out, "seg", split, maxcount=shard_size, source={"kind": "sa1b", "images": str(images)}) as sink:
        for path in tqdm(json_files, desc=f"sa1b {split}", unit="image", disable=not progress):
            try:
                record = json.loads(path.read_text())
            except json.JSONDecodeError as exn:
                summary.skip("annotation file not valid JSON", f"{path.name} ({exn})")
                continue
            problem = _check_sa1b(record) if isinstance(record, dict) else "not a JSON object"
            if problem:
                summary.skip("annotation not in the SA-1B schema", f"{path.name}: {problem}")
                continue
            name = record["image"].get("file_name") or f"{path.stem}.jpg"
            image_path = index.get(name)
            if image_path is None:
                summary.skip("missing image", name)
                continue
            data = read_checked_image(image_path)
            if data is None:
                summary.skip("undecodable image", name)
                continue
            key = path.stem.replace(".", "_")  # webdataset splits keys at the first dot
            sink.write({"__key__": key, image_extension(image_path): data, "json": json.dumps(record)})
            summary.written += 1
    print(summary.report())
    return summary


def coco_to_rle(segmentation, height: int, width: int) -> dict:
    """COCO polygons / uncompressed RLE / compressed RLE -> compressed RLE with str counts."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):  # polygons: one object may have several parts
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = dict(segmentation)
    counts = rle["counts"]
    return {"size": [height, width], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def convert_coco(
    out: str | Path,
    *,
    split: str,
    instances: str | Path,
    images: str | Path,
    keep_crowd: bool = True,
    shard_size: int = 1000,
    progress: bool = True,
) -> Summary:
    """COCO instances JSON + image folder -> seg shards in the SA-1B schema."""
    out = Path(out)
    data = load_json(instances, what="COCO instances", required=("images", "annotations"))
    per_image: dict[int, list[dict]] = defaultdict(list)
    for ann in data["annotations"]:
        per_image[ann["image_id"]].append(ann)
    index = index_images(images)
    summary = Summary(f"coco {split}")
    source = {"kind": "coco", "instances": str(instances)}
    with ShardSink(out, "seg", split, maxcount=shard_size, source=source) as sink:
        images_by_id = sorted(data["images"], key=lambda i: i["id"])
        for info in tqdm(images_by_id, desc=f"coco {split}", unit="image", disable=not progress):
            anns = [a for a in per_image.get(info["id"], []) if keep_crowd or not a.get("iscrowd")]
            if not anns:
                summary.skip("no annotations", info["file_name"])
                continue
            image_path = index.get(info["file_name"])
            if image_path is None:
                summary.skip("missing image", info["file_name"])
                continue
            image_bytes = read_checked_image(image_path)
            if image_bytes is None:
                summary.skip("undecodable image", info["file_name"])
                continue
            h, w = int(info["height"]), int(info["width"])
            try:
                converted = [
                    {
                        "id": a["id"],
                        "segmentation": coco_to_rle(a["segmentation"], h, w),
                        "bbox": [float(v) for v in a["bbox"]],
                        "area": float(a["area"]),
                        "category_id": a.get("category_id"),
                        "iscrowd": int(a.get("iscrowd", 0)),
                    }
                    for a in anns
                ]
            except (KeyError, TypeError, ValueError, IndexError) as exn:
                summary.skip("annotation not in the COCO schema", f"{info['file_name']} ({type(exn).__name__}: {exn})")
                continue
            record = {"image": {"image_id": info["id"], "width": w, "height": h, "file_name": info["file_name"]},
                      "annotations": converted}  # fmt: skip
            sink.write({"__key__": str(info["id"]), image_extension(image_path): image_bytes, "json": json.dumps(record)})
            summary.written += 1
    print(summary.report())
    return summary
