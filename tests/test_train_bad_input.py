"""The trainer facing bad input: crafted checkpoints, finished runs, recipes that only the data
or the model can refute, an output folder it cannot write, corrupt samples."""

from __future__ import annotations

import copy
import io
import json
import os
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from tiny_runs import tiny_recipe
from trim.config import load_recipe
from trim.errors import CheckpointError, ConfigError
from trim.train.checkpoint import verify_deepspeed_files
from trim.train.cli import main
from trim.train.objectives import build_objective
from trim.train.trainer import Trainer


def tiny(data_root: Path, out: Path, **train) -> dict:
    """Plain fine-tuning of the tiny dual-stream model: the cheapest run that saves and evaluates."""
    return tiny_recipe(data_root, out, model={"trim": {}}, objective={"method": "none"},
                       train={"steps": 2, "save_every": 0, "eval_every": 0, **train})


def write_yaml(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` with its bytes and mtime: any write shows up."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


class RunsCommand:
    """Unpickling this runs ``touch <marker>``: what a crafted checkpoint file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ----------------------------------------------------------------------------- crafted checkpoints


@pytest.mark.parametrize("victim", ["rng_rank0.pt", "optimizer.pt"])
def test_a_crafted_checkpoint_file_is_refused_and_runs_nothing(shapes, tmp_path, victim):
    raw = tiny(shapes, tmp_path / "runs")
    Trainer(load_recipe(raw)).run()
    step_dir = tmp_path / "runs" / "tiny" / "step_2"

    # The crafted file really runs its command when unpickled the old way ...
    proof = tmp_path / "proof"
    torch.save({"state": RunsCommand(proof)}, tmp_path / "proof.pt")
    torch.load(tmp_path / "proof.pt", weights_only=False)
    assert proof.exists()
    # ... and resuming from a checkpoint holding one refuses it, naming the file.
    marker = tmp_path / "pwned"
    torch.save({"state": RunsCommand(marker)}, step_dir / victim)
    resumed = load_recipe(copy.deepcopy(raw), ["train.resume=latest", "train.steps=4"])
    with pytest.raises(CheckpointError, match=rf"{victim} holds objects other than tensors and plain data"):
        Trainer(resumed).run()
    assert not marker.exists()


def test_deepspeed_files_are_verified_before_deepspeed_unpickles_them(tmp_path):
    ds = tmp_path / "deepspeed"
    ds.mkdir()
    torch.save({"module": {"w": torch.zeros(2)}, "ds_version": "0.19"}, ds / "mp_rank_00_model_states.pt")
    verify_deepspeed_files(ds)  # plain data passes
    marker = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": RunsCommand(marker)}, ds / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match=r"zero_pp_rank_0_mp_rank_00_optim_states\.pt holds objects other"):
        verify_deepspeed_files(ds)
    assert not marker.exists()


# ----------------------------------------------------------------------------- a finished run


def test_resuming_a_finished_run_leaves_it_exactly_as_it_was(shapes, tmp_path, capsys):
    raw = tiny(shapes, tmp_path / "runs")
    first = Trainer(load_recipe(raw)).run()
    run = tmp_path / "runs" / "tiny"
    before = snapshot(run)
    assert {"summary.json", "recipe.yaml", "metrics.jsonl"} <= set(before)
    for steps in (2, 1):  # the recipe's steps reached, and a recipe asking for fewer than the checkpoint has
        again = Trainer(load_recipe(copy.deepcopy(raw), ["train.resume=latest", f"train.steps={steps}"])).run()
        assert again["already_done"] and again["steps"] == 2 and again["final_eval"] == first["final_eval"]
        assert snapshot(run) == before
    path = write_yaml(tmp_path / "tiny.yaml", raw)
    assert main([str(path), "train.resume=latest", "--check"]) == 0
    assert "already at step 2 (train.steps=2): nothing to do" in capsys.readouterr().err
    assert main([str(path), "train.resume=latest"]) == 0
    assert snapshot(run) == before


# ----------------------------------------------------------------------------- --check = the real run's checks


def test_check_rejects_what_the_real_run_rejects(shapes, tmp_path, capsys):
    out = tmp_path / "runs"
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ({"data": {"root": str(empty)}}, "manifest.json does not exist"),
        ({"model": {"num_labels": 30}}, "model.num_labels=30 but the VQA answer vocabulary has 25 answers"),
    ]
    for change, message in cases:
        raw = tiny(shapes, out)
        for section, values in change.items():
            raw[section].update(values)
        path = write_yaml(tmp_path / "bad.yaml", raw)
        assert main([str(path), "--check"]) == 2, change
        assert message in capsys.readouterr().err
        assert main([str(path)]) == 2, change
        assert message in capsys.readouterr().err
    assert not out.exists(), "nothing is created before the checks pass"
    good = write_yaml(tmp_path / "good.yaml", tiny(shapes, out))
    assert main([str(good), "--check"]) == 0
    assert "name: tiny" in capsys.readouterr().out


def test_the_objective_registry_and_param_groups_do_their_own_checks(shapes, tmp_path):
    with pytest.raises(ConfigError, match=r"objective\.method='nope' is unknown; choose one of none, smarttrim"):
        build_objective(SimpleNamespace(method="nope"), "vqa")
    recipe = load_recipe(tiny(shapes, tmp_path / "runs"))
    recipe.train.lr_mult = {"heads.": 2.0}  # past config.py: the trainer's own check must catch it
    with pytest.raises(ConfigError, match=r"train\.lr_mult: prefix 'heads\.' matches no parameter"):
        Trainer(recipe).check()


def test_an_unwritable_output_dir_is_a_config_error_before_any_work(shapes, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    raw = tiny(shapes, blocker / "sub")  # fails for every user, root included
    with pytest.raises(ConfigError, match=r"output_dir='.*afile/sub': .*afile is a file, so the run folder"):
        Trainer(load_recipe(raw)).run()
    path = write_yaml(tmp_path / "r.yaml", raw)
    assert main([str(path), "--check"]) == 2
    assert "output_dir=" in capsys.readouterr().err



@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: a 0o500 folder is still writable, so there is nothing to refuse")
def test_a_read_only_output_dir_is_a_config_error(shapes, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match=r"output_dir=.*locked.* is not writable"):
            Trainer(load_recipe(tiny(shapes, locked))).check()
    finally:
        locked.chmod(0o700)


# ----------------------------------------------------------------------------- corrupt samples


def corrupt_images(shard: Path, every: int) -> int:
    """Replace every ``every``-th sample's image with bytes that do not decode; returns how many."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    images = [m.name for m, _ in members if m.name.endswith((".jpg", ".png"))]
    broken = set(images[::every])
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name in broken:
                data = b"\xff\xd8 not an image"
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return len(broken)


@pytest.fixture()
def damaged(shapes, tmp_path) -> tuple[Path, int]:
    import shutil

    root = tmp_path / "damaged"
    shutil.copytree(shapes, root)
    corrupt_images(root / "vqa" / "train-000000.tar", every=8)
    return root, corrupt_images(root / "vqa" / "val-000000.tar", every=12)


def test_skipped_samples_reach_metrics_and_summary(damaged, tmp_path):
    root, val_broken = damaged
    raw = tiny(root, tmp_path / "runs", steps=4, save_every=2, eval_every=2)
    summary = Trainer(load_recipe(raw)).run()
    run = tmp_path / "runs" / "tiny"
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4]
    for record in evals:
        assert record["samples"] == 24 - val_broken and record["samples_expected"] == 24
        assert record["skipped"] == {"bad_image": val_broken}
    train_skips = summary["train_reads"]["skipped"]["bad_image"]
    assert train_skips >= 1 and evals[-1]["train_skipped"] == {"bad_image": train_skips}
    assert json.loads((run / "summary.json").read_text())["final_eval"]["skipped"] == {"bad_image": val_broken}

    # Resumed halfway, the totals are those of the uninterrupted run: the batches re-read to
    # reach the data position are not counted twice.
    raw2 = tiny(root, tmp_path / "runs2", steps=2, save_every=2)
    Trainer(load_recipe(raw2)).run()
    resumed = Trainer(load_recipe(copy.deepcopy(raw2), ["train.resume=latest", "train.steps=4"])).run()
    assert resumed["train_reads"] == summary["train_reads"]
