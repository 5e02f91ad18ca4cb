"""The synthetic world: deterministic, and its answers agree with the rendered pixels."""

import hashlib
import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from trim.data import load_tokenizer, normalize_answer, read_manifest, soft_score, write_synthetic
from trim.data.answers import answer_scores, build_answer_vocab
from trim.data.synthetic import COLORS, SHAPES, SIZES, shape_mask
from trim.data.synthetic_text import vqa_answer_space

# pycocotools 2.0 + numpy 2 warn on every decode; the values are right.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")


def tar_samples(path: Path) -> list[dict]:
    """Samples of one shard, grouped by key, read with the standard library only."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    return list(samples.values())


def all_samples(root: Path, task: str, split: str) -> list[dict]:
    return [s for shard in sorted((root / task).glob(f"{split}-*.tar")) for s in tar_samples(shard)]


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def png_world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    write_synthetic(root, {"train": 60, "val": 12}, image_size=64, seed=3, image_format="png", shard_size=25, progress=False)
    return root


def test_generation_is_deterministic(tmp_path, png_world):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for root, seed in ((a, 0), (b, 0), (c, 1)):
        write_synthetic(root, {"train": 20, "val": 8}, image_size=48, seed=seed, shard_size=10, progress=False)
    same, other = digest(a), digest(c)
    assert same == digest(b)
    assert len(same) == 1 + 1 + 1 + 3 * (2 + 1)  # manifest, tokenizer, answers, 3 tasks x (2 train + 1 val) shards
    changed = [name for name in same if name.endswith(".tar") and same[name] != other[name]]
    assert len(changed) == 9, "another seed must give other samples in every shard"
    manifest = read_manifest(a)
    assert manifest["tasks"]["vqa"]["train"]["samples"] == 20
    assert manifest["tasks"]["nlvr2"]["val"]["shards"] == {"val-000000.tar": 8}



def test_writing_splits_in_parallel_gives_the_same_files(tmp_path):
    """`trim data synth --workers N`: each task/split in its own process; shards and manifest unchanged."""
    one, two = tmp_path / "one", tmp_path / "two"
    for root, workers in ((one, 1), (two, 2)):
        write_synthetic(root, {"train": 20, "val": 8}, image_size=48, shard_size=10, progress=False, workers=workers)
    assert digest(one) == digest(two) and len(digest(one)) == 12

# ----------------------------------------------------- answers against the pixels


def parse_objects(image: np.ndarray, record: dict) -> list[dict]:
    """Recover each object's attributes from the pixels under its mask (not from metadata)."""
    objects = []
    for ann in record["annotations"]:
        rle = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
        mask = mask_utils.decode(rle).astype(bool)
        mean = image[mask].mean(axis=0)
        color = min(COLORS, key=lambda c: np.abs(np.array(COLORS[c]) - mean).sum())
        assert np.abs(np.array(COLORS[color]) - mean).max() < 1, "a mask covers exactly one flat-coloured object"
        x, y = ann["point_coords"][0]
        size = min(SIZES, key=lambda s: abs(np.pi * (SIZES[s] * image.shape[0]) ** 2 * 0.6 - mask.sum()))

        def iou(shape: str) -> float:
            template = shape_mask(shape, x, y, SIZES[size] * image.shape[0], image.shape[0])
            return (template & mask).sum() / (template | mask).sum()

        shape = max(SHAPES, key=iou)
        ys, xs = np.nonzero(mask)
        objects.append({"color": color, "shape": shape, "size": size, "x": xs.mean(), "r": SIZES[size] * image.shape[0]})
    return objects


def refer(objects: list[dict], phrase: str) -> dict:
    words = phrase.split()
    attrs = {}
    for w in words:
        for kind, values in (("size", SIZES), ("color", COLORS), ("shape", SHAPES)):
            if w in values:
                attrs[kind] = w
    found = [o for o in objects if all(o[k] == v for k, v in attrs.items())]
    assert len(found) == 1, f"{phrase!r} must name exactly one object, names {len(found)}"
    return found[0]


def answer_from_pixels(question: str, objects: list[dict]) -> str:
    def count(**attrs) -> int:
        return sum(all(o[k] == v for k, v in attrs.items()) for o in objects)

    if m := re.fullmatch(r"what color is the (.+)\?", question):
        return refer(objects, m[1])["color"]
    if m := re.fullmatch(r"what is the shape of the (.+) object\?", question):
        return refer(objects, m[1])["shape"]
    if m := re.fullmatch(r"how many (\w+) objects are there\?", question):
        return str(count(color=m[1]))
    if m := re.fullmatch(r"how many (\w+)s are there\?", question):
        return str(count(shape=m[1]))
    if m := re.fullmatch(r"how many (\w+) (\w+)s are there\?", question):
        return str(count(color=m[1], shape=m[2]))
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
        return "yes" if count(color=m[1], shape=m[2]) else "no"
    if m := re.fullmatch(r"what is (left|right) of the (.+)\?", question):
        ref = refer(objects, m[2])
        beside = [o for o in objects if o is not ref and ((o["x"] < ref["x"]) == (m[1] == "left"))]
        assert len(beside) == 1
        return beside[0]["shape"]
    if m := re.fullmatch(r"is the (.+) (left|right) of the (.+)\?", question):
        a, b = refer(objects, m[1]), refer(objects, m[3])
        return "yes" if (a["x"] < b["x"]) == (m[2] == "left") else "no"
    raise AssertionError(f"question outside the templates: {question!r}")


def test_answers_agree_with_rendered_pixels(png_world):
    seg = {json.loads(s["json"])["image"]["image_id"]: s for s in all_samples(png_world, "seg", "train")}
    vqa = [s for s in all_samples(png_world, "vqa", "train") if json.loads(s["json"])["image_id"] in seg]
    assert len(vqa) >= 50
    kinds = Counter()
    for sample in vqa:
        record = json.loads(sample["json"])
        seg_sample = seg[record["image_id"]]
        image = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
        assert (image == np.asarray(Image.open(io.BytesIO(seg_sample["png"])).convert("RGB"))).all(), "same scene in both tasks"
        objects = parse_objects(image, json.loads(seg_sample["json"]))
        assert answer_from_pixels(record["question"], objects) == record["multiple_choice_answer"], record["question"]
        kinds[record["question_type"]] += 1
    assert len(kinds) >= 5, f"every question kind should occur: {kinds}"


def test_relevant_objects_are_the_ones_the_question_names(png_world):
    seg = {json.loads(s["json"])["image"]["image_id"]: json.loads(s["json"]) for s in all_samples(png_world, "seg", "train")}
    for sample in all_samples(png_world, "vqa", "train"):
        record = json.loads(sample["json"])
        if record["image_id"] not in seg or record["question_type"] != "what color is the":
            continue
        (i,) = record["relevant_objects"]
        assert seg[record["image_id"]]["annotations"][i]["color"] == record["multiple_choice_answer"]


def test_vqa_samples_follow_vqa_v2(png_world):
    records = [json.loads(s["json"]) for s in all_samples(png_world, "vqa", "val")]
    assert len(records) == 12 and len({r["question_id"] for r in records}) == 12
    spread = []
    for r in records:
        assert isinstance(r["question_id"], int) and isinstance(r["image_id"], int)
        assert r["answer_type"] in ("yes/no", "number", "other")
        assert r["question"].startswith(r["question_type"])
        assert len(r["answers"]) == 10 and [a["answer_id"] for a in r["answers"]] == list(range(1, 11))
        scores = answer_scores([a["answer"] for a in r["answers"]])
        assert max(scores, key=scores.get) == r["multiple_choice_answer"] and scores[r["multiple_choice_answer"]] == 1.0
        assert set(scores) <= set(vqa_answer_space())
        spread.append(len(scores))
    assert max(spread) > 1, "some annotators must disagree so soft scores below 1 occur"


def test_nlvr2_statements_are_balanced_and_grouped(png_world):
    records = [json.loads(s["json"]) for s in all_samples(png_world, "nlvr2", "train")]
    assert len(records) == 60
    assert 0.35 <= np.mean([r["label"] for r in records]) <= 0.65
    by_sentence = {}
    for r in records:
        split, set_id, pair, k = r["identifier"].split("-")
        assert split == "train" and r["left_image"] == f"train-{set_id}-{pair}-img0.png"
        by_sentence.setdefault((set_id, k), set()).add(r["sentence"])
        assert len(by_sentence[(set_id, k)]) == 1, "one sentence per (set, sentence index)"
    pairs_per_sentence = Counter((r["identifier"].split("-")[1], r["identifier"].split("-")[3]) for r in records)
    assert max(pairs_per_sentence.values()) == 4, "a statement is judged on several pairs (consistency metric)"


def test_tokenizer_covers_the_synthetic_text(png_world):
    tokenizer = load_tokenizer(png_world)
    assert (tokenizer.pad_token, tokenizer.cls_token, tokenizer.sep_token, tokenizer.unk_token, tokenizer.mask_token) == (
        "[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]")  # fmt: skip
    texts = [json.loads(s["json"])["question"] for s in all_samples(png_world, "vqa", "val")]
    texts += [json.loads(s["json"])["sentence"] for s in all_samples(png_world, "nlvr2", "val")]
    enc = tokenizer(texts, padding=True)
    for ids, text in zip(enc["input_ids"], texts):
        assert ids[0] == tokenizer.cls_token_id and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ?", "?") == text
    assert "zebra" not in tokenizer.get_vocab() and tokenizer.unk_token_id not in tokenizer("a zebra")["input_ids"]


def test_answer_normalisation_and_scores():
    assert normalize_answer(" Two.") == "2" and normalize_answer("the Dog") == "dog"
    assert normalize_answer("dont know") == "don't know" and normalize_answer("black/white") == "black white"
    assert normalize_answer("1,000") == "1000" and normalize_answer("2.5") == "2.5" and normalize_answer("2.") == "2"
    assert [soft_score(n) for n in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    assert build_answer_vocab(["yes"] * 10 + ["no"] * 8 + ["Two"] * 5 + ["2."] * 4) == ["yes", "2"]


def test_world_knobs_set_object_counts_and_sizes():
    from trim.data.synthetic import SIZES, World, make_scene, rng_for, STREAM_SCENE

    world = World(min_objects=1, max_objects=2, size_scale=1.5)
    scenes = [make_scene(rng_for(0, STREAM_SCENE, "train", i), 64, world=world) for i in range(40)]
    counts = {len(s.objects) for s in scenes}
    assert counts == {1, 2}
    radii = {round(o.r, 2) for s in scenes for o in s.objects}
    assert radii == {round(SIZES[k] * 1.5 * 64, 2) for k in SIZES}
    # the default world is unchanged: 3-6 objects at the base radii
    default = [make_scene(rng_for(0, STREAM_SCENE, "train", i), 64) for i in range(40)]
    assert min(len(s.objects) for s in default) >= 3 and max(len(s.objects) for s in default) <= 6
    assert {round(o.r, 2) for s in default for o in s.objects} == {round(SIZES[k] * 64, 2) for k in SIZES}


@pytest.mark.parametrize("kwargs", [dict(min_objects=0), dict(min_objects=4, max_objects=3), dict(size_scale=3.0)])
def test_world_rejects_impossible_settings(kwargs):
    from trim.data.synthetic import World

    with pytest.raises(ValueError, match="objects|size_scale"):
        World(**kwargs)


def test_synth_cli_records_the_world_and_names_bad_flags(tmp_path, capsys):
    from trim.data.cli import main

    assert main(["synth", "--out", str(tmp_path / "w"), "--train", "6", "--val", "0", "--test", "0", "--tasks", "vqa",
                 "--min-objects", "1", "--max-objects", "2", "--size-scale", "1.5", "--quiet"]) == 0
    manifest = json.loads((tmp_path / "w" / "manifest.json").read_text())
    assert manifest["sources"]["vqa"]["train"]["world"] == {"min_objects": 1, "max_objects": 2, "size_scale": 1.5}
    assert main(["synth", "--out", str(tmp_path / "x"), "--min-objects", "5", "--max-objects", "2", "--quiet"]) == 2
    assert "--min-objects" in capsys.readouterr().err
