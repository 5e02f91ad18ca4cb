"""NLVR2 official accuracy and consistency on a small hand-made set."""

import numpy as np
import pytest

from trim.eval.metrics.nlvr2 import export_csv, group_key, nlvr2_metrics

LABELS = {
    # sentence 0 of set 1, four image pairs -> group "dev-1--0"
    "dev-1-0-0": True, "dev-1-1-0": False, "dev-1-2-0": True, "dev-1-3-0": False,
    # sentence 1 of set 1 (same pair numbers, different sentence) -> group "dev-1--1"
    "dev-1-0-1": True, "dev-1-1-1": True,
    # sentence 0 of set 2 -> group "dev-2--0"
    "dev-2-0-0": False, "dev-2-1-0": "True",  # labels as in the official JSONL work too
}
PREDICTIONS = {
    "dev-1-0-0": True, "dev-1-1-0": "False", "dev-1-2-0": 1, "dev-1-3-0": "false",  # 4 right
    "dev-1-0-1": True, "dev-1-1-1": 0,  # 1 right, 1 wrong
    "dev-2-0-0": "FALSE", "dev-2-1-0": np.bool_(True),  # 2 right
    "test1-9-0-0": True,  # not labelled: ignored, as the official loop runs over the labels
}


def test_group_key_blanks_the_pair_field():
    assert group_key("dev-850-3-1") == "dev-850--1"
    with pytest.raises(ValueError, match="split-set-pair-sentence"):
        group_key("dev-850")


def test_accuracy_and_consistency():
    res = nlvr2_metrics(PREDICTIONS, LABELS)
    assert res["accuracy"] == 7 / 8  # 4 + 1 + 2 right of 8 labelled
    assert res["consistency"] == 2 / 3  # groups dev-1--0 and dev-2--0 all right, dev-1--1 not
    assert res["n"] == 8 and res["n_groups"] == 3


def test_missing_and_invalid_predictions_are_errors():
    with pytest.raises(ValueError, match="no prediction"):
        nlvr2_metrics({"dev-1-0-0": True}, LABELS)
    with pytest.raises(ValueError, match="True/False"):
        nlvr2_metrics({"dev-1-0-0": "yes"}, {"dev-1-0-0": True})


def test_export_csv_official_format(tmp_path):
    path = export_csv({"dev-2-0-0": 0, "dev-1-0-0": "true"}, tmp_path / "nlvr2_predictions.csv")
    assert path.read_text() == "dev-1-0-0,True\ndev-2-0-0,False\n"
