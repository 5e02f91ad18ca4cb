"""`trim eval` / `trim eval report` end to end on a tiny randomly trimmed model and synthetic shards."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trim.eval.cli import main as eval_main

N_VAL, SHARD_SIZE = 24, 6  # 4 shards: two ranks read different ones
SPEED = ["--warmup", "1", "--repeats", "2"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from trim.data.cli import main as data_main

    root = tmp_path_factory.mktemp("shards")
    assert data_main(["synth", "--out", str(root), "--train", "0", "--val", str(N_VAL), "--test", "0",
                      "--image-size", "32", "--tasks", "vqa,nlvr2", "--shard-size", str(SHARD_SIZE),
                      "--quiet"]) == 0
    return root


def _checkpoint(root: Path, out: Path, task: str) -> Path:
    from trim.data import load_tokenizer
    from trim.models import ModelConfig, TextConfig, TrimConfig, VisionConfig, create_model, save_model
    from trim.prune import TokenTrimmer

    answers = json.loads((root / "vqa" / "answers.json").read_text())
    torch.manual_seed(0)
    model = create_model(ModelConfig(
        family="dual", task=task, num_labels=len(answers) if task == "vqa" else 2,
        vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2),
        text=TextConfig(vocab_size=len(load_tokenizer(root)), width=32, layers=1, heads=2),
        cross_layers=1, cross_width=32, cross_heads=2, trim=TrimConfig(vision_token_layers=[1])))
    for module in model.modules():
        if isinstance(module, TokenTrimmer):  # random decisions instead of "keep all"
            torch.nn.init.normal_(module.out.weight, std=2.0)
    return save_model(model, out)


@pytest.fixture(scope="module")
def vqa_ckpt(data, tmp_path_factory) -> Path:
    return _checkpoint(data, tmp_path_factory.mktemp("ckpt") / "vqa_tiny", "vqa")


@pytest.fixture(scope="module")
def vqa_single(vqa_ckpt, data, tmp_path_factory) -> Path:
    """`trim eval` in one process; returns the eval JSON."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("eval1")
    assert eval_main([str(vqa_ckpt), "--task", "vqa", "--data", str(data), "--batch-size", "5", "--out", str(out),
                      "--figures", "2", "--quiet", *SPEED]) == 0
    return out / "eval" / "vqa.json"


def test_vqa_json_has_every_field(vqa_single, data):
    result = json.loads(vqa_single.read_text())
    out_dir = vqa_single.parent
    assert result["format"] == "trim-eval/1" and result["task"] == "vqa" and result["split"] == "val"
    assert result["samples"] == result["manifest_samples"] == N_VAL and result["complete"]
    assert result["vqa_metric"] == result["metrics"]["metric"] == "lavis"  # the default, recorded
    assert result["processes"] == 1 and result["duplicates_dropped"] == 0
    m = result["metrics"]
    assert {"overall", "perAnswerType", "perQuestionType", "n"} <= set(m) and m["n"] == N_VAL
    assert 0.0 <= m["overall"] <= 100.0 and result["accuracy"] == m["overall"]
    assert 0.0 <= result["accuracy_ci95"] <= 100.0  # how far apart two models must be on this split
    cost = result["cost_ratio"]
    assert {"mean", "median", "std", "min", "max", "histogram", "note"} <= set(cost)
    assert sum(cost["histogram"]["counts"]) == N_VAL
    assert len(cost["histogram"]["edges"]) == len(cost["histogram"]["counts"]) + 1
    assert cost["min"] <= cost["mean"] <= cost["max"]
    # per stream and layer; the randomised trimmer on vision layer 1 drops patches
    kept = result["kept"]
    assert set(kept) == {"text", "vision", "cross_text", "cross_image"}
    vision = {row["layer"]: row for row in kept["vision"]}
    assert vision[0]["tokens"] == 17.0 and not vision[0]["token_trimmer"]
    assert vision[1]["token_trimmer"] and 1.0 <= vision[1]["tokens"] < 17.0
    assert all(row["heads"] == 2.0 for rows in kept.values() for row in rows)
    speed = result["speed"]
    assert "time_interleaved" in speed["method"] and "median" in speed["method"]
    assert speed["repeats"] == 2 and speed["warmup"] == 1
    thr, lat = speed["throughput"], speed["latency"]
    assert thr["batch_size"] == 5 and lat["batch_size"] == 1
    assert thr["trimmed_samples_per_s"] > 0 and thr["full_samples_per_s"] > 0 and thr["speedup"] > 0
    assert lat["trimmed_ms"] > 0 and lat["full_ms"] > 0 and lat["speedup"] > 0
    assert len(thr["seconds"]["trimmed"]) == len(thr["seconds"]["full"]) == 2
    assert result["speedup"] == thr["speedup"]
    # EvalAI export: every question once, answers from the vocabulary
    rows = json.loads((out_dir / result["exports"]["predictions"]).read_text())
    vocab = set(json.loads((data / "vqa" / "answers.json").read_text()))
    assert len({r["question_id"] for r in rows}) == N_VAL and all(r["answer"] in vocab for r in rows)
    # figures
    assert (out_dir / "vqa_cost_histogram.png").is_file()
    overlays = sorted(out_dir.glob("vqa_kept_tokens_*.png"))
    assert len(overlays) == 2 and all(f.stat().st_size > 1000 for f in overlays)
    assert set(result["figures"]) == {p.name for p in out_dir.glob("*.png")}


@pytest.mark.slow
def test_two_processes_match_one(vqa_single, vqa_ckpt, data, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "trim.cli", "eval", str(vqa_ckpt),
           "--task", "vqa", "--data", str(data), "--batch-size", "5", "--out", str(tmp_path), "--figures", "1",
           "--quiet", *SPEED]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "VQA accuracy" in proc.stdout and proc.stdout.count("VQA accuracy") == 1  # rank 0 prints
    one, two = json.loads(vqa_single.read_text()), json.loads((tmp_path / "eval" / "vqa.json").read_text())
    assert two["processes"] == 2 and two["complete"] and two["duplicates_dropped"] == 0
    assert two["reading"]["samples"] == N_VAL  # summed over ranks: nothing read twice
    assert two["metrics"] == one["metrics"]
    assert one["relevance"] is not None and two["relevance"] == one["relevance"]  # per-sample counts, merged
    ids = [{r["question_id"]: r["answer"] for r in json.loads((d / "vqa_predictions_evalai.json").read_text())}
           for d in (vqa_single.parent, tmp_path / "eval")]
    assert ids[0] == ids[1] and len(ids[0]) == N_VAL


def test_nlvr2(data, tmp_path):
    ckpt = _checkpoint(data, tmp_path / "nlvr2_tiny", "nlvr2")
    assert eval_main([str(ckpt), "--task", "nlvr2", "--data", str(data), "--batch-size", "8", "--figures", "1",
                      "--quiet", *SPEED]) == 0
    out_dir = ckpt / "eval"  # default: beside the checkpoint
    result = json.loads((out_dir / "nlvr2.json").read_text())
    m = result["metrics"]
    assert m["n"] == N_VAL and 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["consistency"] <= m["accuracy"] + 1e-9
    assert result["accuracy"] == pytest.approx(100 * m["accuracy"])
    p = m["accuracy"]
    assert result["accuracy_ci95"] == pytest.approx(196 * (p * (1 - p) / (N_VAL - 1)) ** 0.5, abs=1e-3)
    assert any(stream.endswith("/image1") for stream in result["kept"])
    (layer,) = result["relevance"]["layers"]  # both images of a pair in one row per trimmed layer
    assert (layer["stream"], layer["layer"]) == ("vision", 1) and layer["relevant_patches"] > 0
    with open(out_dir / result["exports"]["predictions"], newline="") as f:
        rows = list(csv.reader(f))
    assert len(rows) == N_VAL and all(len(r) == 2 and r[1] in ("True", "False") for r in rows)
    assert (out_dir / "nlvr2_cost_histogram.png").is_file()
    assert len(list(out_dir.glob("nlvr2_kept_tokens_*_image0.png"))) == 1
    assert len(list(out_dir.glob("nlvr2_kept_tokens_*_image1.png"))) == 1


def test_report(vqa_single, tmp_path, capsys):
    second = tmp_path / "other" / "eval" / "vqa.json"
    second.parent.mkdir(parents=True)
    result = json.loads(vqa_single.read_text())
    result["name"], result["accuracy"], result["speed"]["throughput"]["speedup"] = "faster", 1.0, 9.0
    second.write_text(json.dumps(result))
    assert eval_main(["report", str(vqa_single), str(second), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "pareto_vqa.png").is_file()
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| faster |" in table and "| vqa_tiny |" in table and "9.00" in table
    points = {p["name"]: p for p in json.loads((tmp_path / "report" / "report.json").read_text())["points"]}
    # "faster" is the fastest point; the original stays on the front only by being more accurate
    original = json.loads(vqa_single.read_text())["accuracy"]
    assert points["faster"]["pareto"] and points["vqa_tiny"]["pareto"] == (original > 1.0)
    assert "| faster |" in capsys.readouterr().out
    # accuracies scored by different VQA tools are flagged
    result["vqa_metric"] = "vqa-tools"
    second.write_text(json.dumps(result))
    assert eval_main(["report", str(vqa_single), str(second), "--out", str(tmp_path / "report2")]) == 0
    assert "different official tools (lavis, vqa-tools" in (tmp_path / "report2" / "report.md").read_text()


def test_seg_of_a_vl_checkpoint_fails_clearly(vqa_ckpt, data, capsys):
    assert eval_main([str(vqa_ckpt), "--task", "seg", "--data", str(data), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "is a vqa model" in err and "--task vqa" in err


def test_wrong_task_and_lost_samples_fail(vqa_ckpt, data, tmp_path, capsys):
    assert eval_main([str(vqa_ckpt), "--task", "nlvr2", "--data", str(data)]) == 1
    assert "is a vqa model" in capsys.readouterr().err
    # A shard cut short loses samples: the manifest check refuses to report partial metrics.
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    shard = broken / "vqa" / "val-000002.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert eval_main([str(vqa_ckpt), "--task", "vqa", "--data", str(broken), "--out", str(tmp_path / "o"),
                      "--quiet", "--no-speed"]) == 1
    err = capsys.readouterr().err
    assert "EvalError" in err and f"records {N_VAL}" in err
    assert not (tmp_path / "o" / "eval" / "vqa.json").exists()


# ----------------------------------------------------------------------------- errors before any work


def _fails_with_one_line(argv: list[str], capsys) -> str:
    """`trim eval` returns 1 and prints one `trim eval: <Error>: ...` line, no traceback."""
    assert eval_main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("trim eval: ")
    return err


def test_unwritable_out_fails_before_loading_anything(vqa_ckpt, data, tmp_path, capsys, monkeypatch):
    import trim.eval.evaluate as evaluate_module

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded although --out cannot be written")

    monkeypatch.setattr(evaluate_module, "load_model", never)
    monkeypatch.setattr(evaluate_module, "read_split", never)
    afile = tmp_path / "afile"
    afile.write_text("a regular file, not a folder")
    out = afile / "out"  # under a regular file: unwritable even as root
    err = _fails_with_one_line([str(vqa_ckpt), "--task", "vqa", "--data", str(data), "--out", str(out), "--quiet"],
                               capsys)
    assert "OutputError" in err and f"--out {out}" in err and f"{afile} is a file" in err
    assert not (out / "eval" / "vqa.json").exists() and afile.is_file()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write to a read-only folder")
def test_read_only_out_fails_before_loading_anything(vqa_ckpt, data, tmp_path, capsys, monkeypatch):
    import trim.eval.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        err = _fails_with_one_line([str(vqa_ckpt), "--task", "vqa", "--data", str(data), "--out", str(locked),
                                    "--quiet"], capsys)
    finally:
        locked.chmod(0o700)
    assert "OutputError" in err and f"{locked} is not writable" in err


def _corrupt_copy(vqa_ckpt: Path, tmp_path: Path) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(vqa_ckpt, ckpt, ignore=shutil.ignore_patterns("eval"))
    return ckpt


def _eval_args(ckpt: Path, data: Path, tmp_path: Path) -> list[str]:
    return [str(ckpt), "--task", "vqa", "--data", str(data), "--out", str(tmp_path / "o"), "--quiet", "--no-speed"]


def test_config_not_json_names_the_file(vqa_ckpt, data, tmp_path, capsys):
    ckpt = _corrupt_copy(vqa_ckpt, tmp_path)
    (ckpt / "config.json").write_text('{"model": {"family": "dual",')  # cut short
    err = _fails_with_one_line(_eval_args(ckpt, data, tmp_path), capsys)
    assert "CheckpointError" in err and str(ckpt / "config.json") in err and "not readable JSON" in err


def test_config_not_matching_the_weights_names_the_file(vqa_ckpt, data, tmp_path, capsys):
    ckpt = _corrupt_copy(vqa_ckpt, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["model"]["vision"]["width"] = 48  # the weights are 32 wide
    (ckpt / "config.json").write_text(json.dumps(config))
    err = _fails_with_one_line(_eval_args(ckpt, data, tmp_path), capsys)
    assert "CheckpointError" in err and str(ckpt / "model.safetensors") in err and "does not fit" in err
    assert "config and weights" in err


def test_truncated_weights_name_the_file(vqa_ckpt, data, tmp_path, capsys):
    ckpt = _corrupt_copy(vqa_ckpt, tmp_path)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    err = _fails_with_one_line(_eval_args(ckpt, data, tmp_path), capsys)
    assert "CheckpointError" in err and str(weights) in err and "truncated" in err


def test_latest_naming_a_missing_step_names_the_file(vqa_ckpt, data, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(vqa_ckpt, run / "step_1", ignore=shutil.ignore_patterns("eval"))
    (run / "latest").write_text("step_9\n")
    err = _fails_with_one_line(_eval_args(run, data, tmp_path), capsys)
    assert "CheckpointError" in err and str(run / "latest") in err and "'step_9'" in err and "does not exist" in err


def test_vqa_metric_flag_is_recorded(vqa_single, vqa_ckpt, data, tmp_path, capsys):
    assert eval_main([str(vqa_ckpt), "--task", "vqa", "--data", str(data), "--batch-size", "8", "--out",
                      str(tmp_path), "--figures", "0", "--quiet", "--no-speed", "--vqa-metric", "vqa-tools"]) == 0
    assert "metric vqa-tools" in capsys.readouterr().out
    result = json.loads((tmp_path / "eval" / "vqa.json").read_text())
    assert result["vqa_metric"] == result["metrics"]["metric"] == "vqa-tools"
    # The synthetic answers are already normalised and agree with the vocabulary, so here the
    # two tools give the same numbers; the hand-made cases where they differ are in
    # test_metrics_vqa.py and below.
    assert result["metrics"]["overall"] == json.loads(vqa_single.read_text())["metrics"]["overall"]


# ----------------------------------------------------------------------------- trim eval score

FIXTURES = Path(__file__).parent / "fixtures" / "data"
VQA_FILES = ["--results", str(FIXTURES / "vqa2" / "v2_OpenEnded_mscoco_val2014_fake_results.json"),
             "--questions", str(FIXTURES / "vqa2" / "v2_OpenEnded_mscoco_val2014_questions.json"),
             "--annotations", str(FIXTURES / "vqa2" / "v2_mscoco_val2014_annotations.json")]
NLVR2_FILES = ["--predictions", str(FIXTURES / "nlvr2" / "train_mini_predictions.csv"),
               "--labels", str(FIXTURES / "nlvr2" / "train_mini.json")]
DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nlvr2" / "dev.json"


def _score(argv: list[str]) -> subprocess.CompletedProcess:
    """`trim eval score` as a user runs it: the `trim` entry point of this checkout, in a subprocess."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "trim.cli", "eval", "score", *argv], env=env, capture_output=True,
                          text=True, timeout=120)


def test_score_vqa_both_variants_on_the_official_fixtures():
    # Expected numbers: worked out per question in test_metrics_vqa.py (FIXTURE_EXPECTED).
    lavis = _score(["--task", "vqa", *VQA_FILES])
    assert lavis.returncode == 0, lavis.stderr
    lines = lavis.stdout.splitlines()
    assert lines[0] == "VQA accuracy (lavis): 75.00 over 12 questions"
    assert "  yes/no   75.56" in lines and "  other    60.00" in lines and "  number  100.00" in lines
    assert "  is the              86.67" in lines and "  is this a          100.00" in lines
    tools = _score(["--task", "vqa", *VQA_FILES, "--vqa-metric", "vqa-tools"])
    assert tools.returncode == 0, tools.stderr
    lines = tools.stdout.splitlines()
    assert lines[0] == "VQA accuracy (vqa-tools): 59.17 over 12 questions"
    assert "  yes/no   53.33" in lines and "  other    65.00" in lines
    assert "  is the              53.33" in lines and "  is this a           50.00" in lines


def test_score_json_output(capsys):
    assert eval_main(["score", "--task", "vqa", *VQA_FILES, "--vqa-metric", "vqa-tools", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["overall"] == 59.17 and result["metric"] == "vqa-tools" and result["n"] == 12
    assert result["per_question"]["42000"] == 0.0 and result["per_question"]["42002"] == 100.0


def test_score_nlvr2_on_the_official_fixture():
    # accuracy 4/6 and consistency 1/3, worked out in test_metrics_nlvr2.py::test_official_fixture
    proc = _score(["--task", "nlvr2", *NLVR2_FILES])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("NLVR2: 6 examples, 3 sentences")
    assert lines[1] == "accuracy    0.6667  (4 of 6 correct)"
    assert lines[2] == "consistency 0.3333  (1 of 3 sentences all correct)"


@pytest.mark.skipif(not DEV.is_file(), reason=f"the real NLVR2 dev labels are not at {DEV}")
def test_score_nlvr2_on_the_real_dev_labels(tmp_path, capsys):
    import json as _json

    labels = [_json.loads(line) for line in DEV.read_text().splitlines() if line.strip()]
    # Predict the label except for every example of image pair 0, which is flipped; written in
    # the official CSV format with mixed case. Wrong = the pair-0 examples; a sentence is
    # consistent iff it has no pair-0 example.
    rows, wrong, sentences, touched = [], 0, set(), set()
    for ex in labels:
        ident, label = ex["identifier"], ex["label"] == "True"
        split, set_id, pair, sentence = ident.split("-")
        flip = pair == "0"
        wrong += flip
        sentences.add((split, set_id, sentence))
        if flip:
            touched.add((split, set_id, sentence))
        rows.append(f"{ident},{'TRUE' if label != flip else 'false'}\n")
    csv_path = tmp_path / "dev_predictions.csv"
    csv_path.write_text("".join(rows))
    assert eval_main(["score", "--task", "nlvr2", "--predictions", str(csv_path), "--labels", str(DEV),
                      "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == len(labels) and result["n_groups"] == len(sentences)
    assert result["accuracy"] == (len(labels) - wrong) / len(labels)
    assert result["consistency"] == (len(sentences) - len(touched)) / len(sentences)
    # the same file through the printed summary
    assert eval_main(["score", "--task", "nlvr2", "--predictions", str(csv_path), "--labels", str(DEV)]) == 0
    out = capsys.readouterr().out
    assert f"{len(labels) - wrong} of {len(labels)} correct" in out


def _score_fails(argv: list[str], capsys) -> str:
    assert eval_main(["score", *argv]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("trim eval score: FileFormatError: ")
    return err


def test_score_ids_must_match(tmp_path, capsys):
    results = json.loads(Path(VQA_FILES[1]).read_text())
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps(results[1:]))
    err = _score_fails(["--task", "vqa", *VQA_FILES[:0], "--results", str(missing), *VQA_FILES[2:]], capsys)
    assert "1 question ids of --annotations" in err and f"missing from --results {missing}" in err
    assert "[42000]" in err
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps(results + [{"question_id": 7, "answer": "yes"}]))
    err = _score_fails(["--task", "vqa", "--results", str(extra), *VQA_FILES[2:]], capsys)
    assert f"1 question ids in --results {extra} that --annotations" in err and "[7]" in err
    # questions of another split
    test_questions = FIXTURES / "vqa2" / "v2_OpenEnded_mscoco_test2015_questions.json"
    err = _score_fails(["--task", "vqa", *VQA_FILES[:2], "--questions", str(test_questions), *VQA_FILES[4:]], capsys)
    assert "the questions and annotation files do not belong together" in err
    # NLVR2: a missing and an extra identifier
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("train-10-0-0,True\ntrain-10-1-0,False\ntrain-10-0-1,True\ntrain-11-0-0,True\n"
                        "train-11-1-0,False\ntrain-99-0-0,True\n")
    err = _score_fails(["--task", "nlvr2", "--predictions", str(csv_path), *NLVR2_FILES[2:]], capsys)
    assert "1 identifiers of --labels" in err and "['train-11-2-0']" in err
    assert f"1 identifiers in --predictions {csv_path}" in err and "['train-99-0-0']" in err


def test_score_wrong_files_fail_clearly(tmp_path, capsys):
    # swapped --results and --annotations
    err = _score_fails(["--task", "vqa", "--results", VQA_FILES[5], "--questions", VQA_FILES[3],
                        "--annotations", VQA_FILES[1]], capsys)
    assert f"--results {VQA_FILES[5]}" in err and "an annotation file? Pass it as --annotations" in err
    # a non-string answer names the entry
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question_id": 42000, "answer": "yes"}, {"question_id": 42001, "answer": 2}]))
    err = _score_fails(["--task", "vqa", "--results", str(bad), *VQA_FILES[2:]], capsys)
    assert "entry [1] (question_id 42001): answer 2 (int) must be a string" in err
    # the VQA annotation file given as NLVR2 labels
    err = _score_fails(["--task", "nlvr2", NLVR2_FILES[0], NLVR2_FILES[1], "--labels", VQA_FILES[5]], capsys)
    assert f"--labels {VQA_FILES[5]}: line 1" in err
    # a missing file
    err = _score_fails(["--task", "nlvr2", "--predictions", str(tmp_path / "nope.csv"), *NLVR2_FILES[2:]], capsys)
    assert "nope.csv: no such file" in err


def test_score_flags_belong_to_their_task(capsys):
    with pytest.raises(SystemExit) as exc:
        eval_main(["score", "--task", "nlvr2", *NLVR2_FILES, "--vqa-metric", "lavis"])
    assert exc.value.code == 2 and "--vqa-metric belong(s) to the other task" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_main(["score", "--task", "vqa", *VQA_FILES[:2]])
    assert "missing --questions, --annotations" in capsys.readouterr().err
