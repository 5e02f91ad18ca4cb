"""NLVR2 (official JSON-lines + image folder) -> ``<out>/nlvr2`` shards.

Each line of ``train.json`` / ``dev.json`` / ``test1.json`` is an object with at least
``identifier`` (``<split>-<set>-<pair>-<sentence>``), ``sentence`` and ``label``
("True"/"False"); train lines also carry ``directory`` (the image subfolder). The two
images of an example are named from its identifier: ``<split>-<set>-<pair>-img0.png``
(left) and ``-img1.png`` (right). Identifiers are kept, so NLVR2's consistency metric
(all pairs of a sentence right) can be computed on the loader's output.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from trim.data.convert.common import Summary, ensure_tokenizer, image_extension, index_images, read_checked_image
from trim.data.shards import ShardSink
from trim.errors import DataError

PASSTHROUGH = ("synset", "query", "directory", "writer")


def image_names(identifier: str) -> tuple[str, str]:
    """(left, right) image file names of an NLVR2 identifier."""
    stem = identifier.rsplit("-", 1)[0]
    return f"{stem}-img0.png", f"{stem}-img1.png"


def _find(index: dict[str, Path], name: str) -> Path | None:
    # Some mirrors store the images as .jpg under the same stem.
    stem = name.rsplit(".", 1)[0]
    for candidate in (name, f"{stem}.jpg", f"{stem}.jpeg"):
        if candidate in index:
            return index[candidate]
    return None


def _label(value) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if str(value) in ("True", "False"):
        return str(value) == "True"
    raise ValueError(f"label {value!r} is not 'True' or 'False'")


def convert_nlvr2(
    out: str | Path,
    *,
    split: str,
    annotations: str | Path,
    images: str | Path,
    tokenizer: str | Path | None = None,
    shard_size: int = 1000,
    progress: bool = True,
) -> Summary:
    """Write one NLVR2 split; missing images are reported in the summary, not dropped silently."""
    out, annotations = Path(out), Path(annotations)
    if not annotations.is_file():
        raise DataError(f"NLVR2 annotation file {annotations} does not exist")
    rows, summary = [], Summary(f"nlvr2 {split}")
    for line_no, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            row["identifier"], row["sentence"] = str(row["identifier"]), str(row["sentence"])
            row["label"] = _label(row.get("label"))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exn:
            summary.skip("line not in the NLVR2 schema", f"{annotations.name}:{line_no} ({type(exn).__name__}: {exn})")
            continue
        rows.append(row)
    if not rows:
        raise DataError(f"{annotations} has no NLVR2 examples (JSON lines with identifier, sentence, label)")
    ensure_tokenizer(out, [r["sentence"] for r in rows], tokenizer)
    index = index_images(images)

    source = {"kind": "nlvr2", "annotations": str(annotations)}
    missing_files: set[str] = set()
    with ShardSink(out, "nlvr2", split, maxcount=shard_size, source=source) as sink:
        for row in tqdm(rows, desc=f"nlvr2 {split}", unit="example", disable=not progress):
            identifier = row["identifier"]
            names = image_names(identifier)
            paths = [_find(index, n) for n in names]
            if None in paths:
                absent = [name for name, path in zip(names, paths) if path is None]
                missing_files.update(absent)
                summary.skip("missing image", " + ".join(absent))
                continue
            data = [read_checked_image(p) for p in paths]
            if None in data:
                summary.skip("undecodable image", " / ".join(p.name for p, d in zip(paths, data) if d is None))
                continue
            record = {"identifier": identifier, "sentence": row["sentence"], "label": row["label"],
                      "left_image": paths[0].name, "right_image": paths[1].name}  # fmt: skip
            record.update({k: row[k] for k in PASSTHROUGH if k in row})
            sink.write({
                "__key__": identifier,
                f"left.{image_extension(paths[0])}": data[0],
                f"right.{image_extension(paths[1])}": data[1],
                "json": json.dumps(record),
            })  # fmt: skip
            summary.written += 1
    if missing_files:
        summary.notes.append(f"{len(missing_files)} distinct image files missing under {images}")
    print(summary.report())
    return summary
