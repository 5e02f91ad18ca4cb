"""Relevance recall: the metric on hand-made masks, and `trim eval` reporting it on synthetic shards."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tiny_runs import tiny_recipe
from trim.data.relevance import RELEVANCE_FILE
from trim.eval.relevance import COUNT_FIELDS, layer_counts, relevance_counts, relevance_recall, relevance_summary
from trim.models.streams import per_image

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def masks(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in row] for row in rows])


def test_recall_kept_and_lift_on_hand_made_masks():
    kept = masks(["1100", "1000", "1111"])
    relevant = masks(["1010", "0100", "0000"])  # the third image has nothing relevant: it counts nowhere
    got = relevance_recall(kept, relevant)
    # recall 1 of 3; kept 3 of the 8 patches of images 0-1; chance (2 * 2/4 + 1 * 1/4) / 3
    assert got["recall"] == pytest.approx(1 / 3, abs=1e-4) and got["kept"] == pytest.approx(3 / 8, abs=1e-4)
    assert got["chance"] == pytest.approx(1.25 / 3, abs=1e-4) and got["lift"] == pytest.approx(0.8, abs=1e-4)
    assert got["relevant_patches"] == 3 and got["images"] == 2

    perfect = relevance_recall(masks(["1100"]), masks(["1100"]))
    assert (perfect["recall"], perfect["kept"], perfect["lift"]) == (1.0, 0.5, 2.0)


def test_a_layer_with_nothing_relevant_reports_none():
    got = relevance_recall(masks(["1100", "0011"]), masks(["0000", "0000"]))
    assert got == {"recall": None, "kept": None, "chance": None, "lift": None, "relevant_patches": 0, "images": 0}
    with pytest.raises(ValueError, match="must both be"):
        relevance_recall(masks(["11"]), masks(["111"]))


def test_random_keeping_has_lift_one_even_when_the_budget_follows_the_objects():
    gen = torch.Generator().manual_seed(0)
    n, p = 4000, 64
    relevant = torch.rand(n, p, generator=gen) < torch.rand(n, 1, generator=gen) * 0.5
    # Keep more patches where more is relevant, at random places: no spatial knowledge at all.
    budget = (relevant.sum(1, keepdim=True) / p).clamp(0.1, 0.9)
    kept = torch.rand(n, p, generator=gen).argsort(1).argsort(1) < (budget * p).round()
    got = relevance_recall(kept, relevant)
    assert got["lift"] == pytest.approx(1.0, abs=0.03)
    assert got["recall"] / got["kept"] > 1.1, "recall / kept would credit the budget allocation as knowledge"


def test_summary_per_layer_last_and_mean():
    relevant = masks(["1100", "0110"])
    counts = torch.stack([relevance_counts(masks(["1111", "1111"]), relevant),
                          relevance_counts(masks(["1100", "0100"]), relevant),
                          relevance_counts(masks(["1100", "0100"]), masks(["0000", "0000"]))], 1).numpy()
    summary = relevance_summary(counts, [("vision", 1), ("cross_image", 0), ("cross_image", 1)])
    first, second, empty = summary["layers"]
    assert (first["stream"], first["layer"], first["recall"], first["lift"]) == ("vision", 1, 1.0, 1.0)
    assert second["recall"] == 0.75 and second["kept"] == 0.375 and second["lift"] == 2.0
    assert empty["recall"] is None and summary["last"] == empty
    assert summary["mean"] == {"recall": 0.875, "kept": 0.6875, "lift": 1.5}  # the layers that saw something


def test_layer_counts_sum_the_images_of_a_pair():
    grid, b = 2, 3
    alive = [torch.rand(b, 1 + grid * grid) > 0.5 for _ in range(2)]
    relevance = torch.rand(b, 2, grid * grid) > 0.5
    records = {per_image("vision", k): [None, SimpleNamespace(alive=alive[k])] for k in range(2)}
    got = layer_counts(records, relevance, [("vision", 1)], grid)
    expected = sum(relevance_counts(alive[k][:, 1:], relevance[:, k]) for k in range(2))
    assert got.shape == (b, 1, len(COUNT_FIELDS)) and torch.equal(got[:, 0], expected)
    with pytest.raises(ValueError, match="track_alive=True"):
        layer_counts({"vision": [SimpleNamespace(alive=None)]}, relevance[:, 0], [("vision", 0)], grid)


# ---------------------------------------------------------------------------- `trim eval` end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A SmartTrim run of a few steps on synthetic shards (which carry relevance masks): (data, checkpoint)."""
    from trim.config import load_recipe
    from trim.data import write_synthetic
    from trim.train import train

    data = tmp_path_factory.mktemp("shapes")
    write_synthetic(data, {"train": 64, "val": 24}, tasks=("vqa",), image_size=32, progress=False)
    out = tmp_path_factory.mktemp("runs")
    train(load_recipe(tiny_recipe(data, out, train={"steps": 4, "save_every": 0, "eval_every": 0})))
    return data, out / "tiny"


def _eval(ckpt: Path, data: Path, out: Path, *extra: str) -> dict:
    from trim.eval.cli import main

    assert main([str(ckpt), "--task", "vqa", "--data", str(data), "--batch-size", "5", "--out", str(out),
                 "--figures", "0", "--no-speed", "--quiet", *extra]) == 0
    stem = "vqa_blind" if "--blind" in extra else "vqa"
    return json.loads((out / "eval" / f"{stem}.json").read_text())


def test_eval_reports_relevance_of_every_token_trimmed_image_layer(trained, tmp_path, capsys):
    data, ckpt = trained
    result = _eval(ckpt, data, tmp_path)
    relevance = result["relevance"]
    # tiny_recipe trims tokens at vision layer 1 and cross layers 0 and 1: the image stream of each
    assert [(r["stream"], r["layer"]) for r in relevance["layers"]] == [("vision", 1), ("cross_image", 0),
                                                                          ("cross_image", 1)]
    for row in relevance["layers"]:
        assert 0.0 <= row["recall"] <= 1.0 and 0.0 < row["kept"] <= 1.0 and row["lift"] > 0
        assert row["relevant_patches"] == relevance["layers"][0]["relevant_patches"] > 0  # the same masks
    # Tokens dropped in the tower stay dropped: the deeper layer keeps no more.
    kept = [r["kept"] for r in relevance["layers"]]
    assert kept == sorted(kept, reverse=True)
    assert relevance["last"] == relevance["layers"][-1]
    assert relevance["mean"]["lift"] == pytest.approx(np.mean([r["lift"] for r in relevance["layers"]]), abs=1e-4)
    printed = capsys.readouterr().out
    assert "relevance (relevant patches kept" in printed and "cross_image 1: recall" in printed

    from trim.eval.report import write_report

    report = write_report([tmp_path / "eval" / "vqa.json"], tmp_path / "report")
    assert "relevance recall | lift" in report["markdown"]
    assert report["points"][0]["relevance_lift"] == relevance["last"]["lift"]


def test_shards_without_masks_report_no_relevance(trained, tmp_path, capsys):
    data, ckpt = trained
    real = tmp_path / "real"
    shutil.copytree(data, real)
    for shard in (real / "vqa").glob("val-*.tar"):  # what a converter of real data writes: no masks
        with tarfile.open(shard) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()
                       if not m.name.endswith(RELEVANCE_FILE)]
        with tarfile.open(shard, "w") as tar:
            for member, payload in members:
                tar.addfile(member, io.BytesIO(payload))
    result = _eval(ckpt, real, tmp_path)
    assert result["relevance"] is None and result["samples"] == 24
    assert "relevance" not in capsys.readouterr().out
