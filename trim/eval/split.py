"""The split `trim eval` reads: its shards and sample count, tokenizer, answer vocabulary, text length.

Everything is checked against the model before the pass: the tokenizer must fit the text
vocabulary, the VQA answer vocabulary must have one answer per class, an NLVR2 model must
have two labels.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trim.errors import ConfigError, DataError
from trim.eval.collect import PIXEL_MEAN, PIXEL_STD

DEFAULT_MAX_TEXT_LEN = 40  # when the checkpoint has no recipe (a bare save_model directory)


@dataclass
class EvalSplit:
    root: Path
    task: str
    name: str
    urls: Any  # what trim.data.build_loader reads
    shards: list[str]
    expected: int  # samples the manifest records for the split
    shard_counts: dict[str, int]
    tokenizer: Any
    answers: list[str] | None  # VQA answer vocabulary (class index -> answer)
    max_text_len: int

    def rank_total(self, rank: int, world: int) -> int:
        """Samples in the shards ``rank`` reads (build_loader gives rank r every world-th shard)."""
        return sum(int(self.shard_counts.get(Path(u).name, 0)) for u in self.shards[rank::world])

    def loader(self, cfg: Any, batch_size: int, workers: int) -> Any:
        from trim.data import build_loader

        return build_loader(self.urls, self.task, tokenizer=self.tokenizer, batch_size=batch_size, mode="eval",
                            image_size=cfg.vision.image_size, answer_vocab=self.answers, num_workers=workers,
                            max_text_len=self.max_text_len, mean=PIXEL_MEAN, std=PIXEL_STD,
                            relevance_grid=cfg.vision.grid)  # masks, where the shards have them


def read_split(root: Path, task: str, split: str, cfg: Any, recipe: dict[str, Any],
               answers: str | os.PathLike | None) -> EvalSplit:
    """The split ``task/split`` of the shard root ``root``, checked against the model config ``cfg``."""
    from trim.data import load_tokenizer, read_manifest
    from trim.data.shards import split_urls
    from trim.data.stream import expand_urls

    manifest = read_manifest(root)
    urls = split_urls(root, task, split)
    entry = manifest["tasks"][task][split]
    tokenizer = load_tokenizer(root)
    if len(tokenizer) > cfg.text.vocab_size:
        raise ConfigError(f"{root}/tokenizer.json has {len(tokenizer)} tokens but the model's text vocabulary has "
                          f"{cfg.text.vocab_size}; evaluate on shards written with the training tokenizer")
    vocab = _answer_vocab(root, answers, cfg) if task == "vqa" else None
    if task == "nlvr2" and cfg.num_labels != 2:
        raise ConfigError(f"an NLVR2 model needs 2 labels (False, True); this one has {cfg.num_labels}")
    return EvalSplit(root, task, split, urls, expand_urls(urls), int(entry["samples"]), entry.get("shards", {}),
                     tokenizer, vocab, _max_text_len(cfg, recipe))


def _answer_vocab(root: Path, answers: str | os.PathLike | None, cfg: Any) -> list[str]:
    path = Path(answers) if answers is not None else root / "vqa" / "answers.json"
    if not path.is_file():
        raise DataError(f"{path} does not exist; VQA predictions need the answer vocabulary the model was "
                        "trained with (pass --answers PATH)")
    try:
        vocab = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{path} is not readable JSON ({err}); pass the training answer vocabulary with --answers") \
            from err
    if len(vocab) != cfg.num_labels:
        raise ConfigError(f"{path} has {len(vocab)} answers but the model predicts {cfg.num_labels} "
                          "classes; pass the training vocabulary with --answers")
    return vocab


def _max_text_len(cfg: Any, recipe: dict[str, Any]) -> int:
    """The training recipe's data.max_text_len, clipped to the positions the text tower has."""
    text = cfg.text
    usable = text.max_positions - (text.pad_token_id + 1 if text.roberta_positions else 0)
    return min(int((recipe.get("data") or {}).get("max_text_len") or DEFAULT_MAX_TEXT_LEN), usable)
