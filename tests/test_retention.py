"""trim bench retention: the table it prints, read from eval results."""

from trim.retention import format_table, run_name, table_rows


def result(accuracy, cost, method=None, target=None, lift=None, speed=(None, None), ran=None):
    return {"accuracy": accuracy, "accuracy_ci95": 1.25, "cost_ratio": {"mean": ran or cost}, "sample_cost": {"mean": cost},
            "run": {"method": method, "target": target} if method else {},
            "relevance": {"last": {"recall": 0.8, "lift": lift}} if lift else None,
            "speed": {"latency": {"speedup": speed[0]}, "throughput": {"speedup": speed[1], "batch_size": 32, "cost_ratio": ran}}}


def test_table_measures_every_method_against_the_full_model():
    full, blind = result(90.0, 1.0, speed=(1.0, 1.0)), result(45.0, 1.0)
    trimmed = [result(89.5, 0.49, "smarttrim", 0.5, lift=2.1, speed=(1.3, 1.7), ran=0.62),
               result(80.0, 0.51, "random", 0.5, lift=1.0, speed=(1.2, 1.6))]
    rows = table_rows(full, blind, trimmed)
    assert [r["method"] for r in rows] == ["full", "blind (no image)", "smarttrim", "random"]
    assert rows[0]["change"] is None and rows[1]["change"] == -45.0
    assert rows[2]["change"] == -0.5 and rows[3]["change"] == -10.0
    text = format_table(rows)
    lines = text.splitlines()
    assert "speedup@32" in lines[0] and "ran@32" in lines[0]
    smarttrim = next(line for line in lines if line.startswith("smarttrim"))
    # cost is what each sample kept; ran@32 what the timed batch of 32 ran (padding, head unions)
    assert smarttrim.split() == ["smarttrim", "0.5", "0.490", "0.620", "89.50", "1.25", "-0.50", "0.800", "2.10", "1.30", "1.70"]
    assert next(line for line in lines if line.startswith("blind")).split()[-4:] == ["-", "-", "-", "-"]


def test_run_names_are_distinct_per_method_and_target():
    names = {run_name("vqa", m, t) for m in ("smarttrim", "random") for t in (0.5, 0.33)}
    assert len(names) == 4 and run_name("vqa", "full") == "shapes_vqa_dual_tiny_full"


def test_nlvr2_starts_from_the_vqa_model_of_the_same_world(tmp_path, monkeypatch):
    """From the tower alone the tiny NLVR2 model stays at chance: the bench trains VQA first."""
    import trim.retention as retention

    commands = []
    monkeypatch.setattr(retention, "run_trim", lambda argv, trim_main=None: commands.append(argv))
    monkeypatch.setattr(retention, "evaluate", lambda run, task, data, **kw: run / "eval" / f"{task}.json")
    plan = retention.Plan("nlvr2", [("smarttrim", 0.5)], full_steps=7)
    retention.run_plan(plan, retention.SynthData(), tmp_path)
    synth, pretrain, vqa, nlvr2, trimmed = commands
    assert synth[synth.index("--tasks") + 1] == "vqa,nlvr2,seg"
    assert pretrain[:2] == ["pretrain-vision", "recipes/shapes_vqa_dual_tiny_full.yaml"]
    assert vqa[1] == "recipes/shapes_vqa_dual_tiny_full.yaml" and f"model.init_from={tmp_path / 'vision_pretrained'}" in vqa
    assert "train.steps=7" not in vqa  # --full-steps is the NLVR2 model's
    assert nlvr2[1] == "recipes/shapes_nlvr2_dual_tiny_full.yaml" and "train.steps=7" in nlvr2
    assert f"model.init_from={tmp_path / 'shapes_vqa_dual_tiny_full'}" in nlvr2
    assert f"model.init_from={tmp_path / 'shapes_nlvr2_dual_tiny_full'}" in trimmed
    # the split is evaluated whole (5,000: +-1 point); training validates and calibrates on its first 1,000
    assert synth[synth.index("--val") + 1] == "5000"
    assert all("data.val_samples=1000" in run for run in (vqa, nlvr2, trimmed))
    vqa_synth = retention.SynthData().synth_argv(tmp_path, "vqa")
    assert vqa_synth[vqa_synth.index("--tasks") + 1] == "vqa,seg"


def test_nlvr2_trains_on_more_scenes_unless_told_otherwise():
    """On 20,000 pairs the tiny NLVR2 model fitted them and stopped at 80% val accuracy."""
    from trim.retention import _parser, world_of

    assert world_of(_parser().parse_args([])).train_samples == 20_000
    assert world_of(_parser().parse_args(["--task", "nlvr2"])).train_samples == 60_000
    assert world_of(_parser().parse_args(["--task", "nlvr2", "--train-samples", "500"])).train_samples == 500


def test_rescore_evaluates_every_finished_run_on_the_other_split(tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "retention_rescore.py"
    spec = importlib.util.spec_from_file_location("retention_rescore", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    commands = []
    import trim.retention as retention

    monkeypatch.setattr(retention, "run_trim", lambda argv, trim_main=None: commands.append(argv))
    for name in (run_name("vqa", "full"), run_name("vqa", "evit", 0.5)):  # a finished run has a 'latest' file
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "latest").write_text("step_1\n")
    (tmp_path / "runs" / run_name("vqa", "random", 0.5)).mkdir()  # still training: left out
    paths = module.rescore(tmp_path / "runs", tmp_path / "val5k", tmp_path / "out", "vqa")
    assert [Path(p).parent.parent.name for p in paths["trimmed"]] == [run_name("vqa", "evit", 0.5)]
    assert paths["blind"].name == "vqa_blind.json" and len(commands) == 3
    assert all("--no-speed" in c and c[c.index("--data") + 1] == str(tmp_path / "val5k") for c in commands)
    assert "--blind" in commands[1]
