"""Feeding the trainer: resumable training streams and rank slicing.

Data position. ``trim.data.build_loader(mode="train")`` is deterministic given
``(seed, epoch)``: an epoch has a fixed number of batches and its shard draws and shuffle
buffer are seeded from the seed and the epoch number. The trainer therefore records the
position as ``(epoch, batches taken in that epoch)``; on resume it sets the epoch and
skips that many batches (they are read and decoded, then dropped), which gives exactly the
batches the uninterrupted run would have seen next. Skipping costs reading time, at most
one epoch's worth.

Ranks (``data.rank_split``):

* ``batch`` (default): every rank reads the same stream of *global* batches
  (``batch_size x processes``) and keeps its contiguous slice. N processes see exactly the
  batches one process with the global batch sees; each rank decodes every sample.
* ``shards``: each rank reads its own share of the shards (webdataset's node split /
  per-rank resampling) with the per-rank batch size. Scales; the batches differ from a
  one-process run, so loss curves agree only statistically.

Periodic evaluation always reads the val split in ``batch`` layout (every rank walks the
same batches, evaluates its slice, and the sums are all-reduced), so every rank runs the
same number of forward passes, which ZeRO-3 needs.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from trim.config import DataConfig
from trim.ranks import slice_batch


def batch_size_of(batch: dict[str, Any]) -> int:
    return int(batch["pixel_values"].shape[0])


def no_reads() -> dict[str, Any]:
    return {"samples": 0, "skipped": {}, "shard_errors": 0}


def add_reads(*parts: dict[str, Any]) -> dict[str, Any]:
    """Sum of `trim.data.SkipStats.as_dict` records: samples decoded, skipped by reason, shards cut short."""
    skipped: Counter[str] = Counter()
    for part in parts:
        skipped.update(part.get("skipped", {}))
    return {"samples": sum(int(p.get("samples", 0)) for p in parts), "skipped": dict(sorted(skipped.items())),
            "shard_errors": sum(int(p.get("shard_errors", 0)) for p in parts)}


class TrainStream:
    """An endless, resumable stream of per-rank training batches over epochs of a loader."""

    def __init__(self, make_loader: Callable[[], Any], *, rank: int, world: int, per_rank: int, split: str,
                 epoch: int = 0, batch_in_epoch: int = 0) -> None:
        self.make_loader = make_loader
        self.rank, self.world, self.per_rank, self.split = rank, world, per_rank, split
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch
        self.loader = None
        self._it: Iterator | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        self._it = None

    def _start_epoch(self) -> None:
        if self.loader is None:
            self.loader = self.make_loader()
        self.loader.set_epoch(self.epoch)
        self._it = iter(self.loader)
        for _ in range(self.batch_in_epoch):  # resume mid-epoch: drop the batches already used
            next(self._it)
        if self.batch_in_epoch and hasattr(self.loader, "stats"):
            # Those batches' skips were counted before the checkpoint; reading them again adds nothing.
            self.loader.stats = type(self.loader.stats)()

    def reads(self) -> dict[str, Any]:
        """This process's reads since the stream opened: samples decoded, skipped by reason, shards cut short."""
        stats = getattr(self.loader, "stats", None)
        return stats.as_dict() if stats is not None else no_reads()

    def start(self) -> None:
        """Open the current epoch now (before RNG state is restored: opening a loader draws a seed)."""
        if self._it is None:
            self._start_epoch()

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> dict[str, Any]:
        for _ in range(2):
            if self._it is None:
                self._start_epoch()
            try:
                batch = next(self._it)
            except StopIteration:
                self.epoch, self.batch_in_epoch, self._it = self.epoch + 1, 0, None
                continue
            self.batch_in_epoch += 1
            if self.split == "batch" and self.world > 1:
                start, stop = self.rank * self.per_rank, (self.rank + 1) * self.per_rank
                batch = slice_batch(batch, start, stop)
            return batch
        raise RuntimeError("the training loader produced an empty epoch; check data.train and data.epoch_samples")


class DataSources:
    """A recipe's data section resolved to shard urls, tokenizer and answer vocabulary.

    Resolving reads only metadata (manifest, tokenizer.json, answers.json), so it runs
    before the model is built, and `check` can compare it with the model config.
    """

    def __init__(self, cfg: DataConfig) -> None:
        from trim.data import load_tokenizer, split_urls
        from trim.errors import ConfigError, DataError

        self.cfg = cfg
        root = Path(cfg.root) if cfg.root else None
        try:
            self.train_urls = cfg.train or split_urls(root, cfg.task, "train")
            self.val_urls = cfg.val
            if self.val_urls is None and root is not None and _has_split(root, cfg.task, cfg.val_split):
                self.val_urls = split_urls(root, cfg.task, cfg.val_split)
        except DataError as err:
            raise ConfigError(f"data.root={cfg.root!r}: {err}") from err
        self.tokenizer = None  # seg has no text
        tokenizer_path = cfg.tokenizer or (str(root) if root is not None else None)
        if tokenizer_path is None and cfg.task != "seg":
            raise ConfigError("data.tokenizer is unset and there is no data.root to find tokenizer.json in")
        if cfg.task != "seg":
            try:
                self.tokenizer = load_tokenizer(tokenizer_path, model_max_length=max(512, cfg.max_text_len))
            except DataError as err:
                raise ConfigError(f"data.tokenizer: {err}") from err
        self.answers: list[str] | None = None
        if cfg.task == "vqa":
            answers = cfg.answers
            if answers is None:
                first = self.train_urls.split("::")[0]
                candidates = [Path(first).parent / "answers.json"]
                if root is not None:
                    candidates.insert(0, root / "vqa" / "answers.json")
                answers = next((str(c) for c in candidates if c.is_file()), None)
            if answers is None or not Path(answers).is_file():
                raise ConfigError(f"data.answers={answers!r}: VQA needs its answer vocabulary (answers.json, written "
                                  "beside the shards); set data.answers to its path")
            self.answers = json.loads(Path(answers).read_text())

    def check(self, model_cfg: Any) -> None:
        """The model must fit the data: vocabulary, answer count."""
        from trim.errors import ConfigError

        if model_cfg.task == "seg":
            return  # no text, no answers: the image size is checked with the recipe
        vocab = len(self.tokenizer)
        if model_cfg.text.vocab_size < vocab:
            raise ConfigError(f"model.text.vocab_size={model_cfg.text.vocab_size} but the tokenizer has {vocab} tokens; "
                              f"set model.text.vocab_size >= {vocab}")
        if self.answers is not None and model_cfg.num_labels != len(self.answers):
            raise ConfigError(f"model.num_labels={model_cfg.num_labels} but the VQA answer vocabulary has "
                              f"{len(self.answers)} answers; set model.num_labels={len(self.answers)}")
        if model_cfg.task == "nlvr2" and model_cfg.num_labels != 2:
            raise ConfigError(f"model.num_labels={model_cfg.num_labels}: NLVR2 is true/false, set it to 2")

    def factories(self, *, seed: int, world: int) -> tuple[Callable[[], Any], Callable[[], Any] | None]:
        """Factories for the train loader and the (optional) val loader."""
        from trim.data import build_loader

        cfg = self.cfg
        common = dict(tokenizer=self.tokenizer, image_size=cfg.image_size, max_text_len=cfg.max_text_len,
                      answer_vocab=self.answers)
        if cfg.task == "seg":  # SAM's normalisation; objects padded into object_* tensors
            from trim.data.seg import SAM_PIXEL_MEAN, SAM_PIXEL_STD

            common.update(mean=SAM_PIXEL_MEAN, std=SAM_PIXEL_STD, seg_objects=cfg.seg_objects)
        batch_layout = cfg.rank_split == "batch"

        def make(urls: str, mode: str, batch_size: int, single: bool, **extra: Any) -> Any:
            kwargs = dict(common, batch_size=batch_size, mode=mode, num_workers=cfg.num_workers, seed=seed, **extra)
            if single:  # the batch layout: every rank reads the whole stream and slices it itself
                kwargs.update(rank=0, world_size=1)
            return build_loader(urls, cfg.task, **kwargs)

        def train_loader() -> Any:
            global_batch = cfg.batch_size * (world if batch_layout else 1)
            return make(self.train_urls, "train", global_batch, batch_layout, shuffle_buffer=cfg.shuffle_buffer,
                        epoch_samples=cfg.epoch_samples, resampled=cfg.resampled)

        def val_loader() -> Any:
            return make(self.val_urls, "eval", cfg.eval_batch_size * world, True)

        return train_loader, (val_loader if self.val_urls else None)


def _has_split(root: Path, task: str, split: str) -> bool:
    from trim.data import read_manifest

    return split in read_manifest(root).get("tasks", {}).get(task, {})
