"""`trim calibrate` and `trim eval --budget` end to end on a tiny checkpoint and synthetic shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trim.cli import main as trim_main

SPEED = ["--warmup", "1", "--repeats", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from trim.data.cli import main as data_main

    root = tmp_path_factory.mktemp("shards")
    assert data_main(["synth", "--out", str(root), "--train", "0", "--val", "24", "--test", "0", "--image-size", "32",
                      "--tasks", "vqa", "--shard-size", "8", "--quiet"]) == 0
    return root


def _checkpoint(root: Path, out: Path, extra: dict | None) -> Path:
    from trim.data import load_tokenizer
    from trim.models import ModelConfig, TextConfig, TrimConfig, VisionConfig, create_model, save_model
    from trim.prune import trimmer_modules

    answers = json.loads((root / "vqa" / "answers.json").read_text())
    torch.manual_seed(0)
    model = create_model(ModelConfig(
        family="dual", task="vqa", num_labels=len(answers),
        vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2),
        text=TextConfig(vocab_size=len(load_tokenizer(root)), width=32, layers=1, heads=2),
        cross_layers=1, cross_width=32, cross_heads=2,
        trim=TrimConfig(vision_token_layers=[1], cross_token_layers=[0], cross_head_layers=[0])))
    for _, trimmer in trimmer_modules(model):  # input-dependent decisions instead of "keep all"
        torch.nn.init.normal_(trimmer.out.weight, std=2.0)
    return save_model(model, out, extra=extra)


@pytest.fixture(scope="module")
def ckpt(data, tmp_path_factory) -> Path:
    extra = {"name": "tiny", "objective": {"method": "smarttrim", "target": 0.7}, "data": {"max_text_len": 16}}
    return _checkpoint(data, tmp_path_factory.mktemp("ckpt") / "tiny", extra)


def test_budget_before_calibration_says_how_to_calibrate(ckpt, data, tmp_path, capsys):
    assert trim_main(["eval", str(ckpt), "--task", "vqa", "--data", str(data), "--budget", "0.5", "--out",
                      str(tmp_path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "CalibrationError" in err and "trim calibrate CHECKPOINT --data ROOT" in err
    assert not (tmp_path / "eval").exists() or not any((tmp_path / "eval").iterdir())


def test_calibrate_without_a_recorded_target_asks_for_one(data, tmp_path, capsys):
    bare = _checkpoint(data, tmp_path / "bare", None)
    assert trim_main(["calibrate", str(bare), "--data", str(data)]) == 1
    assert "pass --target" in capsys.readouterr().err
    assert "calibration" not in json.loads((bare / "config.json").read_text())


@pytest.fixture(scope="module")
def calibrated(ckpt, data) -> Path:
    assert trim_main(["calibrate", str(ckpt), "--data", str(data), "--samples", "16", "--batch-size", "5"]) == 0
    return ckpt


def test_calibrate_writes_the_table_and_keeps_the_recipe(calibrated, data, capsys):
    config = json.loads((calibrated / "config.json").read_text())
    cal = config["calibration"]
    assert cal["target"] == 0.7 and cal["samples"] == 16 and cal["source"]["split"] == "val"
    assert abs(cal["mean_cost"] - 0.7) <= 0.03
    assert config["name"] == "tiny" and config["objective"]["target"] == 0.7 and config["data"]["max_text_len"] == 16
    from trim.models import load_model

    assert load_model(calibrated).calibration.target == 0.7


def test_eval_serves_several_budgets_and_the_report_draws_their_curve(calibrated, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert trim_main(["eval", str(calibrated), "--task", "vqa", "--data", str(data), "--budget", "0.85", "0.6",
                      "--out", str(out), "--batch-size", "6", "--figures", "0", "--quiet", *SPEED]) == 0
    printed = capsys.readouterr().out
    assert "tiny at budget 0.85" in printed and "tiny at budget 0.6" in printed
    results = {b: json.loads((out / "eval" / f"vqa_budget{b}.json").read_text()) for b in ("0.85", "0.6")}
    for b, result in results.items():
        assert result["budget"] == float(b) and result["run"]["budget"] == float(b)
        assert result["calibration"]["budget"] == float(b) and result["calibration"]["target"] == 0.7
        assert result["speed"]["budget"] == float(b) and result["samples"] == 24
    assert results["0.6"]["calibration"]["shift"] < results["0.85"]["calibration"]["shift"]
    assert results["0.6"]["cost_ratio"]["mean"] < results["0.85"]["cost_ratio"]["mean"]
    for b, result in results.items():  # the served budget is what each sample keeps (24 samples: within 0.1)
        assert result["sample_cost"]["mean"] == pytest.approx(float(b), abs=0.1)
    # Without --budget: the calibrated target, in the usual file.
    assert trim_main(["eval", str(calibrated), "--task", "vqa", "--data", str(data), "--out", str(out),
                      "--batch-size", "6", "--figures", "0", "--quiet", *SPEED]) == 0
    default = json.loads((out / "eval" / "vqa.json").read_text())
    assert default["budget"] is None and default["calibration"]["budget"] == 0.7
    capsys.readouterr()
    # An out-of-range budget fails before any pass, naming the range.
    assert trim_main(["eval", str(calibrated), "--task", "vqa", "--data", str(data), "--budget", "0.6", "0.01",
                      "--out", str(tmp_path / "bad"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "budget=0.01 is outside" in err and not (tmp_path / "bad" / "eval" / "vqa_budget0.6.json").exists()

    jsons = [str(out / "eval" / name) for name in ("vqa.json", "vqa_budget0.85.json", "vqa_budget0.6.json")]
    assert trim_main(["eval", "report", *jsons, "--out", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    rows = {r["name"]: r for r in report["points"]}
    assert set(rows) == {"tiny", "tiny @0.85", "tiny @0.6"}
    assert rows["tiny"]["group"] == "smarttrim" and rows["tiny"]["budget"] is None
    assert rows["tiny @0.6"]["group"] == rows["tiny @0.85"]["group"] == "tiny: one model, budgets"
    assert rows["tiny @0.6"]["budget_curve"] and not rows["tiny"]["budget_curve"]
    assert (tmp_path / "report" / "pareto_vqa.png").stat().st_size > 1000
    assert "| budget |" in (tmp_path / "report" / "report.md").read_text()
