"""trim pretrain-vision: patch targets from the synthetic world's masks, and an end-to-end run."""

import pytest
import torch
import yaml

from trim.train.pretrain_vision import MIN_COVER, attribute_classes, patch_targets, pretrain_vision


def test_patch_targets_label_the_object_covering_most_of_each_patch():
    masks = torch.zeros(2, 16, 16, dtype=torch.uint8)
    masks[0, 0:8, 0:8] = 1  # object 0 fills the top-left patch of a 2x2 grid
    masks[1, 8:16, 8:16] = 1  # object 1 the bottom-right one
    masks[1, 0:8, 8:9] = 1  # and a sliver (1/8 < MIN_COVER) of the top-right one
    attributes = [{"color": "red", "shape": "star", "size": "large"},
                  {"color": "cyan", "shape": "circle", "size": "small"}]
    targets = patch_targets(masks, attributes, grid=2)
    classes = attribute_classes()
    assert 1 / 8 < MIN_COVER
    assert targets.shape == (3, 4)
    assert targets[:, 0].tolist() == [classes["color"].index("red") + 1, classes["shape"].index("star") + 1,
                                      classes["size"].index("large") + 1]
    assert targets[:, 3].tolist() == [classes["color"].index("cyan") + 1, classes["shape"].index("circle") + 1,
                                      classes["size"].index("small") + 1]
    assert targets[:, 1].tolist() == [0, 0, 0] and targets[:, 2].tolist() == [0, 0, 0]  # background
    assert patch_targets(masks[:0], [], grid=2).eq(0).all()


def load_model_fresh(recipe):
    from trim.config import load_recipe
    from trim.models.io import create_model

    torch.manual_seed(0)  # pretrain_vision seeds the same way: the same initial tower
    return create_model(load_recipe(recipe).model.config)


def test_pretrain_vision_writes_a_checkpoint_training_can_start_from(tmp_path, one_thread):
    from trim.data import write_synthetic
    from trim.models.io import load_model
    from tests.tiny_runs import tiny_recipe

    data = tmp_path / "shapes"
    write_synthetic(data, {"train": 24, "val": 4}, tasks=("vqa", "seg"), image_size=32, progress=False)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(data, tmp_path / "runs", objective={"method": "none"},
                                                 model={"trim": {}})))  # fmt: skip
    before = {k: v.clone() for k, v in load_model_fresh(recipe).vision.state_dict().items()}
    pretrain_vision(str(recipe), data, tmp_path / "vision", steps=8, batch_size=4, progress=False)  # 24 samples: 2 epochs
    model = load_model(tmp_path / "vision")
    assert set(model.state_dict()) == set(load_model_fresh(recipe).state_dict())  # probes are not saved
    moved = [k for k, v in model.vision.state_dict().items() if not torch.equal(v, before[k])]
    assert moved, "the tower's weights did not change"
    from trim.train.cli import main as train_main

    assert train_main([str(recipe), f"model.init_from={tmp_path / 'vision'}", "train.steps=2"]) == 0


def test_pretrain_vision_names_missing_seg_shards(tmp_path):
    from trim.data import write_synthetic
    from trim.errors import DataError
    from tests.tiny_runs import tiny_recipe

    data = tmp_path / "shapes"
    write_synthetic(data, {"train": 4}, tasks=("vqa",), image_size=32, progress=False)
    with pytest.raises(DataError, match="no seg shards.*--tasks vqa,seg"):
        pretrain_vision(tiny_recipe(data, tmp_path / "runs"), data, tmp_path / "vision", steps=1, progress=False)
