"""Converters on fixtures in the official schemas, and on the real NLVR2 dev annotations."""

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trim.cli import main as trim_main
from trim.data import build_loader, load_tokenizer, read_manifest, split_urls
from trim.data.convert import convert_coco, convert_nlvr2, convert_sa1b, convert_vqa2
from trim.data.convert.nlvr2 import image_names
from trim.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")
REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "data"
NLVR2_DEV = REPO / ".." / "shared" / "data" / "nlvr2" / "dev.json"


def make_image(path: Path, width: int = 16, height: int = 12, seed: int = 0) -> None:
    """A small stand-in image (the fixtures name images; their pixels do not matter)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)


def read_eval(root, task, split, **kw):
    loader = build_loader(split_urls(root, task, split), task, batch_size=4, mode="eval", image_size=kw.pop("image_size", 32),
                          tokenizer=root if task != "seg" else None, **kw)  # fmt: skip
    batches = list(loader)
    return loader, {k: [x for b in batches for x in b[k]] for k in batches[0]} if batches else {}


# ---------------------------------------------------------------- VQA v2


@pytest.fixture()
def coco_val(tmp_path) -> Path:
    for image_id in (42, 73, 74):  # 133 is left out on purpose: its questions are reported missing
        make_image(tmp_path / "val2014" / f"COCO_val2014_{image_id:012d}.jpg", seed=image_id)
    for image_id in (1, 2):
        make_image(tmp_path / "test2015" / f"COCO_test2015_{image_id:012d}.jpg", seed=image_id)
    return tmp_path


def test_vqa2_converter_builds_vocab_and_soft_scores(tmp_path, coco_val, capsys):
    out = tmp_path / "out"
    questions = FIXTURES / "vqa2" / "v2_OpenEnded_mscoco_val2014_questions.json"
    annotations = FIXTURES / "vqa2" / "v2_mscoco_val2014_annotations.json"
    with pytest.raises(DataError, match="no answer is seen >= 9 times .* lower --min-answer-count"):
        convert_vqa2(out, split="val", questions=questions, annotations=annotations, images=coco_val / "val2014", progress=False)
    summary = convert_vqa2(out, split="val", questions=questions, annotations=annotations, images=coco_val / "val2014",
                           min_answer_count=2, shard_size=4, progress=False)  # fmt: skip
    assert summary.written == 10 and dict(summary.skipped) == {"missing image": 2}
    assert summary.examples["missing image"][0] == "COCO_val2014_000000000133.jpg"
    assert "10 samples written, 2 skipped" in capsys.readouterr().out
    assert json.loads((out / "vqa" / "answers.json").read_text()) == ["yes", "no"]  # 7 and 2 majority answers
    assert read_manifest(out)["tasks"]["vqa"]["val"]["samples"] == 10 and len(list((out / "vqa").glob("val-*.tar"))) == 3

    _, got = read_eval(out, "vqa", "val")
    by_id = {q: i for i, q in enumerate(got["question_id"])}
    cat = by_id[73003]  # "Is there a cat?": 8 x no, 2 x yes
    assert got["labels"][cat].tolist() == pytest.approx([0.6, 1.0])
    lights = by_id[74007]  # "Are the lights on?": 7 x yes, 3 x no
    assert got["labels"][lights].tolist() == pytest.approx([1.0, 0.9])
    assert got["answer_type"][cat] == "yes/no" and got["question_type"][cat] == "is there a" and got["image_id"][cat] == 73
    assert got["answers"][by_id[42001]][-3:] == ["Two.", "3", "1"], "raw answers are kept as typed"

    # ViLT builds the vocabulary from train + val; the threshold of 9 then keeps only "yes".
    convert_vqa2(out, split="val", questions=questions, annotations=annotations, images=coco_val / "val2014",
                 vocab_annotations=[annotations, annotations], progress=False)  # fmt: skip
    assert json.loads((out / "vqa" / "answers.json").read_text()) == ["yes"]


def test_vqa2_test_split_has_no_answers(tmp_path, coco_val):
    out = tmp_path / "out"
    convert_vqa2(out, split="val", questions=FIXTURES / "vqa2" / "v2_OpenEnded_mscoco_val2014_questions.json",
                 annotations=FIXTURES / "vqa2" / "v2_mscoco_val2014_annotations.json", images=coco_val / "val2014",
                 min_answer_count=2, progress=False)  # fmt: skip
    summary = convert_vqa2(out, split="test", questions=FIXTURES / "vqa2" / "v2_OpenEnded_mscoco_test2015_questions.json",
                           images=coco_val / "test2015", progress=False)  # fmt: skip
    assert summary.written == 3 and not summary.skipped
    _, got = read_eval(out, "vqa", "test")
    assert sorted(got["question_id"]) == [1000, 1001, 2000]
    assert got["answers"] == [[], [], []] and all(float(label.abs().sum()) == 0 for label in got["labels"])
    tokenizer = load_tokenizer(out)
    assert "holding" in tokenizer.get_vocab() and "raining" not in tokenizer.get_vocab(), "the tokenizer comes from the first converted split's questions"


# ---------------------------------------------------------------- NLVR2


def test_nlvr2_converter_on_fixture_reports_missing_images(tmp_path):
    images = tmp_path / "images"
    rows = [json.loads(line) for line in (FIXTURES / "nlvr2" / "train_mini.json").read_text().splitlines()]
    for row in rows:
        for name in image_names(row["identifier"]):
            if name != "train-11-2-img1.png":
                make_image(images / str(row["directory"]) / name)  # train images live in subfolders
    summary = convert_nlvr2(tmp_path / "out", split="train", annotations=FIXTURES / "nlvr2" / "train_mini.json",
                            images=images, progress=False)  # fmt: skip
    assert summary.written == 5 and dict(summary.skipped) == {"missing image": 1}
    assert summary.examples["missing image"] == ["train-11-2-img1.png"]
    _, got = read_eval(tmp_path / "out", "nlvr2", "train")
    expected = {r["identifier"]: r for r in rows if r["identifier"] != "train-11-2-0"}
    assert sorted(got["identifier"]) == sorted(expected)
    for identifier, sentence, label in zip(got["identifier"], got["sentence"], got["labels"]):
        assert sentence == expected[identifier]["sentence"] and label.item() == int(expected[identifier]["label"] == "True")
    assert got["pixel_values"][0].shape == (2, 3, 32, 32)


def test_nlvr2_converter_rejects_lines_outside_the_schema(tmp_path):
    lines = (FIXTURES / "nlvr2" / "train_mini.json").read_text().splitlines()[:2]
    broken = tmp_path / "broken.json"
    broken.write_text("\n".join([lines[0], '{"sentence": "no identifier"}', "not json", lines[1]]) + "\n")
    for line in lines:
        for name in image_names(json.loads(line)["identifier"]):
            make_image(tmp_path / "img" / name)
    summary = convert_nlvr2(tmp_path / "out", split="train", annotations=broken, images=tmp_path / "img", progress=False)
    assert summary.written == 2 and summary.skipped["line not in the NLVR2 schema"] == 2
    assert summary.examples["line not in the NLVR2 schema"][0].startswith("broken.json:2 (KeyError")


@pytest.mark.skipif(not NLVR2_DEV.is_file(), reason=f"real NLVR2 dev annotations not present at {NLVR2_DEV}")
def test_nlvr2_converter_on_the_real_dev_file(tmp_path):
    rows = [json.loads(line) for line in NLVR2_DEV.read_text().splitlines() if line.strip()]
    names = sorted({n for r in rows for n in image_names(r["identifier"])})
    absent = {n for n in names if n.startswith("dev-850-")}  # leave one set's images out
    tiny = Image.fromarray(np.full((8, 8, 3), 127, np.uint8))
    (tmp_path / "dev").mkdir()
    for name in names:
        if name not in absent:
            tiny.save(tmp_path / "dev" / name)
    out = tmp_path / "out"
    summary = convert_nlvr2(out, split="dev", annotations=NLVR2_DEV, images=tmp_path / "dev", shard_size=2000, progress=False)

    lost = [r for r in rows if r["identifier"].startswith("dev-850-")]
    assert summary.written == len(rows) - len(lost) and summary.skipped["missing image"] == len(lost) > 0
    assert all(example.startswith("dev-850-") for example in summary.examples["missing image"])
    assert f"{len(absent)} distinct image files missing" in summary.report()

    labels = {r["identifier"]: r["label"] == "True" for r in rows}
    seen = {}
    for shard in sorted((out / "nlvr2").glob("dev-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    record = json.loads(tar.extractfile(member).read())
                    assert member.name == f"{record['identifier']}.json"
                    seen[record["identifier"]] = record["label"]
    assert seen == {i: label for i, label in labels.items() if not i.startswith("dev-850-")}
    assert read_manifest(out)["tasks"]["nlvr2"]["dev"]["samples"] == len(seen)

    first_shard = str(sorted((out / "nlvr2").glob("dev-*.tar"))[0])
    batch = next(iter(build_loader(first_shard, "nlvr2", tokenizer=out, batch_size=8, mode="eval", image_size=16)))
    kept_in_file_order = [r["identifier"] for r in rows if not r["identifier"].startswith("dev-850-")]
    assert batch["identifier"] == kept_in_file_order[:8] and batch["input_ids"].shape[0] == 8


# ---------------------------------------------------------------- SA-1B and COCO


def test_sa1b_converter(tmp_path):
    folder = tmp_path / "sa1b"
    shutil.copytree(FIXTURES / "sa1b", folder)
    for n, (w, h) in ((1, (60, 40)), (2, (32, 32))):
        make_image(folder / f"sa_{n}.jpg", w, h, seed=n)
    (folder / "sa_3.json").write_text(json.dumps({**json.loads((folder / "sa_2.json").read_text()),
                                                  "image": {"image_id": 3, "width": 32, "height": 32, "file_name": "sa_3.jpg"}}))  # fmt: skip
    (folder / "sa_4.json").write_text(json.dumps({"image": {"width": 5, "height": 5}, "annotations": [{"bbox": [0, 0, 1, 1]}]}))
    summary = convert_sa1b(tmp_path / "out", split="train", images=folder, progress=False)
    assert summary.written == 2
    assert dict(summary.skipped) == {"missing image": 1, "annotation not in the SA-1B schema": 1}

    fixture = json.loads((FIXTURES / "sa1b" / "sa_1.json").read_text())
    _, got = read_eval(tmp_path / "out", "seg", "train", image_size=30)
    i = got["image_id"].index(1)
    assert got["areas"][i].tolist() == [a["area"] for a in fixture["annotations"]]
    # SAM's preprocessing: the longest side (60) to 30, the other side scaled alike and padded
    x, y, w, h = fixture["annotations"][0]["bbox"]
    scale = 30 / 60
    assert got["boxes"][i][0].tolist() == pytest.approx([x * scale, y * scale, (x + w) * scale, (y + h) * scale])
    assert got["masks"][i].shape == (2, 30, 30) and got["masks"][i].dtype == torch.uint8
    assert got["masks"][i][:, 20:].sum() == 0  # rows below the 40 * 0.5 = 20 image rows are padding
    assert got["points"][i][0].tolist() == pytest.approx([c * scale for c in fixture["annotations"][0]["point_coords"][0]])


def test_coco_instances_converter(tmp_path):
    for image_id in (5, 6):  # 7 is missing on disk
        make_image(tmp_path / "val2017" / f"{image_id:012d}.jpg", 40, 30, seed=image_id)
    instances = FIXTURES / "coco" / "instances_val2017.json"
    summary = convert_coco(tmp_path / "out", split="val", instances=instances, images=tmp_path / "val2017", progress=False)
    assert summary.written == 1
    assert dict(summary.skipped) == {"no annotations": 1, "missing image": 1}
    assert summary.examples == {"no annotations": ["000000000006.jpg"], "missing image": ["000000000007.jpg"]}

    _, got = read_eval(tmp_path / "out", "seg", "val", image_size=40)  # 40x30: longest side already 40, 10 rows padded
    masks = got["masks"][0]
    assert masks.shape == (3, 40, 40) and got["image_id"] == [5]
    square = masks[0].nonzero()  # polygon (5,5)-(15,15)
    assert square[:, 1].min() == 5 and square[:, 1].max() in (14, 15)
    crowd = np.zeros((30, 40), np.uint8)
    crowd[20:28, 2:12] = 1  # the uncompressed crowd RLE in the fixture
    padded = torch.zeros(40, 40, dtype=torch.uint8)
    padded[:30] = torch.from_numpy(crowd)
    assert torch.equal(masks[2], padded)
    record = json.loads(tarfile.open(next((tmp_path / "out" / "seg").glob("val-*.tar"))).extractfile("5.json").read())
    assert [a["category_id"] for a in record["annotations"]] == [18, 1, 1] and record["annotations"][2]["iscrowd"] == 1
    assert all(isinstance(a["segmentation"]["counts"], str) for a in record["annotations"]), "compressed RLE, like SA-1B"

    summary = convert_coco(tmp_path / "out2", split="val", instances=instances, images=tmp_path / "val2017",
                           keep_crowd=False, progress=False)  # fmt: skip
    _, got = read_eval(tmp_path / "out2", "seg", "val")
    assert got["masks"][0].shape[0] == 2


# ---------------------------------------------------------------- command line


def test_command_line_entry_points(tmp_path, capsys):
    assert trim_main(["data", "synth", "--out", str(tmp_path / "s"), "--train", "8", "--val", "4", "--test", "0",
                      "--tasks", "vqa,seg", "--image-size", "32", "--quiet"]) == 0  # fmt: skip
    assert trim_main(["data", "inspect", str(tmp_path / "s"), "--check"]) == 0
    printed = capsys.readouterr().out
    assert "vqa    train         8 samples in 1 shards" in printed and "read: 8 samples read, 0 skipped" in printed
    assert trim_main(["data", "nlvr2", "--out", str(tmp_path / "n"), "--split", "dev", "--annotations",
                      str(tmp_path / "nope.json"), "--images", str(tmp_path)]) == 1  # fmt: skip
    assert "nope.json does not exist" in capsys.readouterr().err

    script = subprocess.run([sys.executable, str(REPO / "data_tools" / "sa1b.py"), "--help"], capture_output=True, text=True)
    assert script.returncode == 0 and "--coco-instances" in script.stdout
