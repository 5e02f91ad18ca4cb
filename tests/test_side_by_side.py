"""Pruned runs trained side by side: each gets its share of the cores, its own log, one progress bar."""

import json
import sys
from pathlib import Path

import pytest

import trim.side_by_side as sbs

# Stands in for `trim train`: logs a few training steps into OUTPUT_DIR/NAME/metrics.jsonl the way
# the trainer does, records when it ran and with how many threads, and fails when its name says so.
FAKE_TRAIN = """
import json, os, sys, time
args = dict(a.split("=", 1) for a in sys.argv[2:] if "=" in a)
run = os.path.join(args["output_dir"], args["name"])
os.makedirs(run, exist_ok=True)
start = time.time()
for step in (1, 2, 3):
    time.sleep(0.3)
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"kind": "train", "step": step}) + "\\n")
with open(os.path.join(run, "ran.json"), "w") as f:
    json.dump({"start": start, "end": time.time(), "threads": os.environ["OMP_NUM_THREADS"]}, f)
print("training", args["name"])
sys.exit(3 if "broken" in args["name"] else 0)
"""


@pytest.fixture
def fake_trim(tmp_path, monkeypatch):
    script = tmp_path / "fake_trim.py"
    script.write_text(FAKE_TRAIN)
    monkeypatch.setattr(sbs, "TRIM", [sys.executable, str(script)])
    monkeypatch.setattr(sbs, "POLL_S", 0.05)


def job(out, name):
    return sbs.Job(["train", "recipe.yaml", f"output_dir={out}", f"name={name}"], out / name, steps=3)


def test_runs_train_at_once_each_with_its_threads_and_log(tmp_path, fake_trim):
    jobs = [job(tmp_path, "a"), job(tmp_path, "b")]
    sbs.train_side_by_side(jobs, at_once=2, threads=1)
    ran = [json.loads((j.run / "ran.json").read_text()) for j in jobs]
    assert all(r["threads"] == "1" for r in ran)
    assert max(r["start"] for r in ran) < min(r["end"] for r in ran)  # they overlapped
    assert all(j.log.read_text().strip() == f"training {j.run.name}" for j in jobs)
    assert all(sbs.last_step(j.run) == 3 for j in jobs)


def test_at_once_bounds_how_many_run_together(tmp_path, fake_trim):
    jobs = [job(tmp_path, "a"), job(tmp_path, "b")]
    sbs.train_side_by_side(jobs, at_once=1, threads=2)
    first, second = (json.loads((j.run / "ran.json").read_text()) for j in jobs)
    assert first["end"] <= second["start"] and second["threads"] == "2"


def test_a_failed_run_is_named_with_its_log_and_the_others_finish(tmp_path, fake_trim):
    jobs = [job(tmp_path, "broken"), job(tmp_path, "fine")]
    with pytest.raises(SystemExit) as err:
        sbs.train_side_by_side(jobs, at_once=2, threads=1)
    message = str(err.value)
    assert "1 of 2 runs failed" in message and str(tmp_path / "broken") in message
    assert str(jobs[0].log) in message and "training broken" in message
    assert sbs.last_step(jobs[1].run) == 3


def test_last_step_skips_a_half_written_line_and_eval_records(tmp_path):
    assert sbs.last_step(tmp_path) == 0
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 40}) + "\n"
                                           + json.dumps({"kind": "eval", "step": 40}) + '\n{"kind": "tr')
    assert sbs.last_step(tmp_path) == 40


def test_retention_trains_pruned_runs_side_by_side_then_evaluates_each(tmp_path, monkeypatch):
    import trim.retention as retention

    commands, batches, evaluated = [], [], []
    monkeypatch.setattr(retention, "run_trim", lambda argv, trim_main=None: commands.append(argv))
    monkeypatch.setattr(retention, "train_side_by_side",
                        lambda jobs, at_once, threads: batches.append((jobs, at_once, threads)))
    monkeypatch.setattr(retention, "evaluate",
                        lambda run, task, data, **kw: evaluated.append(run) or run / "eval" / f"{task}.json")
    runs = [("smarttrim", 0.5), ("random", 0.5), ("text_agnostic", 0.5)]
    paths = retention.run_plan(retention.Plan("vqa", runs, trim_steps=40, jobs=2), retention.SynthData(), tmp_path)
    (jobs, at_once, threads), = batches
    assert at_once == 2 and threads >= 1
    assert [j.run for j in jobs] == [tmp_path / retention.run_name("vqa", m, t) for m, t in runs]
    assert all(j.steps == 40 and f"objective.method={m}" in j.argv for j, (m, _) in zip(jobs, runs))
    assert not any(c[0] == "train" and "objective.method=random" in c for c in commands)  # not trained twice
    assert evaluated[-3:] == [j.run for j in jobs] and len(paths["trimmed"]) == 3


def test_one_job_trains_in_process_as_before(tmp_path, monkeypatch):
    import trim.retention as retention

    commands = []
    monkeypatch.setattr(retention, "run_trim", lambda argv, trim_main=None: commands.append(argv))
    monkeypatch.setattr(retention, "train_side_by_side", lambda *a, **k: pytest.fail("ran side by side"))
    monkeypatch.setattr(retention, "evaluate", lambda run, task, data, **kw: run / "eval" / f"{task}.json")
    retention.run_plan(retention.Plan("vqa", [("smarttrim", 0.5), ("random", 0.5)], jobs=1), retention.SynthData(),
                       tmp_path)
    assert [c[-1] for c in commands if "objective.method=random" in c or "objective.method=smarttrim" in c] \
        == ["objective.target=0.5"] * 2


def test_recipe_steps_count_overrides():
    from trim.retention import _train_steps

    recipe = str(Path(__file__).parent.parent / "recipes" / "shapes_vqa_dual_tiny_smarttrim.yaml")
    assert _train_steps(["train", recipe]) == 600
    assert _train_steps(["train", recipe, "train.steps=300", "name=x"]) == 300


def test_default_jobs_one_per_core_on_cpu(monkeypatch):
    import torch

    monkeypatch.setattr(sbs.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sbs.default_jobs(6) == 4 and sbs.default_jobs(2) == 2 and sbs.threads_per_job(2) == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert sbs.default_jobs(6) == 1
