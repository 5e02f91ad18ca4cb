"""NLVR2 official accuracy and consistency on a small hand-made set, and the readers of the
official files (predictions CSV, JSON-lines labels)."""

from pathlib import Path

import numpy as np
import pytest

from trim.eval.errors import FileFormatError
from trim.eval.metrics.nlvr2 import export_csv, group_key, nlvr2_metrics
from trim.eval.metrics.official_io import read_nlvr2_labels, read_nlvr2_predictions

FIXTURES = Path(__file__).parent / "fixtures" / "data" / "nlvr2"

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


def test_official_fixture():
    # train_mini.json: groups train-10--0 {10-0-0 True, 10-1-0 False}, train-10--1 {10-0-1 False},
    # train-11--0 {11-0-0 True, 11-1-0 True, 11-2-0 False}. The predictions CSV gets 10-0-1 and
    # 11-1-0 wrong: accuracy 4/6; only train-10--0 is all right: consistency 1/3.
    predictions = read_nlvr2_predictions(FIXTURES / "train_mini_predictions.csv")
    labels = read_nlvr2_labels(FIXTURES / "train_mini.json")
    assert predictions["train-10-1-0"] is False and predictions["train-11-0-0"] is True  # "false", "TRUE"
    res = nlvr2_metrics(predictions, labels)
    assert res["accuracy"] == 4 / 6 and res["consistency"] == 1 / 3
    assert res["n"] == 6 and res["n_groups"] == 3


def test_export_csv_reads_back(tmp_path):
    path = export_csv({"dev-2-0-0": 0, "dev-1-0-0": "true"}, tmp_path / "p.csv")
    assert read_nlvr2_predictions(path) == {"dev-1-0-0": True, "dev-2-0-0": False}


@pytest.mark.parametrize(
    "text, message",
    [
        ("identifier,prediction\ndev-1-0-0,True\n", "line 1 .* If it is a header, remove it"),
        ("dev-1-0-0,True\ndev-1-1-0\n", "line 2 \\('dev-1-1-0'\\) is not 'identifier,True\\|False'"),
        ("dev-1-0-0,True,0.93\n", "line 1 .*no other column"),
        ("dev-1-0-0, True\n", "line 1 .*no spaces"),
        ("dev-1-0-0,1\n", "line 1 .*True/False"),
        ("dev-1-0-0,True\ndev-1-0-0,False\n", "line 2 .*: identifier 'dev-1-0-0' again \\(first on line 1\\)"),
        ("\n\n", "has no 'identifier,True\\|False' line"),
    ],
)
def test_predictions_reader_names_file_and_line(tmp_path, text, message):
    path = tmp_path / "pred.csv"
    path.write_text(text)
    with pytest.raises(FileFormatError, match=message) as err:
        read_nlvr2_predictions(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ('[{"identifier": "dev-1-0-0", "label": "True"}]', "line 1 is a JSON list; NLVR2 splits are JSON lines"),
        ('{"identifier": "dev-1-0-0", "label": "True"}\n{"label": "False"}\n', "line 2 has no string 'identifier'"),
        ('{"identifier": "dev-1-0-0", "label": "True"}\n{"identifier": "dev-1-1-0",\n', "line 2 is not a JSON object"),
        ('{"identifier": "dev-1-0-0", "label": true}\n', "line 1 \\(dev-1-0-0\\): label True \\(bool\\) is not"),
        ('{"identifier": "test2-1-0-0"}\n', "label None .*unlabelled split"),
        ('{"identifier": "dev-1-0-0", "label": "True"}\n{"identifier": "dev-1-0-0", "label": "True"}\n',
         "line 2: identifier 'dev-1-0-0' again"),
    ],
)
def test_labels_reader_names_file_and_line(tmp_path, text, message):
    path = tmp_path / "dev.json"
    path.write_text(text)
    with pytest.raises(FileFormatError, match=message) as err:
        read_nlvr2_labels(path)
    assert str(path) in str(err.value)
