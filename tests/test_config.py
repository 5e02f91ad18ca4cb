"""Recipes: YAML + dotted overrides -> validated dataclasses; bad recipes rejected naming the key."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from trim.config import Recipe, apply_override, load_recipe, parse_override, recipe_from_dict
from trim.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"

BASE = {
    "name": "unit",
    "model": {
        "family": "dual", "task": "vqa", "num_labels": 25,
        "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2},
        "text": {"vocab_size": 256, "width": 32, "layers": 2, "heads": 2},
        "cross_layers": 2, "cross_width": 32, "cross_heads": 2,
        "trim": {"vision_token_layers": [1], "cross_token_layers": [0, 1], "cross_head_layers": [0, 1]},
    },
    "data": {"root": "data/shapes", "task": "vqa", "image_size": 32, "batch_size": 4},
    "train": {"steps": 20, "lr": 1e-3},
    "objective": {"method": "smarttrim", "target": 0.5},
}


def recipe(*overrides: str, base: dict | None = None) -> Recipe:
    return load_recipe(copy.deepcopy(base or BASE), overrides)


def rejects(match: str, *overrides: str, base: dict | None = None) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        recipe(*overrides, base=base)
    return str(info.value)


def test_valid_recipe_resolves_defaults():
    r = recipe()
    assert r.run_dir == Path("runs/unit")
    assert r.objective.curriculum.steps == 10  # half of train.steps
    assert r.objective.gumbel.steps == 20
    assert r.data.eval_batch_size == 8
    assert r.model.config.trim.cross_head_layers == [0, 1]
    assert r.train.warmup_steps == 2  # 0.1 of 20 steps


def test_dotted_overrides_are_typed_yaml():
    r = recipe("train.lr=3e-4", "objective.target=0.33", "model.trim.vision_token_layers=[0, 1]",
               "train.clip=null", "train.warmup=5", "name=other")
    assert r.train.lr == pytest.approx(3e-4) and isinstance(r.train.lr, float)  # YAML 1.1 reads 3e-4 as a string
    assert r.objective.target == pytest.approx(0.33)
    assert r.model.config.trim.vision_token_layers == [0, 1]
    assert r.train.clip is None and r.train.warmup_steps == 5 and r.name == "other"


def test_resolved_recipe_round_trips():
    r = recipe("objective.curriculum.shape=cubic")
    again = load_recipe(yaml.safe_load(r.to_yaml()))
    assert again.to_dict() == r.to_dict()


@pytest.mark.parametrize("override,match", [
    ("train.lrr=1", r"train\.lrr is not a known key \(did you mean 'lr'\?\).*allowed in train: steps, lr"),
    ("objective.distil.weight=1", r"objective\.distil is not a known key \(did you mean 'distill'\?\)"),
    ("model.vision.widht=64", r"model\.vision\.widht is not a known key \(did you mean 'width'\?\)"),
    ("model.trim.vision_tokens=[1]", r"model\.trim\.vision_tokens is not a known key"),
    ("optimizer.lr=1", r"optimizer is not a known key; allowed at the top level"),
])
def test_unknown_keys_are_named(override, match):
    rejects(match, override)


@pytest.mark.parametrize("override,match", [
    ("train.steps=abc", r"train\.steps='abc' must be a whole number"),
    ("train.steps=2.5", r"train\.steps=2\.5 must be a whole number"),
    ("train.lr=fast", r"train\.lr='fast' must be a number"),
    ("train.progress=3", r"train\.progress=3 must be true or false"),
    ("model.vision.layers=[1]", r"model\.vision\.layers=\[1\] must be a whole number"),
    ("model.trim.vision_token_layers=3", r"model\.trim\.vision_token_layers=3 must be a list"),
    ("data.root=5", r"data\.root=5 must be a string or null"),
    ("train.precision=fp32", r"train\.precision='fp32' is not allowed; choose one of no, bf16, fp16"),
    ("data.rank_split=nodes", r"data\.rank_split='nodes' is not allowed; choose one of batch, shards"),
    ("objective.curriculum.shape=step", r"objective\.curriculum\.shape='step' is not allowed; choose one of linear"),
])
def test_wrong_types_are_named(override, match):
    rejects(match, override)


@pytest.mark.parametrize("override,match", [
    ("objective.target=1.3", r"objective\.target=1\.3 is not a cost ratio; use a value in \(0, 1\]"),
    ("objective.target=0", r"objective\.target=0\.0 is not a cost ratio"),
    ("model.trim.vision_token_layers=[1, 14]", r"model\.trim\.vision_token_layers\[1\]=14 but the vision stack has 2 layers \(0\.\.1\)"),
    ("model.trim.cross_head_layers=[2]", r"model\.trim\.cross_head_layers\[0\]=2 but the cross stack has 2 layers"),
    ("train.steps=0", r"train\.steps=0 must be >= 1"),
    ("train.grad_accum=0", r"train\.grad_accum=0 must be >= 1"),
    ("train.warmup=50", r"train\.warmup=50.* is longer than train\.steps=20"),
    ("data.batch_size=0", r"data\.batch_size=0 must be >= 1"),
    ("data.task=seg", r"data\.task='seg' but model\.task='vqa'"),
    ("objective.method=seg", r"objective\.method=seg is SAM's segmentation loss; model\.task='vqa'"),
    ("objective.seg.click_rounds=-1", r"objective\.seg\.click_rounds=-1 must be >= 0"),
    ("data.task=nlvr2", r"data\.task='nlvr2' but model\.task='vqa'"),
    ("data.image_size=64", r"data\.image_size=64 but model\.vision\.image_size=32"),
    ("objective.curriculum.steps=30", r"objective\.curriculum\.warmup \+ steps = 30 is beyond train\.steps=20"),
    ("objective.distill.kind=kl", r"objective\.distill\.kind=kl: VQA heads are multi-label"),
    ("objective.gumbel.tau_end=0", r"objective\.gumbel\.tau_start=1\.0 and tau_end=0\.0 must be > 0"),
    ("train.deepspeed=launch/deepspeed/nope.json", r"train\.deepspeed='launch/deepspeed/nope\.json' does not exist"),
    ("model.family=clip", r"model\.family='clip'; choose one of \('dual', 'vilt', 'sam'\)"),
    ("model.init_from=/nonexistent/run", r"model\.init_from='/nonexistent/run' does not exist"),
    ("train.lr_mult={head.: 0}", r"train\.lr_mult\.head\.=0\.0 must be > 0"),
])
def test_impossible_values_are_named(override, match):
    rejects(match, override)


def test_smarttrim_needs_trimmers():
    base = copy.deepcopy(BASE)
    del base["model"]["trim"]
    rejects(r"objective\.method='smarttrim' trains trimmers but model\.trim places none", base=base)
    assert recipe("objective.method=none", base=base).objective.method == "none"


def test_missing_sections_and_bad_overrides():
    base = copy.deepcopy(BASE)
    del base["train"]
    rejects(r"the key 'train' is missing", base=base)
    with pytest.raises(ConfigError, match=r"override 'train\.lr' is not key\.sub=value"):
        parse_override("train.lr")
    with pytest.raises(ConfigError, match=r"train\.lr is a value, not a section"):
        apply_override({"train": {"lr": 1.0}}, "train.lr.x=1")
    assert parse_override("model.trim.vision_token_layers=[1,2]") == (["model", "trim", "vision_token_layers"], [1, 2])


def test_init_from_checkpoint_merges_the_recipe_fields(tmp_path):
    from trim.models import ModelConfig, create_model, save_model

    cfg = recipe().model.config
    plain = ModelConfig.from_dict({**cfg.to_dict(), "trim": {}})
    save_model(create_model(plain), tmp_path / "full" / "step_5")
    (tmp_path / "full" / "latest").write_text("step_5\n")
    base = copy.deepcopy(BASE)
    base["model"] = {"init_from": str(tmp_path / "full"), "trim": {"vision_token_layers": [0]}}
    r = recipe(base=base)
    assert r.model.init_from == str((tmp_path / "full" / "step_5").resolve())
    assert r.model.config.vision.width == 32 and r.model.config.trim.vision_token_layers == [0]
    rejects(r"model\.trim\.vision_token_layers\[0\]=7 but the vision stack has 2 layers", "model.trim.vision_token_layers=[7]",
            base=base)
    base["model"]["pretrained"] = "x"
    rejects(r"model\.init_from and model\.pretrained are both set", base=base)


def test_recipe_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe .*missing\.yaml does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_recipe(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_recipe(bad)


def test_cli_rejects_bad_recipes_before_any_work(tmp_path, monkeypatch, capsys):
    """A mistyped key fails with exit code 2, the key in the message, and no run folder or model."""
    import trim.models
    from trim.train.cli import main

    monkeypatch.setattr(trim.models, "create_model", lambda *a, **k: pytest.fail("model built for a bad recipe"))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE))
    out = tmp_path / "runs"
    assert main([str(path), f"output_dir={out}", "train.lrr=1"]) == 2
    assert "train.lrr is not a known key (did you mean 'lr'?)" in capsys.readouterr().err
    assert main([str(path), f"output_dir={out}", "objective.target=1.3"]) == 2
    assert "objective.target=1.3 is not a cost ratio" in capsys.readouterr().err
    assert not out.exists()
    # --check makes the real run's checks, shard metadata included (data/shapes is not written here)
    assert main([str(path), f"output_dir={out}", "--check"]) == 2
    assert "data.root='data/shapes': data/shapes/manifest.json does not exist" in capsys.readouterr().err
    from trim.data import write_synthetic

    write_synthetic(tmp_path / "shapes", {"train": 4, "val": 4}, tasks=("vqa",), image_size=32, progress=False)
    assert main([str(path), f"output_dir={out}", f"data.root={tmp_path / 'shapes'}", "--check"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["objective"]["curriculum"]["steps"] == 10
    assert not out.exists()


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path, monkeypatch):
    """Every recipe in recipes/ is valid. A recipe that starts from another recipe's run
    (model.init_from: runs/<name>) is checked on top of that recipe's model section; one that
    starts from a pretrained source spells out the architecture and is checked without it."""
    from trim.config import deep_merge

    raw = yaml.safe_load(path.read_text())
    model = raw["model"]
    source = model.pop("init_from", None)
    model.pop("pretrained", None)
    if source:
        parent = RECIPES / f"{Path(source).name}.yaml"
        assert parent.is_file(), f"{path.name}: model.init_from={source} names no recipe in recipes/"
        parent_model = yaml.safe_load(parent.read_text())["model"]
        parent_model.pop("init_from", None)  # that recipe's own start (NLVR2 from the VQA run) is not read
        raw["model"] = deep_merge(parent_model, model)
    monkeypatch.chdir(ROOT)  # recipes name launch/ files relative to the repository root
    r = load_recipe(raw)
    assert r.name == path.stem
    json.dumps(r.to_dict())  # plain data all the way down
    if "tiny" in path.name:
        assert r.train.deepspeed is None and r.train.precision == "no"  # they run on a CPU


def test_duplicate_yaml_keys_are_rejected_naming_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    text = yaml.safe_dump(BASE, sort_keys=False) + "train:\n  steps: 5\n"
    path.write_text(text)
    first = 1 + text.splitlines().index("train:")
    with pytest.raises(ConfigError, match=rf"dup\.yaml: the key 'train' is given twice, on lines {first} and "
                                          rf"{len(text.splitlines()) - 1}"):
        load_recipe(path)
    nested = tmp_path / "nested.yaml"
    nested.write_text(text.replace("train:\n  steps: 5\n", "").replace("  lr: 0.001\n", "  lr: 0.001\n  lr: 0.1\n"))
    with pytest.raises(ConfigError, match=r"the key 'lr' is given twice"):
        load_recipe(nested)
    with pytest.raises(ConfigError, match=r"override train.lr_mult: the key 'head.' is given twice"):
        recipe("train.lr_mult={head.: 2, head.: 3}")


def test_model_rules_live_in_model_config_only():
    from trim.models import ModelConfig

    vilt = {**BASE["model"], "family": "vilt", "trim": {"vision_token_layers": [1]}}
    with pytest.raises(ConfigError, match=r"model\.text\.width=16 but model\.vision\.width=32: ViLT is one stream"):
        ModelConfig.from_dict({**vilt, "text": {**vilt["text"], "width": 16}})
    with pytest.raises(ConfigError, match=r"model\.text\.width=16 but model\.vision\.width=32"):
        recipe("model.family=vilt", "model.text.width=16", "model.trim={vision_token_layers: [1]}")
    with pytest.raises(ConfigError, match=r"model\.vision\.widht is not a known key \(did you mean 'width'\?\)"):
        ModelConfig.from_dict({"vision": {"widht": 3}})
    with pytest.raises(ConfigError, match=r"model\.vision\.width='wide' must be a whole number"):
        ModelConfig.from_dict({"vision": {"width": "wide"}})


def test_config_module_imports_nothing_from_train():
    import ast

    tree = ast.parse((ROOT / "trim" / "config.py").read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.startswith(("trim.train", "trim.eval"))], imported
