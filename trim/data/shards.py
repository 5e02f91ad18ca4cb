"""The on-disk layout every writer in trim produces, and its manifest.

::

    <root>/manifest.json            counts per task/split, shard url patterns, per-shard counts
    <root>/tokenizer.json           text tokenizer (trim.data.tokenizer)
    <root>/<task>/<split>-%06d.tar  webdataset shards; task in {vqa, nlvr2, seg}
    <root>/vqa/answers.json         VQA answer vocabulary: list of strings, index = class id

The manifest is written last, after the shards are closed, so a manifest that names a
split means the split was written completely.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import webdataset as wds

from trim.errors import DataError

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "trim-shards/1"
ANSWERS_FILE = "answers.json"
TASKS = ("vqa", "nlvr2", "seg")
SPLITS = ("train", "val", "test")


def shard_pattern(root: str | Path, task: str, split: str) -> str:
    """printf pattern of a split's shard files, as ``wds.ShardWriter`` takes it."""
    return str(Path(root) / task / f"{split}-%06d.tar")


def _brace_url(task: str, split: str, n_shards: int) -> str:
    if n_shards == 1:
        return f"{task}/{split}-000000.tar"
    return f"{task}/{split}-{{000000..{n_shards - 1:06d}}}.tar"


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest of a shard directory (raises ``DataError`` naming what is wrong)."""
    path = Path(root) / MANIFEST_FILE
    if not path.is_file():
        raise DataError(
            f"{path} does not exist; write the directory with `trim data synth --out {root}` or a converter "
            f"(`trim data vqa2|nlvr2|sa1b|coco --out {root} ...`)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exn:
        raise DataError(f"{path} is not valid JSON ({exn}); rewrite the directory") from exn
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path} has format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    return manifest


def split_urls(root: str | Path, task: str, split: str) -> str:
    """Absolute brace-expandable shard url of one task/split, for ``build_loader``."""
    manifest = read_manifest(root)
    try:
        entry = manifest["tasks"][task][split]
    except KeyError:
        have = {t: sorted(s) for t, s in manifest.get("tasks", {}).items()}
        raise DataError(f"{Path(root) / MANIFEST_FILE} has no {task}/{split}; it holds {have}") from None
    return str(Path(root).resolve() / entry["url"])


def split_samples(root: str | Path, task: str, split: str) -> int:
    """Number of samples the manifest records for one task/split."""
    return int(read_manifest(root)["tasks"][task][split]["samples"])


def update_manifest(
    root: str | Path,
    task: str,
    split: str,
    shard_counts: Mapping[str, int],
    *,
    source: Mapping[str, Any] | None = None,
    answers: str | None = None,
) -> dict[str, Any]:
    """Record one written task/split (read-modify-write, so splits can be written one by one)."""
    root = Path(root)
    path = root / MANIFEST_FILE
    manifest = read_manifest(root) if path.is_file() else {"format": MANIFEST_FORMAT, "tasks": {}}
    names = sorted(shard_counts)
    manifest["tasks"].setdefault(task, {})[split] = {
        "samples": int(sum(shard_counts.values())),
        "url": _brace_url(task, split, len(names)),
        "shards": {name: int(shard_counts[name]) for name in names},
    }
    manifest["tokenizer"] = "tokenizer.json"
    if answers is not None:
        manifest.setdefault("answers", {})[task] = answers
    if source is not None:
        manifest.setdefault("sources", {}).setdefault(task, {})[split] = dict(source)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)  # a reader never sees a half-written manifest
    return manifest


class ShardSink:
    """``wds.ShardWriter`` for one task/split that remembers how many samples each shard got.

    Shards are byte-reproducible (fixed mtime and owner), so the same generator and seed
    give identical files. The mtime is an int: a float one makes tarfile add a PAX header
    to every member, which doubles the headers a reader has to parse. Old shards of the
    same split are removed first: a rewrite with fewer shards must not leave stale ones
    that a glob or an old url would still read.
    """

    def __init__(
        self,
        root: str | Path,
        task: str,
        split: str,
        *,
        maxcount: int = 1000,
        source: Mapping[str, Any] | None = None,
        answers: str | None = None,
        record: bool = True,
    ):
        if maxcount < 1:
            raise ValueError(f"maxcount={maxcount}: a shard must hold at least one sample")
        self.root, self.task, self.split, self.maxcount = Path(root), task, split, maxcount
        self.source, self.answers = source, answers
        self.record = record  # False: the caller records the split (several processes write one root)
        directory = self.root / task
        directory.mkdir(parents=True, exist_ok=True)
        stale = re.compile(rf"^{re.escape(split)}-\d{{6}}\.tar$")
        for name in os.listdir(directory):
            if stale.match(name):
                os.remove(directory / name)
        self.counts: dict[str, int] = {}
        self._writer: wds.ShardWriter | None = None

    def write(self, sample: dict[str, Any]) -> None:
        if self._writer is None:  # opened lazily: an empty split writes no empty shard
            self._writer = wds.ShardWriter(
                shard_pattern(self.root, self.task, self.split), maxcount=self.maxcount, verbose=0, mtime=0
            )
        self._writer.write(sample)
        name = os.path.basename(self._writer.fname)
        self.counts[name] = self.counts.get(name, 0) + 1

    def close(self) -> dict[str, int]:
        """Close the last shard and record the split in the manifest (if it has samples and ``record``)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.counts and self.record:
            update_manifest(self.root, self.task, self.split, self.counts, source=self.source, answers=self.answers)
        return self.counts

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        elif self._writer is not None:
            self._writer.close()  # keep what was written, but do not record an unfinished split
            self._writer = None
