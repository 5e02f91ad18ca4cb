"""The blind baseline sees no image: constant pixels in, the same answer for any image, `--blind` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tiny_runs import vl_batch
from trim.eval.blind import blind_batch, compare_blind

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _model(image_size: int = 64, num_labels: int = 5, vocab_size: int = 512):
    from trim.models import ModelConfig, TextConfig, TrimConfig, VisionConfig, create_model
    from trim.prune import TokenTrimmer

    model = create_model(ModelConfig(
        family="dual", task="vqa", num_labels=num_labels,
        vision=VisionConfig(image_size=image_size, patch_size=8, width=32, layers=2, heads=2),
        text=TextConfig(vocab_size=vocab_size, width=32, layers=1, heads=2),
        cross_layers=1, cross_width=32, cross_heads=2, trim=TrimConfig(vision_token_layers=[1])))
    for module in model.modules():
        if isinstance(module, TokenTrimmer):  # decisions that depend on the image
            torch.nn.init.normal_(module.out.weight, std=2.0)
    return model.eval()


def test_blind_batch_is_constant_and_leaves_the_rest():
    batch = {**vl_batch(3), "relevance": torch.ones(3, 64, dtype=torch.bool), "question": ["a", "b", "c"]}
    blind = blind_batch(batch)
    assert torch.count_nonzero(blind["pixel_values"]) == 0 and blind["pixel_values"].shape == (3, 3, 64, 64)
    assert "relevance" not in blind, "a constant image shows no object"
    assert blind["input_ids"] is batch["input_ids"] and blind["question"] is batch["question"]
    assert torch.count_nonzero(batch["pixel_values"]) > 0, "the caller's batch is not changed"


def test_blind_answers_do_not_depend_on_the_image():
    model = _model()
    one, other = vl_batch(3), vl_batch(3)
    other.update(input_ids=one["input_ids"], attention_mask=one["attention_mask"])  # same text, other images
    with torch.inference_mode():
        seeing = [model(b, trim="eval").logits for b in (one, other)]
        blind = [model(blind_batch(b), trim="eval").logits for b in (one, other)]
    assert not torch.allclose(seeing[0], seeing[1]), "with images the model's answers depend on them"
    torch.testing.assert_close(blind[0], blind[1], rtol=0, atol=0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from trim.data import write_synthetic

    root = tmp_path_factory.mktemp("shapes")
    write_synthetic(root, {"val": 12}, tasks=("vqa",), image_size=32, progress=False)
    return root


def test_trim_eval_blind_end_to_end(shards, tmp_path, monkeypatch, capsys):
    import trim.eval.evaluate as evaluate_module
    from trim.data import load_tokenizer
    from trim.eval.cli import main
    from trim.models import save_model

    answers = json.loads((shards / "vqa" / "answers.json").read_text())
    ckpt = save_model(_model(32, len(answers), len(load_tokenizer(shards))), tmp_path / "ckpt")
    seen: list[torch.Tensor] = []
    load = evaluate_module.load_model

    def spying_load(path):  # record every image the evaluated model receives
        model = load(path)
        model.register_forward_pre_hook(lambda _, args: seen.append(args[0]["pixel_values"].clone()))
        return model

    monkeypatch.setattr(evaluate_module, "load_model", spying_load)
    common = [str(ckpt), "--task", "vqa", "--data", str(shards), "--batch-size", "5", "--out", str(tmp_path),
              "--quiet", "--warmup", "1", "--repeats", "1"]
    assert main([*common, "--blind"]) == 0
    assert len(seen) == 3 and all(torch.count_nonzero(p) == 0 for p in seen), "every batch is the constant image"
    blind = json.loads((tmp_path / "eval" / "vqa_blind.json").read_text())
    assert blind["images"] == "blind" and blind["samples"] == 12 and blind["accuracy"] is not None
    assert blind["speed"] is None and blind["relevance"] is None
    assert blind["figures"] == ["vqa_blind_cost_histogram.png"]  # no overlays of a constant image
    assert (tmp_path / "eval" / "vqa_blind_predictions_evalai.json").is_file()
    printed = capsys.readouterr().out
    assert "BLIND" in printed and "zeros after normalisation" in printed

    seen.clear()
    assert main([*common, "--no-speed", "--figures", "0"]) == 0
    assert all(torch.count_nonzero(p) > 0 for p in seen)
    full = json.loads((tmp_path / "eval" / "vqa.json").read_text())
    assert full["images"] == "real" and full["relevance"] is not None
    table = compare_blind(full, blind).splitlines()
    overall = next(line for line in table if line.startswith("overall")).split()
    assert [float(v) for v in overall[1:]] == pytest.approx([full["accuracy"], blind["accuracy"],
                                                             full["accuracy"] - blind["accuracy"]], abs=0.01)
    assert any(line.startswith("question type: what color is the") for line in table)
    with pytest.raises(ValueError, match="a full and a blind evaluation"):
        compare_blind(blind, full)
