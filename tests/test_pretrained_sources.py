"""`model.pretrained` and `model.init_from` sources load through one loader (trim.models.io).

The three starting points a user has: a trim run folder (its ``latest`` checkpoint), a
transformers directory with another number of labels, and either of them with trimmers
added. Each must give the source's backbone exactly, and fresh (keep-all) trimmers / head.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from trim.config import load_recipe
from trim.errors import CheckpointError, ConfigError
from trim.models import ModelConfig, TrimConfig, create_model, from_pretrained, save_model
from trim.models.io import head_keys, load_model, trimmer_keys
from trim.train.trainer import Trainer

DUAL = {
    "family": "dual", "task": "vqa", "num_labels": 6,
    "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2},
    "text": {"vocab_size": 64, "width": 32, "layers": 2, "heads": 2},
    "cross_layers": 1, "cross_width": 32, "cross_heads": 2,
}
TRIMMERS = {"vision_token_layers": [1], "cross_token_layers": [0], "cross_head_layers": [0]}


def recipe(model: dict, *, image_size: int = 32) -> dict:
    return {"name": "unit", "model": model, "data": {"root": "unused", "task": "vqa", "image_size": image_size},
            "train": {"steps": 4}, "objective": {"method": "smarttrim", "target": 0.5}}


def example_batch() -> dict:
    return {"pixel_values": torch.randn(2, 3, 32, 32), "input_ids": torch.randint(1, 64, (2, 5)),
            "attention_mask": torch.ones(2, 5, dtype=torch.long)}


def trim_run_folder(tmp_path, cfg: dict):
    """A run folder as training leaves it: step directories and a ``latest`` file naming one."""
    source = create_model(ModelConfig.from_dict(cfg))
    run = tmp_path / "run"
    save_model(source, run / "step_2")
    save_model(create_model(ModelConfig.from_dict(cfg)), run / "step_4")  # a later, different checkpoint
    (run / "latest").write_text("step_2\n")  # latest need not be the newest: it is the one named
    return source, run


def assert_backbone_from(model, source, *, except_head: bool = False) -> None:
    own, src = model.state_dict(), source.state_dict()
    fresh = trimmer_keys(model) | (head_keys(model) if except_head else set())
    for key in own:
        if key in fresh:
            continue
        assert torch.equal(own[key], src[key]), key


def assert_fresh_trimmers(model) -> None:
    keys = trimmer_keys(model)
    assert keys, "the recipe places trimmers"
    reference = create_model(model.config).state_dict()  # trimmers start at their keep-all init
    bias = [k for k in keys if k.endswith("out.bias")]  # the keep-all logit
    assert bias and all(torch.equal(model.state_dict()[k], reference[k]) for k in bias)


def test_pretrained_trim_run_folder_with_trimmers_added(tmp_path):
    source, run = trim_run_folder(tmp_path, DUAL)
    model_section = {"pretrained": str(run), "trim": TRIMMERS}  # the rest comes from the checkpoint's config
    r = load_recipe(recipe(model_section))
    assert r.model.config.cross_layers == 1 and r.model.config.trim.cross_head_layers == [0]
    model = Trainer(r).build_model()  # the path that crashed with "no attribute '_load_pretrained'"
    assert_backbone_from(model, source)
    assert_fresh_trimmers(model)
    # init_from takes the same folder the same way
    model_from_init = Trainer(load_recipe(recipe({"init_from": str(run), "trim": TRIMMERS}))).build_model()
    assert_backbone_from(model_from_init, source)
    assert trimmer_keys(model_from_init) == trimmer_keys(model)


def test_init_from_a_vqa_run_for_nlvr2(tmp_path):
    """NLVR2 starts from a VQA model (its cross layers already tie words to image regions): the
    backbone comes across; the head and the per-image type embeddings are new, the latter zero."""
    source, run = trim_run_folder(tmp_path, DUAL)
    raw = recipe({"init_from": str(run), "task": "nlvr2", "num_labels": 2})
    raw["data"]["task"], raw["objective"] = "nlvr2", {"method": "none"}
    model = Trainer(load_recipe(raw)).build_model()
    assert model.config.task == "nlvr2"
    assert_backbone_from(model, source, except_head=True)
    assert "pair_type_embeddings.weight" in head_keys(model)
    assert not model.pair_type_embeddings.weight.any()
    batch = {**example_batch(), "pixel_values": torch.randn(2, 2, 3, 32, 32)}
    assert model(batch).logits.shape == (2, 2)


def test_pretrained_trim_checkpoint_with_another_label_count(tmp_path):
    source, run = trim_run_folder(tmp_path, {**DUAL, "trim": TRIMMERS})
    model = Trainer(load_recipe(recipe({"pretrained": str(run / "step_2"), "num_labels": 9}))).build_model()
    assert model.config.num_labels == 9 and model(example_batch(), trim="off").logits.shape == (2, 9)
    assert_backbone_from(model, source, except_head=True)
    # the source's trimmers sit where the recipe's do: they come across, trained or not
    for key in trimmer_keys(model):
        assert torch.equal(model.state_dict()[key], source.state_dict()[key])


def test_pretrained_transformers_vilt_with_other_labels_and_trimmers(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.ViltConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, image_size=32, patch_size=8, vocab_size=100,
                                     max_position_embeddings=16, num_labels=5)
    hf = transformers.ViltForQuestionAnswering(hf_cfg)
    hf.save_pretrained(tmp_path / "hf_vilt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = from_pretrained(str(tmp_path / "hf_vilt"))  # what the user's source holds, as trim modules
    fields = copy.deepcopy(converted.config.to_dict())
    fields.update(num_labels=7, trim={"vision_token_layers": [1], "vision_head_layers": [0]})
    r = load_recipe(recipe({"pretrained": str(tmp_path / "hf_vilt"), **fields}))
    with pytest.warns(UserWarning, match="starts a fresh head"):
        model = Trainer(r).build_model()
    assert model.config.num_labels == 7 and model.config.trim.vision_head_layers == [0]
    assert_backbone_from(model, converted, except_head=True)
    assert_fresh_trimmers(model)


def test_pretrained_source_with_another_architecture_is_named(tmp_path):
    _, run = trim_run_folder(tmp_path, DUAL)
    with pytest.raises(ConfigError, match=r"model\.pretrained=.* different architecture .*cross_width"):
        Trainer(load_recipe(recipe({"pretrained": str(run), "cross_width": 64, "trim": TRIMMERS}))).build_model()


def test_corrupt_checkpoints_give_one_clear_error(tmp_path):
    _, run = trim_run_folder(tmp_path, DUAL)
    step = run / "step_2"
    weights = (step / "model.safetensors").read_bytes()
    (step / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match=r"step_2/model\.safetensors cannot be read .*truncated"):
        load_model(step)
    (step / "model.safetensors").write_bytes(weights)
    config = (step / "config.json").read_text()
    (step / "config.json").write_text(config.replace('"width": 32', '"width": 48', 1))
    with pytest.raises(CheckpointError, match=r"model\.safetensors \(built from .*config\.json\) does not fit the model: .*another shape"):
        load_model(step)
    (step / "config.json").write_text(config[:-20])
    with pytest.raises(CheckpointError, match=r"step_2/config\.json is not readable JSON"):
        load_model(step)
    with pytest.raises(ConfigError, match=r"model\.init_from=.*config\.json is not readable JSON"):
        load_recipe(recipe({"init_from": str(run)}))
    (run / "latest").write_text("step_9\n")
    with pytest.raises(CheckpointError, match=r"latest names 'step_9', which does not exist"):
        from_pretrained(run)
