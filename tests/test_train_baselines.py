"""`trim train` of every baseline on the tiny recipe: same recipe, budget, distillation and steps as SmartTrim."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tiny_runs import tiny_recipe
from trim.config import load_recipe
from trim.errors import ConfigError
from trim.models import load_model
from trim.prune.keep_ratio import model_keep_ratio

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: a second thread only spin-waits


@pytest.mark.parametrize("method", ["random", "evit", "fixed_ratio", "text_agnostic", "static_heads"])
def test_each_baseline_trains_end_to_end(method, shapes, tmp_path):
    from trim.train.cli import main

    out = tmp_path / "runs"
    recipe = tiny_recipe(shapes, out, name=method, objective={"method": method},
                         train={"save_every": 0, "eval_every": 0})
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main([str(path)]) == 0
    run = out / method
    summary = json.loads((run / "summary.json").read_text())
    config = json.loads((run / "step_4" / "config.json").read_text())
    assert config["model"]["trim"]["policy"] == method and config["objective"]["method"] == method
    model = load_model(run / "step_4")
    target = recipe["objective"]["target"]
    if method in ("random", "evit", "fixed_ratio"):
        assert summary["calibration"]["skipped"] and model.calibration is None
        assert summary["calibration"]["keep_ratio"] == pytest.approx(model_keep_ratio(model))
        assert model_keep_ratio(model) < 1
        # the final evaluation (masked: each sample's own cost) runs at the final target's ratio
        assert summary["final_eval"]["cost_ratio"] == pytest.approx(target, abs=0.03)
    else:
        assert summary["calibration"]["target"] == target
        assert summary["calibration"]["mean_cost"] == pytest.approx(target, abs=0.03)
        assert model.calibration is not None


def test_method_and_policy_must_agree():
    raw = tiny_recipe(Path("unused"), Path("unused"), objective={"method": "evit"})
    assert load_recipe(raw).model.config.trim.policy == "evit"
    raw["model"]["trim"]["policy"] = "random"
    with pytest.raises(ConfigError, match="model.trim.policy='random' but objective.method='evit'"):
        load_recipe(raw)
    raw = tiny_recipe(Path("unused"), Path("unused"), objective={"method": "evit"}, model={"bridge_layers": [0, 1]})
    with pytest.raises(ConfigError, match="objective.method='evit': model.trim.policy='evit' with model.bridge_layers"):
        load_recipe(raw)
