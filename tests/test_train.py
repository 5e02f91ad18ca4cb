"""The trainer in one process: objective, schedules, checkpoints, resume, run folder."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tiny_runs import tiny_recipe
from trim.config import load_recipe
from trim.errors import ConfigError
from trim.train.checkpoint import latest_checkpoint, list_checkpoints
from trim.ranks import rank_slice, slice_batch
from trim.train.data import TrainStream
from trim.train.distributed import apply_launcher_env, load_deepspeed_config
from trim.train.objectives import METHODS, build_objective, task_loss
from trim.train.trainer import lr_factor, param_groups

ROOT = Path(__file__).resolve().parents[1]


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- pieces


def test_lr_schedule_warms_up_then_cosine():
    f = [lr_factor(s, total=100, warmup=10, min_ratio=0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert f[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] > 0.1


def test_task_losses_follow_vilt_meter():
    logits, soft = torch.randn(3, 5), torch.rand(3, 5)
    assert task_loss(logits, soft, "vqa") == pytest.approx(float(F.binary_cross_entropy_with_logits(logits, soft) * 5))
    labels = torch.tensor([0, 1, 1])
    assert task_loss(logits[:, :2], labels, "nlvr2") == pytest.approx(float(F.cross_entropy(logits[:, :2], labels)))


class FakeModel(torch.nn.Module):
    """Returns what a TrimModel returns; its cost ratio depends on one parameter."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.0))
        self.calls = []

    def forward(self, batch, trim="off", tau=1.0):
        self.calls.append((trim, tau))
        b = batch["labels"].shape[0]
        ratio = torch.sigmoid(self.w + torch.arange(b, dtype=torch.float32)) if trim == "train" else torch.ones(b)
        logits = torch.zeros(b, 25) + self.w
        return SimpleNamespace(logits=logits, cost_ratio=ratio, hidden=logits[:, :4] + 1.0, records={}, prefix=None)


def test_smarttrim_objective_terms(monkeypatch):
    recipe = load_recipe(tiny_recipe(Path("unused"), Path("unused"), objective={"lambda_cost": 3.0, "target": 0.4}))
    objective = build_objective(recipe.objective, "vqa")
    assert objective.target(0) == 1.0 and objective.target(4) == pytest.approx(0.4)
    model = FakeModel()
    batch = {"labels": torch.rand(4, 25)}
    result = objective(model, batch, 2, teacher=lambda b, prefix: model(b, trim="off"))
    ratio = torch.sigmoid(torch.arange(4.0)).mean()
    assert result.terms["target"] == pytest.approx(0.7)
    assert result.terms["loss/cost"] == pytest.approx(float((ratio - 0.7) ** 2))
    assert result.terms["tau"] == pytest.approx(objective.tau(2)) and 0.5 < objective.tau(2) < 1.0
    assert [c[0] for c in model.calls] == ["train", "off"]  # student, then teacher
    expected = (result.terms["loss/task"] + 3.0 * result.terms["loss/cost"] + result.terms["loss/distill"]
                + 0.1 * result.terms["loss/hidden"])
    assert result.terms["loss"] == pytest.approx(expected, rel=1e-5)
    result.loss.backward()
    assert model.w.grad is not None
    # The cost term sees the global mean when a reduction is given.
    doubled = objective(model, batch, 2, teacher=lambda b, prefix: model(b, trim="off"), global_mean=lambda x: x * 0 + 0.7)
    assert doubled.terms["loss/cost"] == pytest.approx(0.0)
    plain = METHODS["none"](recipe.objective, task="vqa")(model, batch, 0)
    assert set(plain.terms) == {"loss", "loss/task", "cost_ratio"} and model.calls[-1][0] == "off"


def test_param_groups_give_trimmers_their_own_lr():
    from trim.models import create_model

    recipe = load_recipe(tiny_recipe(Path("unused"), Path("unused")))
    model = create_model(recipe.model.config)
    groups = param_groups(model, lr=1e-3, trimmer_lr=1e-2, weight_decay=0.05)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone", "backbone_no_decay", "trimmer", "trimmer_no_decay"}
    assert by_name["trimmer"]["lr"] == 1e-2 and by_name["backbone"]["lr"] == 1e-3
    assert by_name["backbone_no_decay"]["weight_decay"] == 0.0
    n = sum(len(g["params"]) for g in groups)
    assert n == len(list(model.parameters()))
    assert sum(len(g["params"]) for g in groups if g["name"].startswith("trimmer")) == len(list(model.trimmer_parameters()))


def test_deepspeed_config_takes_its_numbers_from_the_recipe(tmp_path):
    cfg = load_deepspeed_config(str(ROOT / "launch/deepspeed/zero2.json"), batch_size=4, grad_accum=2, clip=1.0,
                                precision="bf16", world=3)
    assert cfg["train_batch_size"] == 24 and cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["gradient_clipping"] == 1.0
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    assert cfg["zero_optimization"]["stage"] == 2
    z3 = load_deepspeed_config(str(ROOT / "launch/deepspeed/zero3.json"), batch_size=1, grad_accum=1, clip=None,
                               precision="no", world=1)
    assert z3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"optimizer": {"type": "Adam"}, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="defines 'optimizer'"):
        load_deepspeed_config(str(bad), batch_size=1, grad_accum=1, clip=None, precision="no", world=1)
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}))
    with pytest.raises(ConfigError, match="sets train_micro_batch_size_per_gpu=8 but the recipe implies 4"):
        load_deepspeed_config(str(bad), batch_size=4, grad_accum=1, clip=None, precision="no", world=1)


def test_srun_environment_is_mapped(monkeypatch):
    import os

    # A private copy: the mapping writes RANK/WORLD_SIZE, which must not leak into later tests.
    fake = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    fake.update(SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_NTASKS_PER_NODE="4(x2)",
                SLURM_JOB_NODELIST="gpu[07-08]", SLURM_JOB_ID="123456", PATH="/nonexistent")  # no scontrol
    monkeypatch.setattr(os, "environ", fake)
    apply_launcher_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "8", "1")
    assert os.environ["LOCAL_WORLD_SIZE"] == "4" and os.environ["MASTER_ADDR"] == "gpu07"
    assert os.environ["MASTER_PORT"] == str(29500 + 123456 % 1000)


def test_rank_slices_cover_the_batch():
    for n in (1, 5, 8):
        for world in (1, 2, 3):
            parts = [rank_slice(n, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    batch = {"pixel_values": torch.arange(6), "question": list("abcdef"), "meta": 3}
    part = slice_batch(batch, 2, 4)
    assert part["pixel_values"].tolist() == [2, 3] and part["question"] == ["c", "d"] and part["meta"] == 3


class EpochLoader:
    """Deterministic per epoch, like trim.data's train loader."""

    def __init__(self):
        self.epoch, self.opened = 0, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        self.opened += 1
        e, self.epoch = self.epoch, self.epoch + 1
        g = torch.Generator().manual_seed(e)
        for _ in range(3):
            yield {"pixel_values": torch.randint(0, 100, (4,), generator=g)}


def test_train_stream_resumes_at_the_same_batch():
    full = TrainStream(EpochLoader, rank=0, world=1, per_rank=4, split="batch")
    seen = [next(full)["pixel_values"] for _ in range(8)]
    part = TrainStream(EpochLoader, rank=0, world=1, per_rank=4, split="batch")
    for _ in range(4):
        next(part)
    state = part.state_dict()
    assert state == {"epoch": 1, "batch_in_epoch": 1}
    again = TrainStream(EpochLoader, rank=0, world=1, per_rank=4, split="batch")
    again.load_state_dict(state)
    for want in seen[4:]:
        torch.testing.assert_close(next(again)["pixel_values"], want)
    halves = [TrainStream(EpochLoader, rank=r, world=2, per_rank=2, split="batch") for r in (0, 1)]
    first = torch.cat([next(h)["pixel_values"] for h in halves])
    torch.testing.assert_close(first, seen[0])


# ----------------------------------------------------------------------------- end to end


def test_train_checkpoint_resume_and_init_from(shapes, tmp_path, capsys):
    """Full + SmartTrim in one process: run folder, checkpoints, load_model, resume, init_from."""
    from trim.models import load_model
    from trim.train.cli import main
    import yaml

    out = tmp_path / "runs"
    full = tiny_recipe(shapes, out, name="full", objective={"method": "none"},
                       model={"trim": {}}, train={"steps": 4, "save_every": 2, "eval_every": 0})
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump(full))
    assert main([str(path)]) == 0
    run = out / "full"
    assert {p.name for p in run.iterdir()} >= {"recipe.yaml", "metrics.jsonl", "latest", "step_2", "step_4", "tb",
                                               "summary.json"}
    assert (run / "latest").read_text().strip() == "step_4"
    assert sorted(p.name for p in (run / "step_4").iterdir()) == [
        "config.json", "model.safetensors", "optimizer.pt", "rng_rank0.pt", "trainer_state.json"]
    config = json.loads((run / "step_4" / "config.json").read_text())
    assert config["train"]["steps"] == 4 and config["objective"]["method"] == "none" and "model" in config
    assert any(p.name.startswith("events") for p in (run / "tb").iterdir())
    metrics = read_metrics(run)
    train_lines = [m for m in metrics if m["kind"] == "train"]
    assert [m["step"] for m in train_lines] == [1, 2, 3, 4]
    assert {"loss", "loss/task", "cost_ratio", "lr", "samples_per_s", "step_time", "grad_norm"} <= set(train_lines[0])
    final = [m for m in metrics if m["kind"] == "eval"]
    assert len(final) == 1 and final[0]["step"] == 4 and final[0]["samples"] == 24 and 0 <= final[0]["accuracy"] <= 1
    model = load_model(run / "step_4")  # trim.models reads the training checkpoint as is
    assert model.config.vision.width == 32

    # The same recipe again without resume would overwrite checkpoints: refused, naming the fix.
    assert main([str(path)]) == 2
    assert "train.resume=latest" in capsys.readouterr().err
    # Continue to 6 steps: the log goes on from step 5.
    assert main([str(path), "train.resume=latest", "train.steps=6"]) == 0
    steps = [m["step"] for m in read_metrics(run) if m["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert json.loads((run / "step_6" / "trainer_state.json").read_text())["samples"] == 24

    # SmartTrim from that checkpoint: the recipe adds trimmers; every other weight comes from the run.
    # (backbone lr ~0 here, so the backbone must still equal the source after training)
    st = tiny_recipe(shapes, out, name="st", model={"init_from": str(run), "trim": {"vision_token_layers": [1],
                                                                                     "cross_token_layers": [0]}},
                     train={"steps": 3, "save_every": 0, "eval_every": 0, "lr": 1e-12, "weight_decay": 0.0},
                     objective={"curriculum": {"steps": 3}})
    del st["model"]["family"], st["model"]["vision"], st["model"]["text"]
    path = tmp_path / "st.yaml"
    path.write_text(yaml.safe_dump(st))
    assert main([str(path)]) == 0
    trimmed = load_model(out / "st" / "step_3")
    assert trimmed.config.trim.cross_token_layers == [0]
    source = load_model(run / "step_6").state_dict()
    new = trimmed.state_dict()
    assert set(source) < set(new)
    for key, value in source.items():
        torch.testing.assert_close(new[key], value, atol=1e-8, rtol=0)
    assert any("trimmer" in k for k in set(new) - set(source))
    metrics = read_metrics(out / "st")
    train_lines = [m for m in metrics if m["kind"] == "train"]
    assert [m["target"] for m in train_lines] == pytest.approx([1.0, 1 - 0.4 / 3, 1 - 0.8 / 3])
    assert {"loss/cost", "loss/distill", "loss/hidden", "kept_tokens/vision", "kept_heads/cross_image", "tau",
            "lr/trimmer"} <= set(train_lines[0])
    assert train_lines[0]["lr/trimmer"] == pytest.approx(1e10 * train_lines[0]["lr/backbone"])
    ev = [m for m in metrics if m["kind"] == "eval"][-1]
    assert ev["trim"] == "masked" and ev["cost_ratio"] > 0
    assert list_checkpoints(out / "st")[-1] == latest_checkpoint(out / "st")
    # The final checkpoint is calibrated to the target on held-out inputs, and serves it by default.
    summary = json.loads((out / "st" / "summary.json").read_text())
    target = json.loads((out / "st" / "step_3" / "config.json").read_text())["objective"]["target"]
    assert summary["calibration"]["target"] == target and summary["calibration"]["samples"] == 24
    assert trimmed.calibration is not None and trimmed.calibration.target == target
    assert summary["calibration"]["mean_cost"] == pytest.approx(trimmed.calibration.mean_cost)
    assert "calibration" not in json.loads((run / "step_6" / "config.json").read_text())  # method none: not fitted


def test_resume_refuses_a_different_model(shapes, tmp_path):
    from trim.train.trainer import Trainer

    out = tmp_path / "runs"
    raw = tiny_recipe(shapes, out, train={"steps": 2, "save_every": 0, "eval_every": 0, "eval_at_end": False},
                      objective={"curriculum": {"steps": 2}})
    Trainer(load_recipe(raw)).run()
    changed = load_recipe(copy.deepcopy(raw), ["train.resume=latest", "model.cross_width=64"])
    trainer = Trainer(changed)
    assert trainer.plan_resume() == out / "tiny" / "step_2"
    with pytest.raises(ConfigError, match=r"different model \(model\.cross_width: 32 vs 64\)"):
        trainer.check_compatible(out / "tiny" / "step_2")


def test_lr_multipliers_by_prefix():
    from trim.models import create_model

    recipe = load_recipe(tiny_recipe(Path("unused"), Path("unused")))
    model = create_model(recipe.model.config)
    groups = param_groups(model, lr=1e-3, trimmer_lr=1e-2, weight_decay=0.0, lr_mult={"head.": 50, "text_layers.": 5})
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["backbone_x50"] == pytest.approx(5e-2) and lrs["backbone_no_decay_x5"] == pytest.approx(5e-3)
    assert lrs["trimmer"] == 1e-2 and lrs["backbone"] == 1e-3
    head = {id(p) for p in model.head.parameters()}
    assert all(id(p) in head for g in groups if g["name"].endswith("_x50") for p in g["params"])
    with pytest.raises(ConfigError, match=r"train\.lr_mult: prefix 'heads\.' matches no parameter; top-level modules: .*head\."):
        param_groups(model, lr=1e-3, trimmer_lr=1e-2, weight_decay=0.0, lr_mult={"heads.": 2})


def test_binarize_term_reads_every_trimmer_decision():
    from trim.models import create_model
    from trim.train.objectives import indecision, keep_probabilities

    recipe = load_recipe(tiny_recipe(Path("unused"), Path("unused"), objective={"binarize": 2.0}))
    model = create_model(recipe.model.config)
    ids = torch.randint(5, 100, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    batch = {"pixel_values": torch.randn(3, 3, 32, 32), "input_ids": ids, "attention_mask": mask,
             "labels": torch.rand(3, 25)}
    with keep_probabilities(model) as probs:
        model(batch, trim="train")
    # 1 vision token trimmer + 2 x 2 cross token trimmers + 2 x 4 cross head trimmers
    assert len(probs) == 13
    assert all(((p > 0) & (p < 1)).all() for p in probs)
    # a fresh trimmer keeps with p = sigmoid(3): the penalty is 4 p (1 - p)
    p0 = torch.sigmoid(torch.tensor(3.0))
    assert float(indecision(probs).detach()) == pytest.approx(float(4 * p0 * (1 - p0)), rel=1e-4)
    objective = build_objective(recipe.objective, "vqa")
    result = objective(model, batch, 0, teacher=lambda b, prefix: model(b, trim="off"))
    assert result.terms["loss/binarize"] == pytest.approx(float(4 * p0 * (1 - p0)), rel=1e-4)
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed again


def test_teacher_sharing_the_students_prefix_changes_no_loss_or_gradient():
    """The SmartTrim step with the teacher resuming from the student's prefix (`ModelOutput.prefix`)
    gives the same loss terms and gradients as with a teacher that runs whole."""
    from trim.models import create_model

    recipe = load_recipe(tiny_recipe(Path("unused"), Path("unused"), objective={"binarize": 1.0}))
    model = create_model(recipe.model.config)
    objective = build_objective(recipe.objective, "vqa")
    ids = torch.randint(5, 100, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    batch = {"pixel_values": torch.randn(3, 3, 32, 32), "input_ids": ids, "attention_mask": mask,
             "labels": torch.rand(3, 25)}

    def step(share: bool):
        torch.manual_seed(0)  # the same Gumbel samples
        model.zero_grad()
        teacher = lambda b, prefix: model(b, trim="off", resume=prefix if share else None)  # noqa: E731
        result = objective(model, batch, 1, teacher=teacher)
        result.loss.backward()
        return result.terms, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (terms, grads), (shared_terms, shared_grads) = step(False), step(True)
    assert shared_terms == pytest.approx(terms, rel=1e-6, abs=1e-7) and terms["loss/distill"] > 0
    assert shared_grads.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(shared_grads[name], g, atol=1e-7, rtol=1e-6, msg=name)
