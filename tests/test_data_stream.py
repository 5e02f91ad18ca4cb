"""Streaming: round trip, node x worker splitting, epochs, corrupt samples, errors."""

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from pycocotools import mask as mask_utils

from trim.data import build_loader, load_tokenizer, split_samples, split_urls, write_synthetic
from trim.data.answers import answer_scores
from trim.data.make_synthetic import nlvr2_samples, seg_samples, vqa_samples
from trim.errors import ConfigError, DataError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")
SEED, SIZE = 5, 48


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_synthetic(root, {"train": 40, "val": 10, "test": 6}, image_size=SIZE, seed=SEED, image_format="png",
                    shard_size=6, progress=False)  # fmt: skip
    return root


@pytest.fixture(scope="module")
def tokenizer(world):
    return load_tokenizer(world)


def pixels(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)


def unnormalise(pixel_values: torch.Tensor) -> torch.Tensor:
    """Back to uint8 (mean = std = 0.5): equal to the stored image if nothing was lost."""
    return torch.round((pixel_values * 0.5 + 0.5) * 255).to(torch.uint8)


def read_all(root, task, split, tokenizer, **kw):
    loader = build_loader(split_urls(root, task, split), task, tokenizer=tokenizer, batch_size=4, mode="eval",
                          image_size=SIZE, **kw)  # fmt: skip
    return loader, list(loader)


def test_vqa_round_trip_gives_the_written_samples(world, tokenizer):
    expected = list(vqa_samples(SEED, "train", 40, SIZE, image_format="png"))
    _, batches = read_all(world, "vqa", "train", tokenizer)
    vocab = json.loads((world / "vqa" / "answers.json").read_text())
    got = [(b, i) for b in batches for i in range(len(b["question_id"]))]
    assert len(got) == len(expected)
    for (batch, i), sample in zip(got, expected):
        record = json.loads(sample["json"])
        assert batch["question_id"][i] == record["question_id"] and batch["image_id"][i] == record["image_id"]
        assert batch["question"][i] == record["question"] and batch["question_type"][i] == record["question_type"]
        assert batch["answers"][i] == [a["answer"] for a in record["answers"]]
        assert torch.equal(unnormalise(batch["pixel_values"][i]), pixels(sample["png"]))
        ids = tokenizer(record["question"])["input_ids"]
        assert batch["input_ids"][i, : len(ids)].tolist() == ids and batch["attention_mask"][i].sum() == len(ids)
        target = torch.zeros(len(vocab))
        for answer, score in answer_scores(batch["answers"][i]).items():
            target[vocab.index(answer)] = score
        assert torch.equal(batch["labels"][i], target)
    assert batches[0]["pixel_values"].shape == (4, 3, SIZE, SIZE) and batches[0]["input_ids"].dtype == torch.long


def test_nlvr2_and_seg_round_trip(world, tokenizer):
    expected = list(nlvr2_samples(SEED, "val", 10, SIZE, image_format="png"))
    _, batches = read_all(world, "nlvr2", "val", tokenizer)
    got = [(b, i) for b in batches for i in range(len(b["identifier"]))]
    for (batch, i), sample in zip(got, expected, strict=True):
        record = json.loads(sample["json"])
        assert batch["identifier"][i] == record["identifier"] and batch["sentence"][i] == record["sentence"]
        assert batch["labels"][i].item() == int(record["label"])
        assert torch.equal(unnormalise(batch["pixel_values"][i, 1]), pixels(sample["right.png"]))

    expected = list(seg_samples(SEED, "val", 10, SIZE))
    _, batches = read_all(world, "seg", "val", None)
    got = [(b, i) for b in batches for i in range(len(b["image_id"]))]
    for (batch, i), sample in zip(got, expected, strict=True):
        record = json.loads(sample["json"])
        rles = [{**a["segmentation"], "counts": a["segmentation"]["counts"].encode()} for a in record["annotations"]]
        assert torch.equal(batch["masks"][i], torch.from_numpy(mask_utils.decode(rles).transpose(2, 0, 1)))
        x, y, w, h = torch.tensor([a["bbox"] for a in record["annotations"]]).T
        assert torch.equal(batch["boxes"][i], torch.stack([x, y, x + w, y + h], 1))
        assert batch["areas"][i].tolist() == [a["area"] for a in record["annotations"]]


def test_seg_masks_and_boxes_follow_a_resize(world):
    _, full = read_all(world, "seg", "test", None)
    loader = build_loader(split_urls(world, "seg", "test"), "seg", batch_size=4, mode="eval", image_size=SIZE // 2)
    half = list(loader)
    assert half[0]["pixel_values"].shape[-2:] == (SIZE // 2, SIZE // 2) and half[0]["masks"][0].shape[-2:] == (SIZE // 2, SIZE // 2)
    assert torch.allclose(half[0]["boxes"][0], full[0]["boxes"][0] / 2)
    assert torch.equal(half[0]["areas"][0], full[0]["areas"][0]), "areas stay in original pixels"
    assert torch.equal(half[0]["masks"][0], full[0]["masks"][0][:, 1::2, 1::2]), "nearest-exact: pixel centres"


def test_normalisation_mean_and_std_are_arguments(world):
    first = next(seg_samples(SEED, "test", 1, SIZE))
    loader = build_loader(split_urls(world, "seg", "test"), "seg", batch_size=2, mode="eval", image_size=SIZE,
                          mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # fmt: skip
    assert torch.allclose(next(iter(loader))["pixel_values"][0] * 255, pixels(first["png"]).float(), atol=1e-4)


def test_two_ranks_times_two_workers_read_every_sample_once(world, tokenizer, monkeypatch):
    everything = {json.loads(s["json"])["question_id"] for s in vqa_samples(SEED, "train", 40, SIZE, image_format="png")}
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader, batches = read_all(world, "vqa", "train", tokenizer, num_workers=2)
        ids = [q for b in batches for q in b["question_id"]]
        assert len(ids) == len(set(ids)) == loader.stats.samples
        per_rank.append(set(ids))
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == everything and all(per_rank)


def test_train_epochs_are_sized_resampled_and_reproducible(world, tokenizer, monkeypatch):
    def epoch_ids(loader):
        return [q for b in loader for q in b["question_id"]]

    urls = split_urls(world, "vqa", "train")
    kw = dict(tokenizer=tokenizer, batch_size=4, mode="train", image_size=SIZE, shuffle_buffer=20)
    loader = build_loader(urls, "vqa", epoch_samples=30, **kw)
    first, second = epoch_ids(loader), epoch_ids(loader)
    assert len(loader) == 8 and len(first) == len(second) == 32
    assert first != second, "the shard draw and the shuffle change with the epoch"
    assert epoch_ids(build_loader(urls, "vqa", epoch_samples=30, **kw)) == first, "same seed, same stream"
    assert len(build_loader(urls, "vqa", **kw)) == 10, "epoch size defaults to the manifest count"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert len(build_loader(urls, "vqa", epoch_samples=40, **kw)) == 3, "each rank reads its share"
    alone = build_loader(urls, "vqa", epoch_samples=30, rank=0, world_size=1, **kw)
    assert epoch_ids(alone) == first, "explicit rank/world_size override the environment"
    with pytest.raises(DataError, match="7 shards cannot feed 4 ranks x 2 workers without resampling"):
        build_loader(urls, "vqa", epoch_samples=40, num_workers=2, resampled=False, **kw)
    monkeypatch.setenv("WORLD_SIZE", "2")
    ranked = build_loader(urls, "vqa", epoch_samples=40, num_workers=2, resampled=False, **kw)
    ids = epoch_ids(ranked)
    assert len(ranked) == 6 and len(ids) == 6 * 4, "3 batches from each worker, its shards repeated as needed"
    assert {q // 10 % 2 for q in ids} <= {0, 1} and len(set(ids)) < len(ids)


def test_sources_joined_with_double_colon(world, tokenizer):
    urls = split_urls(world, "vqa", "val") + "::" + split_urls(world, "vqa", "test")
    loader = build_loader(urls, "vqa", tokenizer=tokenizer, batch_size=8, mode="eval", image_size=SIZE)
    ids = [q for b in loader for q in b["question_id"]]
    assert len(ids) == len(set(ids)) == split_samples(world, "vqa", "val") + split_samples(world, "vqa", "test")


# ---------------------------------------------------------------- corrupt data


def write_tar(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)


@pytest.fixture()
def corrupt_urls(world, tmp_path) -> tuple[str, dict]:
    good = list(vqa_samples(SEED, "val", 10, SIZE, image_format="png"))
    bad = tmp_path / "bad-000000.tar"
    write_tar(bad, [
        {**good[0], "__key__": "k0"},
        {**good[1], "__key__": "k1", "png": b"\x89PNG but not really"},    # undecodable image
        {"__key__": "k2", "png": good[2]["png"]},                          # no json
        {**good[3], "__key__": "k3", "json": b"{not json"},                # bad json
        {**good[4], "__key__": "k4"},
    ])  # fmt: skip
    cut = tmp_path / "bad-000001.tar"
    write_tar(cut, [{**good[5], "__key__": "x0"}, {**good[6], "__key__": "x1"}, {**good[7], "__key__": "x2"}])
    with tarfile.open(cut) as tar:
        member = tar.getmember("x2.png")
    cut.write_bytes(cut.read_bytes()[: member.offset_data + member.size // 2])  # ends inside x2.png
    # The next shard starts with the same key, x2: a grouper that ignored shard boundaries
    # would glue the broken x2 to this one.
    write_tar(tmp_path / "bad-000002.tar", [{**good[8], "__key__": "x2"}, {**good[9], "__key__": "x3"}])
    expected = {"samples": 2 + 2 + 2, "skipped": {"bad_image": 1, "missing_key": 1, "bad_json": 1, "truncated": 1}, "shard_errors": 1}
    return str(tmp_path / "bad-{000000..000002}.tar"), expected


def test_corrupt_samples_are_skipped_counted_and_logged(corrupt_urls, tokenizer, world, caplog):
    urls, expected = corrupt_urls
    vocab = world / "vqa" / "answers.json"
    with caplog.at_level(logging.WARNING, logger="trim.data"):
        loader = build_loader(urls, "vqa", tokenizer=tokenizer, answer_vocab=vocab, batch_size=4, mode="eval", image_size=SIZE)
        keys = [q for b in loader for q in b["question_id"]]
    assert len(keys) == 6 and loader.stats.as_dict() == expected
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for key, shard, reason in (("k1", "bad-000000.tar", "bad_image"), ("k2", "bad-000000.tar", "missing_key"),
                               ("k3", "bad-000000.tar", "bad_json"), ("x2", "bad-000001.tar", "truncated")):  # fmt: skip
        assert any(key in line and shard in line and reason in line for line in logged.splitlines()), (key, logged)
    assert "bad-000001.tar is cut short" in logged


def test_corrupt_counts_reach_the_main_process_from_workers(corrupt_urls, tokenizer, world):
    urls, expected = corrupt_urls
    loader = build_loader(urls, "vqa", tokenizer=tokenizer, answer_vocab=world / "vqa" / "answers.json", batch_size=4,
                          mode="eval", image_size=SIZE, num_workers=2)  # fmt: skip
    assert sum(len(b["question_id"]) for b in loader) == 6
    assert loader.stats.as_dict() == expected


# ---------------------------------------------------------------- errors


def test_bad_sources_are_errors_that_name_them(world, tokenizer, tmp_path):
    kw = dict(tokenizer=tokenizer, batch_size=2, mode="eval", image_size=SIZE)
    present = next((world / "vqa").glob("val-*.tar"))
    (tmp_path / "val-000000.tar").write_bytes(present.read_bytes())
    with pytest.raises(DataError, match=r"1 shard\(s\) of .* do not exist: \S*/val-000001\.tar; check the path"):
        build_loader(str(tmp_path / "val-{000000..000001}.tar"), "vqa", **kw)
    with pytest.raises(DataError, match="source 2 of .* is empty"):
        build_loader(split_urls(world, "vqa", "val") + "::", "vqa", **kw)
    (tmp_path / "empty.tar").write_bytes(b"\0" * 1024)
    with pytest.raises(DataError, match=r"empty\.tar holds no samples"):
        build_loader(str(tmp_path / "empty.tar"), "seg", **kw)
    with pytest.raises(ConfigError, match="choose one of"):
        build_loader(split_urls(world, "vqa", "val"), "caption", **kw)
    with pytest.raises(ConfigError, match="tokenizer"):
        build_loader(split_urls(world, "vqa", "val"), "vqa", batch_size=2, mode="eval", image_size=SIZE)
    with pytest.raises(ConfigError, match="answer_vocab"):  # no answers.json beside these shards
        build_loader(str(next((world / "nlvr2").glob("val-*.tar"))), "vqa", **kw)
