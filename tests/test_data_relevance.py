"""Relevance masks: written by the synthetic world, decoded onto the model's patch grid."""

import json
import tarfile
from pathlib import Path

import pytest
import torch

from trim.data import build_loader, load_tokenizer, split_urls, write_synthetic
from trim.data.decode import Collate, Decoder, SkipSample
from trim.data.make_synthetic import nlvr2_samples, seg_samples, vqa_samples
from trim.data.relevance import RELEVANCE_FILE, patch_relevance, read_relevance_png
from trim.data.synthetic import Obj, Scene
from trim.data.synthetic_text import Statement

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")
SEED, SIZE, GRID = 4, 64, 8


def test_one_pixel_makes_a_patch_relevant_at_any_resolution():
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[17, 40] = True  # row 17 -> patch row 2, column 40 -> patch column 5 (8-px patches)
    patches = patch_relevance(mask, 8).reshape(8, 8)
    assert patches.sum() == 1 and patches[2, 5]
    # The same mask stored at another resolution lands on the same patch: no resize to the model's size.
    bigger = mask.repeat_interleave(3, 0).repeat_interleave(3, 1)
    assert torch.equal(patch_relevance(bigger, 8), patch_relevance(mask, 8))
    assert patch_relevance(mask, 4).reshape(4, 4)[1, 2] and patch_relevance(mask, 4).sum() == 1


def test_what_color_question_is_relevant_on_its_object_only():
    objects = {json.loads(s["json"])["image"]["image_id"]: json.loads(s["json"])["annotations"]
               for s in seg_samples(SEED, "val", 30, SIZE)}
    decoder = Decoder("vqa", SIZE, {}, relevance_grid=GRID)
    cell = SIZE / GRID
    checked = 0
    for sample in vqa_samples(SEED, "val", 90, SIZE, image_format="png"):
        record = json.loads(sample["json"])
        if record["question_type"] != "what color is the":
            continue
        (i,) = record["relevant_objects"]
        obj = objects[record["image_id"]][i]
        x, y = obj["point_coords"][0]
        left, top, width, height = obj["bbox"]
        relevance = decoder(sample)["relevance"].reshape(GRID, GRID)
        assert relevance[int(y // cell), int(x // cell)], "the object's centre patch is relevant"
        for row, col in torch.nonzero(relevance).tolist():  # and no patch away from the object
            assert col * cell < left + width and (col + 1) * cell > left, record["question"]
            assert row * cell < top + height and (row + 1) * cell > top, record["question"]
        far_row, far_col = (0 if y > SIZE / 2 else GRID - 1), (0 if x > SIZE / 2 else GRID - 1)
        assert not relevance[far_row, far_col]
        checked += 1
    assert checked >= 5


def _scene(*objects: Obj) -> Scene:
    return Scene(64, objects, background=0)


def test_statements_name_the_objects_they_count():
    red_circle, red_square = Obj("circle", "red", "small", 10, 10, 5), Obj("square", "red", "small", 30, 10, 5)
    blue_circle = Obj("circle", "blue", "small", 50, 50, 5)
    left, right = _scene(red_circle, red_square, blue_circle), _scene(blue_circle, red_circle)
    assert Statement("exactly", "left", 1, "red", "circle").relevant(left, right) == ((0,), ())
    assert Statement("exactly", "right", 1, "red", "circle").relevant(left, right) == ((), (1,))
    assert Statement("both", color="red", shape="circle").relevant(left, right) == ((0,), (1,))
    assert Statement("more", "left", shape="circle").relevant(left, right) == ((0, 2), (0, 1))
    assert Statement("none", "left", color="red").relevant(left, right) == ((0, 1), ())
    assert Statement("none", "right", color="green").relevant(left, right) == ((), ())


def test_nlvr2_relevance_follows_relevant_objects():
    decoder = Decoder("nlvr2", SIZE, relevance_grid=GRID)
    seen_empty = seen_full = 0
    for sample in nlvr2_samples(SEED, "val", 16, SIZE, image_format="png"):
        relevant = json.loads(sample["json"])["relevant_objects"]
        patches = decoder(sample)["relevance"]
        assert patches.shape == (2, GRID * GRID) and patches.dtype == torch.bool
        for k, side in enumerate(("left", "right")):
            assert bool(patches[k].any()) == bool(relevant[side]), (sample["__key__"], side)
            seen_empty += not relevant[side]
            seen_full += bool(relevant[side])
    assert seen_empty and seen_full


def test_samples_without_masks_and_training_decode_no_relevance():
    sample = next(iter(vqa_samples(SEED, "val", 1, SIZE, image_format="png")))
    assert "relevance" not in Decoder("vqa", SIZE, {})(sample), "training leaves the masks unread"
    real = {k: v for k, v in sample.items() if k != RELEVANCE_FILE}  # real shards have no mask
    assert "relevance" not in Decoder("vqa", SIZE, {}, relevance_grid=GRID)(real)
    with pytest.raises(SkipSample, match="bad_image: relevance mask"):
        Decoder("vqa", SIZE, {}, relevance_grid=GRID)({**sample, RELEVANCE_FILE: b"not a png"})
    assert read_relevance_png(sample[RELEVANCE_FILE]).shape == (SIZE, SIZE)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    write_synthetic(root, {"val": 10}, tasks=("vqa", "nlvr2"), image_size=SIZE, seed=SEED, progress=False)
    return root


def test_eval_batches_carry_the_patch_grid(world):
    tokenizer = load_tokenizer(world)

    def batches(task, **kw):
        return list(build_loader(split_urls(world, task, "val"), task, tokenizer=tokenizer, batch_size=4,
                                 mode="eval", image_size=32, **kw))

    vqa = batches("vqa", relevance_grid=4)  # a 32-px model with 8-px patches reads the 64-px masks
    assert [b["relevance"].shape for b in vqa] == [(4, 16), (4, 16), (2, 16)]
    assert all(b["relevance"].dtype == torch.bool for b in vqa) and any(b["relevance"].any() for b in vqa)
    nlvr2 = batches("nlvr2", relevance_grid=4)
    assert nlvr2[0]["relevance"].shape == (4, 2, 16)
    assert all("relevance" not in b for b in batches("vqa"))


def test_a_batch_mixing_samples_with_and_without_masks(world):
    samples = list(vqa_samples(SEED, "val", 2, SIZE, image_format="png"))
    decoder = Decoder("vqa", SIZE, {}, relevance_grid=GRID)
    decoded = [decoder(samples[0]), decoder({k: v for k, v in samples[1].items() if k != RELEVANCE_FILE})]
    collate = Collate("vqa", load_tokenizer(world), max_text_len=16, num_answers=1, mean=(0.5,) * 3, std=(0.5,) * 3)
    relevance = collate(decoded)["relevance"]
    assert relevance.shape == (2, GRID * GRID)
    assert torch.equal(relevance[0], decoded[0]["relevance"]) and not relevance[1].any()


def test_synthetic_shards_store_one_mask_per_image(world):
    with tarfile.open(next((world / "nlvr2").glob("val-*.tar"))) as tar:
        names = tar.getnames()
    key = names[0].split(".", 1)[0]
    assert {f"{key}.left.{RELEVANCE_FILE}", f"{key}.right.{RELEVANCE_FILE}"} <= set(names)
