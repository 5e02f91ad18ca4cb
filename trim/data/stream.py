"""Streaming shards into batches: ``build_loader``.

The pipeline is assembled from webdataset's pieces rather than ``wds.WebDataset`` so that
every choice is explicit:

shard order
    eval: the listed order, split by node (rank) then by DataLoader worker, read once:
    disjoint and complete. train, ``resampled=True`` (default): every worker draws shards
    with replacement from all shards (seeded by seed, epoch, rank, worker), so ranks never
    run out of data at different times. train, ``resampled=False``: one permutation of the
    shards per epoch, shared by all ranks (the ``shardshuffle`` of ``wds.WebDataset``, made
    explicit), split by node and worker and repeated until the epoch is full.
grouping
    ``tar_file_expander`` (webdataset 1.0) yields ``{}`` after a shard that ended cleanly
    and nothing after one that raised (the error goes to the handler). Our grouper flushes
    a sample on that marker, on a new key and on a new shard url; a sample flushed by a url
    change or by the end of the stream without the marker came from a shard that was cut
    short, and if it is incomplete it is reported as ``truncated``. A new url also keeps two
    shards whose keys restart from the same name from being merged into one sample.
corrupt samples
    skipped, counted by reason, and logged (logger ``trim.data``) with shard url and key.
    Counts live where the sample was read (a worker process); each batch carries the
    worker's counts since its previous batch, and the loader adds them to ``loader.stats``,
    so the totals are right for any ``num_workers``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import braceexpand
import torch
import webdataset as wds
from webdataset.tariterators import base_plus_ext, tar_file_expander, url_opener

from trim.data.decode import Collate, Decoder, SkipSample
from trim.data.shards import ANSWERS_FILE, MANIFEST_FILE
from trim.data.tokenizer import load_tokenizer
from trim.errors import ConfigError, DataError
from trim.ranks import rank_and_world

log = logging.getLogger("trim.data")

TASKS = ("vqa", "nlvr2", "seg")
MODES = ("train", "eval")
_STATS_KEY = "_skips"


# ------------------------------------------------------------------ skip accounting


class SkipStats:
    """Running totals: samples decoded, samples skipped by reason, shard reads that ended early."""

    def __init__(self) -> None:
        self.samples = 0
        self.skipped: Counter[str] = Counter()
        self.shard_errors = 0

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, delta: dict[str, Any]) -> None:
        self.samples += delta["samples"]
        self.skipped.update(delta["skipped"])
        self.shard_errors += delta["shard_errors"]

    def as_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "skipped": dict(self.skipped), "shard_errors": self.shard_errors}

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items())) or "none"
        return f"{self.samples} samples read, {self.total_skipped} skipped ({reasons}), {self.shard_errors} shards cut short"

    def __repr__(self) -> str:
        return f"SkipStats({self.as_dict()})"


class _StreamCounters:
    """Counts kept where the stream runs (a worker copy); handed out as deltas with batches."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.samples, self.skipped, self.shard_errors = 0, Counter(), 0

    def skip(self, reason: str, url: str, key: str, detail: str) -> None:
        self.skipped[reason] += 1
        log.warning("skipped sample %r in shard %s: %s (%s)", key, url, reason, detail)

    def shard_error(self, url: str, exn: BaseException) -> None:
        self.shard_errors += 1
        log.warning("shard %s is cut short or unreadable (%s: %s); its remaining samples are lost",
                    url, type(exn).__name__, exn.args[0] if exn.args else "")  # fmt: skip

    def take(self) -> dict[str, Any]:
        delta = {"samples": self.samples, "skipped": dict(self.skipped), "shard_errors": self.shard_errors}
        self.reset()
        return delta


# ------------------------------------------------------------------ pipeline stages
# Module-level functions and small classes only: workers may receive the pipeline pickled.


class _ShardErrorHandler:
    def __init__(self, counters: _StreamCounters):
        self.counters = counters

    def __call__(self, exn: BaseException) -> bool:
        # tar_file_expander appends (stream, url) to the error's args. The same failure is
        # first seen by tar_file_iterator, which only knows the file object: that call is
        # left to the expander's, which names the shard.
        urls = [a for a in exn.args[1:] if isinstance(a, str)]
        if urls:
            self.counters.shard_error(urls[-1], exn)
        else:
            log.debug("tar read error (reported again with its shard): %s", exn)
        return True  # go on with the next shard


def _open_failed(exn: BaseException) -> bool:
    url = exn.args[-1] if exn.args else "?"
    raise DataError(f"cannot open shard {url} ({type(exn).__name__}: {exn.args[0] if exn.args else ''}); "
                    "check the path and that the file is readable") from exn  # fmt: skip


class _SplitByNode:
    """Every ``world``-th shard from ``rank`` (rank/world fixed when the loader is built)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        for i, item in enumerate(src):
            if i % self.world == self.rank:
                yield item


def _worker_info() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class _WorkerSeed:
    def __init__(self, rank: int):
        self.rank = rank

    def __call__(self) -> int:
        return self.rank * 1000 + _worker_info()[0]


def _group_samples(files: Iterator[dict]) -> Iterator[dict]:
    current: dict | None = None
    for item in files:
        if not item:  # {}: tar_file_expander's marker for a shard that ended cleanly
            if current is not None:
                yield current
            current = None
            continue
        url, fname = item["__url__"], item["fname"]
        prefix, suffix = base_plus_ext(fname)
        if prefix is None:
            continue  # a file without an extension belongs to no sample
        if current is not None and url != current["__url__"]:
            current["__truncated__"] = True  # new shard without an end marker: the last one broke off
            yield current
            current = None
        if current is not None and prefix != current["__key__"]:
            yield current
            current = None
        if current is None:
            current = {"__key__": prefix, "__url__": url}
        suffix = suffix.lower()
        if suffix in current:
            current["__duplicate__"] = f"{fname} appears twice"
        current[suffix] = item["data"]
    if current is not None:
        current["__truncated__"] = True  # the stream ended without the last shard's end marker
        yield current


class _Shuffle:
    """Sample shuffle buffer (webdataset's), seeded per seed/epoch/rank/worker for reproducibility."""

    def __init__(self, bufsize: int, seed: int, rank: int):
        self.bufsize, self.seed, self.rank, self.epoch = bufsize, seed, rank, 0

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        rng = random.Random(wds.utils.make_seed(self.seed, self.epoch, self.rank, _worker_info()[0]))
        return wds.filters._shuffle(src, bufsize=self.bufsize, initial=min(self.bufsize, 100), rng=rng)


def _decode_samples(src: Iterator[dict], decoder: Decoder, counters: _StreamCounters) -> Iterator[dict]:
    for sample in src:
        try:
            decoded = decoder(sample)
        except SkipSample as skip:
            counters.skip(skip.reason, sample.get("__url__", "?"), sample.get("__key__", "?"), skip.detail)
            continue
        counters.samples += 1
        yield decoded


class _CollateWithCounts:
    def __init__(self, collate: Collate, counters: _StreamCounters):
        self.collate, self.counters = collate, counters

    def __call__(self, samples: list[dict]) -> dict:
        batch = self.collate(samples)
        batch[_STATS_KEY] = self.counters.take()
        return batch


def _flush_counts(src: Iterator[dict], counters: _StreamCounters) -> Iterator[dict]:
    yield from src
    # Skips after a worker's last batch (or in a worker that made none) still reach the totals.
    delta = counters.take()
    if delta["samples"] or delta["skipped"] or delta["shard_errors"]:
        yield {_STATS_KEY: delta}


# ------------------------------------------------------------------ sources


def _is_local(url: str) -> bool:
    return url.startswith("file://") or ("://" not in url and not url.startswith("pipe:"))


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Shard urls of ``'a-{000..009}.tar::b.tar'`` (or a list); checks every local shard.

    A source that expands to nothing, a missing shard and a shard with no samples are
    errors naming them: they mean a wrong path or an unfinished write, not bad luck.
    """
    sources = urls.split("::") if isinstance(urls, str) else list(urls)
    shards: list[str] = []
    for i, source in enumerate(sources):
        expanded = [u for u in braceexpand.braceexpand(source.strip())] if source.strip() else []
        if not expanded:
            raise DataError(f"source {i + 1} of {urls!r} is empty; remove the stray '::' or name its shards")
        shards.extend(expanded)
    local = [u.removeprefix("file://") for u in shards if _is_local(u)]
    missing = [u for u in local if not os.path.isfile(u)]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DataError(f"{len(missing)} shard(s) of {urls!r} do not exist: {shown}; "
                        "check the path or write the shards with `trim data synth` / a converter")  # fmt: skip
    for path in local:
        if not _tar_has_members(path):
            raise DataError(f"shard {path} holds no samples (empty or not a tar file); "
                            "rewrite it or leave it out of the urls")  # fmt: skip
    return shards


def _tar_has_members(path: str) -> bool:
    import tarfile

    try:
        with tarfile.open(path, "r|*") as tar:
            return tar.next() is not None
    except (tarfile.TarError, OSError, EOFError):
        # A header that does not parse: let the stream report it as a cut-short shard.
        return os.path.getsize(path) > 0


def _manifest_count(shards: list[str]) -> int | None:
    """Samples in ``shards`` according to their manifests (None if any shard is unknown)."""
    total, manifests = 0, {}
    for url in shards:
        path = Path(url.removeprefix("file://"))
        root = path.parent.parent
        if root not in manifests:
            try:
                manifests[root] = json.loads((root / MANIFEST_FILE).read_text())
            except (OSError, json.JSONDecodeError):
                return None
        split = path.name.rsplit("-", 1)[0]
        entry = manifests[root].get("tasks", {}).get(path.parent.name, {}).get(split, {})
        if path.name not in entry.get("shards", {}):
            return None
        total += entry["shards"][path.name]
    return total


def _answer_vocab(answer_vocab, shards: list[str]) -> list[str]:
    if answer_vocab is None:
        candidate = Path(shards[0].removeprefix("file://")).parent / ANSWERS_FILE
        if not candidate.is_file():
            raise ConfigError(f"task 'vqa' needs an answer vocabulary and {candidate} does not exist; "
                              "pass answer_vocab=<list or path to answers.json>")  # fmt: skip
        answer_vocab = candidate
    if isinstance(answer_vocab, (str, Path)):
        answer_vocab = json.loads(Path(answer_vocab).read_text())
    return list(answer_vocab)


# ------------------------------------------------------------------ the loader


class ShardLoader:
    """Iterable of batches over shards; ``stats`` holds the running read/skip totals.

    Each ``iter()`` is one epoch. In train mode the epoch has ``batches_per_epoch``
    batches and the shard/shuffle seeds change with the epoch (``set_epoch`` to resume).
    """

    def __init__(self, loader: wds.WebLoader, dataset: wds.DataPipeline, *, mode: str, shards: list[str],
                 batches_per_epoch: int | None, seed: int, seeded: list[Any]):  # fmt: skip
        self.loader, self.dataset, self.mode, self.shards = loader, dataset, mode, shards
        self.batches_per_epoch, self.seed = batches_per_epoch, seed
        self.stats = SkipStats()
        self.epoch = 0
        self._seeded = seeded  # stages whose seed follows the epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def manifest_samples(self) -> int | None:
        """Samples the manifests list for these shards (None if a shard has no manifest entry):
        what a complete eval pass would read, to compare with ``stats.samples``."""
        return _manifest_count(self.shards)

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("an eval-mode loader reads each shard once; its number of batches is not known in advance")
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for stage in self._seeded:
            if isinstance(stage, (_Shuffle, Decoder)):
                stage.epoch = self.epoch
            else:  # shard lists: wds.ResampledShards / wds.SimpleShardList
                stage.seed = wds.utils.make_seed(self.seed, self.epoch)
        self.epoch += 1
        for batch in self.loader:
            delta = batch.pop(_STATS_KEY, None)
            if delta is not None:
                self.stats.merge(delta)
            if batch:
                yield batch


def build_loader(
    urls: str | Sequence[str],
    task: str,
    *,
    tokenizer=None,
    batch_size: int,
    mode: str,
    image_size: int,
    answer_vocab: Sequence[str] | str | Path | None = None,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    epoch_samples: int | None = None,
    max_text_len: int = 40,
    seed: int = 0,
    resampled: bool = True,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    rank: int | None = None,
    world_size: int | None = None,
    relevance_grid: int | None = None,
    seg_objects: int | None = None,
) -> ShardLoader:
    """Batches of one task from webdataset shards; see docs/data.md for the batch keys.

    ``urls``: brace patterns, several joined with ``::``. ``mode="eval"`` reads every sample
    exactly once over all ranks and workers; ``mode="train"`` streams shuffled samples,
    ``epoch_samples`` per epoch over all ranks (default: the manifest's count).
    ``tokenizer``: a ``PreTrainedTokenizerFast`` or a path for ``load_tokenizer``.
    ``rank``/``world_size`` override `trim.ranks.rank_and_world` (e.g. ``0``/``1`` for every
    rank to read the same stream and slice its batches itself).
    ``relevance_grid``: put the relevance masks the synthetic world stores onto this patch grid
    (batch key ``relevance``, trim.data.relevance); shards without masks give batches without it.
    ``seg_objects`` (seg): keep this many objects per image, padded into ``object_*`` tensors (chosen
    at random per epoch in train mode, the first ones in eval mode; trim.data.seg).
    """
    _check_arguments(task, mode, batch_size, image_size, num_workers, epoch_samples)
    shards = expand_urls(urls)
    rank, world = _reader(rank, world_size)
    workers = max(1, num_workers)
    if task != "seg":
        if tokenizer is None:
            raise ConfigError(f"task {task!r} has text: pass tokenizer= (trim.data.load_tokenizer(<shard dir>))")
        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(tokenizer)
    vocab = _answer_vocab(answer_vocab, shards) if task == "vqa" else []

    counters = _StreamCounters()
    stages, seeded = _shard_stages(shards, mode=mode, resampled=resampled, seed=seed, rank=rank, world=world,
                                   workers=workers)  # fmt: skip
    stages += [
        partial(url_opener, handler=_open_failed),
        partial(tar_file_expander, handler=_ShardErrorHandler(counters), eof_value={}),
        _group_samples,
    ]
    if mode == "train" and shuffle_buffer > 1:
        shuffle = _Shuffle(shuffle_buffer, seed, rank)
        stages.append(shuffle)
        seeded.append(shuffle)
    if seg_objects is not None and (task != "seg" or seg_objects < 1):
        raise ConfigError(f"seg_objects={seg_objects}: a number >= 1 of objects per image, for task 'seg' only")
    collate = Collate(task, tokenizer, max_text_len=max_text_len, num_answers=len(vocab), mean=mean, std=std,
                      seg_objects=seg_objects)  # fmt: skip
    decoder = Decoder(task, image_size, {a: i for i, a in enumerate(vocab)}, relevance_grid=relevance_grid,
                      seg_objects=seg_objects, seg_shuffle=mode == "train", seed=seed)  # fmt: skip
    seeded.append(decoder)  # its object choice follows the epoch
    stages += [
        partial(_decode_samples, decoder=decoder, counters=counters),
        wds.batched(batch_size, collation_fn=_CollateWithCounts(collate, counters), partial=mode == "eval"),
    ]
    dataset = wds.DataPipeline(*stages)
    batches_per_epoch = None
    if mode == "train":
        per_worker = _batches_per_worker(shards, epoch_samples, world * workers * batch_size)
        dataset = dataset.with_epoch(per_worker)
        batches_per_epoch = per_worker * workers
    else:  # an eval pass ends: skips after the last batch still have to reach the totals
        dataset.append(partial(_flush_counts, counters=counters))

    loader = wds.WebLoader(dataset, batch_size=None, num_workers=num_workers,
                           persistent_workers=False, prefetch_factor=4 if num_workers else None)  # fmt: skip
    return ShardLoader(loader, dataset, mode=mode, shards=shards, batches_per_epoch=batches_per_epoch, seed=seed, seeded=seeded)


def _check_arguments(task: str, mode: str, batch_size: int, image_size: int, num_workers: int,
                     epoch_samples: int | None) -> None:  # fmt: skip
    if task not in TASKS:
        raise ConfigError(f"task={task!r}; choose one of {TASKS}")
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r}; choose 'train' (shuffled, sized by epoch_samples) or 'eval' (one exact pass)")
    if batch_size < 1 or image_size < 1 or num_workers < 0:
        raise ConfigError(f"batch_size={batch_size}, image_size={image_size}, num_workers={num_workers} must be positive")
    if mode == "eval" and epoch_samples is not None:
        raise ConfigError("epoch_samples sizes a training epoch; an eval loader reads each sample once, so leave it None")


def _reader(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world) this loader reads as: the arguments, else the process's own."""
    if (rank is None) != (world_size is None):
        raise ConfigError(f"rank={rank}, world_size={world_size}: give both or neither (neither = this process's rank)")
    rank, world = (rank, world_size) if rank is not None else rank_and_world()
    if not 0 <= rank < world:
        raise ConfigError(f"rank={rank} is outside world_size={world}")
    return rank, world


def _shard_stages(shards: list[str], *, mode: str, resampled: bool, seed: int, rank: int, world: int,
                  workers: int) -> tuple[list[Any], list[Any]]:  # fmt: skip
    """The stages that choose which shard urls this reader opens, and those of them seeded by the epoch."""
    if mode == "train" and resampled:
        source = wds.ResampledShards(shards, seed=seed, worker_seed=_WorkerSeed(rank), deterministic=True)
        return [source], [source]
    if mode == "train" and len(shards) < world * workers:
        raise DataError(f"{len(shards)} shards cannot feed {world} ranks x {workers} workers without resampling; "
                        "use resampled=True, fewer workers, or write smaller shards (--shard-size)")  # fmt: skip
    if mode == "eval" and len(shards) < world * workers:
        log.info("%d shards for %d ranks x %d workers: some readers get none", len(shards), world, workers)
    source = wds.SimpleShardList(shards, seed=seed if mode == "train" else None)
    return [source, _SplitByNode(rank, world), wds.split_by_worker], [source] if mode == "train" else []


def _batches_per_worker(shards: list[str], epoch_samples: int | None, samples_per_round: int) -> int:
    """Batches each worker yields per epoch so that all readers together read ``epoch_samples``."""
    if epoch_samples is None:
        epoch_samples = _manifest_count(shards)
        if epoch_samples is None:
            raise ConfigError("mode='train' needs epoch_samples= (the shards have no manifest.json to count them)")
    return max(1, math.ceil(epoch_samples / samples_per_round))
