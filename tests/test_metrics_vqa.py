"""VQA v2 official normalisation and leave-one-out accuracy, on hand-written cases, in both
variants ('lavis': LAVIS's vqa_eval.py; 'vqa-tools': GT-Vision-Lab/VQA vqaEval.py master), and
the readers of the official files."""

import json
from pathlib import Path

import pytest

from trim.eval.errors import FileFormatError
from trim.eval.metrics.official_io import read_vqa_annotations, read_vqa_questions, read_vqa_results
from trim.eval.metrics.vqa import (DEFAULT_VQA_METRIC, VQA_METRICS, export_evalai, normalize_answer,
                                   process_punctuation, vqa_accuracy)

FIXTURES = Path(__file__).parent / "fixtures" / "data" / "vqa2"
RESULTS = FIXTURES / "v2_OpenEnded_mscoco_val2014_fake_results.json"
QUESTIONS = FIXTURES / "v2_OpenEnded_mscoco_val2014_questions.json"
ANNOTATIONS = FIXTURES / "v2_mscoco_val2014_annotations.json"


@pytest.mark.parametrize(
    "raw, expected",
    [
        # newlines and tabs become spaces, then the ends are stripped
        ("\tyes\n", "yes"),
        # a punctuation mark touching a space is deleted ...
        ("red, white", "red white"),
        ("hot dog !", "hot dog"),
        # ... one touching no space becomes a space
        ("t-shirt", "t shirt"),
        ("black/white", "black white"),
        # the decision is per character: ',' touches a space (deleted), '-' does not (space)
        ("t-shirt, jeans", "t shirt jeans"),
        # a comma between two digits anywhere deletes every punctuation mark, spaces or not
        ("1,000", "1000"),
        ("1,000-2,000", "10002000"),
        # periods not followed by a digit go, decimal points stay
        ("yes.", "yes"),
        ("a.m.", "am"),
        ("3.5", "3.5"),
        ("3.5.", "3.5"),
        # official quirk: re.UNICODE (32) is passed as `count`, so at most 32 periods go: 40 - 32 = 8 stay
        ("yes" + "." * 40, "yes" + "." * 8),
        # lower-case, number words 0..10 and 'none' to digits, nothing above ten
        ("YES", "yes"),
        ("Two", "2"),
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),
        # articles a/an/the dropped as whole words only
        ("a dog", "dog"),
        ("The cat", "cat"),
        ("an apple", "apple"),
        ("another", "another"),
        # contractions table; its capitalised keys ('Im') never match after lower-casing
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("Im", "im"),
        # the apostrophe is not punctuation
        ("don't", "don't"),
        # all together: ',' deleted (space after it), '!' -> ' ', then words
        ("The two dogs, dont!", "2 dogs don't"),
    ],
)
def test_normalize_answer_rules(raw, expected):
    assert normalize_answer(raw) == expected


def test_punctuation_pass_alone_keeps_case_and_words():
    # the ground-truth answers only get this pass
    assert process_punctuation("Two T-shirts.") == "Two T shirts"


def _q(qid, answers, answer_type="other", question_type="what is"):
    return {"question_id": qid, "answers": answers, "answer_type": answer_type, "question_type": question_type}


@pytest.mark.parametrize(
    "k, expected",
    [
        # 10 answers, k equal to the prediction; subset i drops annotator i:
        (0, 0.0),  # nothing matches
        (1, 30.0),  # 9 subsets keep the match: 9 * (1/3) / 10 = 0.3
        (2, 60.0),  # 8 subsets with 2 matches, 2 with 1: (8 * 2/3 + 2 * 1/3) / 10 = 0.6
        (3, 90.0),  # 7 subsets with 3, 3 with 2: (7 * 1 + 3 * 2/3) / 10 = 0.9
        (4, 100.0),  # every subset keeps >= 3 matches: min(1, .) = 1
        (10, 100.0),
    ],
)
def test_leave_one_out_accuracy(k, expected):
    answers = ["cat"] * k + ["dog"] * (10 - k)
    result = vqa_accuracy({1: "cat"}, [_q(1, answers)])
    assert result["per_question"][1] == expected
    assert result["overall"] == expected


def test_ground_truth_processing_is_the_official_one():
    # Disagreeing answers get the punctuation pass only: "t-shirt" -> "t shirt" matches the
    # normalised prediction (4 matches -> 100), but "two" stays "two" while the prediction
    # "two" becomes "2", so only the three literal "2" answers match (k=3 -> 90).
    answers = ["two"] * 3 + ["2"] * 3 + ["t-shirt"] * 4
    res = vqa_accuracy({1: "t-shirt", 2: "two"}, [_q(1, answers), _q(2, answers)])
    assert res["per_question"] == {1: 100.0, 2: 90.0}
    # When all ten agree the answers are not processed at all: "Yes" stays "Yes" while the
    # prediction becomes "yes", so nothing matches (real annotations are already lower case).
    res = vqa_accuracy({3: "Yes", 4: "yes"}, [_q(3, ["Yes"] * 10), _q(4, ["yes"] * 10)])
    assert res["per_question"] == {3: 0.0, 4: 100.0}


def test_overall_and_per_type_rounding():
    questions = [
        _q(1, ["yes"] * 10, "yes/no", "is the"),  # acc 1.0
        _q(2, ["no"] + ["yes"] * 9, "yes/no", "is the"),  # pred "No" -> "no", k=1: 0.3
        # raw annotation format (dicts) works too; k=2: 0.6
        _q(3, [{"answer": "3", "answer_id": i} for i in range(2)] + [{"answer": "4", "answer_id": i} for i in range(2, 10)],
           "number", "how many"),
    ]
    preds = {"1": "yes", 2: "No", 3: "three"}  # JSON-style string keys are accepted
    res = vqa_accuracy(preds, questions)
    assert res["overall"] == 63.33  # 100 * (1 + 0.3 + 0.6) / 3 = 63.333...
    assert res["perAnswerType"] == {"yes/no": 65.0, "number": 60.0}  # 100 * 1.3 / 2; 100 * 0.6
    assert res["perQuestionType"] == {"is the": 65.0, "how many": 60.0}
    assert res["per_question"] == {1: 100.0, 2: 30.0, 3: 60.0}
    assert res["n"] == 3


def test_predictions_must_match_questions():
    with pytest.raises(ValueError, match="without a prediction"):
        vqa_accuracy({1: "yes"}, [_q(1, ["yes"] * 10), _q(2, ["no"] * 10)])
    with pytest.raises(ValueError, match="unknown question ids"):
        vqa_accuracy({1: "yes", 9: "no"}, [_q(1, ["yes"] * 10)])


def test_export_evalai(tmp_path):
    path = export_evalai({"7": "2", 3: "yes"}, tmp_path / "eval" / "vqa_test-dev.json")
    assert json.loads(path.read_text()) == [{"question_id": 3, "answer": "yes"}, {"question_id": 7, "answer": "2"}]


# ---- the two variants ------------------------------------------------------------------------
# lavis:     pred fully normalised always; answers get the punctuation pass only, and only
#            when they disagree.
# vqa-tools: answers and pred stripped (newline/tab -> space, ends); then, only when the
#            stripped answers disagree, both get punctuation + digit/article; else nothing.


@pytest.mark.parametrize(
    "prediction, answers, lavis, vqa_tools",
    [
        # The case: all ten agree. lavis: "two" -> "2", 10 matches -> 100.
        # vqa-tools: nothing is normalised, "two" != "2" -> 0.
        ("two", ["2"] * 10, 100.0, 0.0),
        # All agree, prediction needs only lower-casing / a period: same split.
        ("Yes", ["yes"] * 10, 100.0, 0.0),
        ("yes.", ["yes"] * 10, 100.0, 0.0),
        # Disagreeing answers. lavis: answers keep "two" (punctuation only), pred "two" -> "2",
        # so only the three literal "2" match: k=3 -> 90. vqa-tools: "two" -> "2" too, k=6 -> 100.
        ("two", ["two"] * 3 + ["2"] * 3 + ["t-shirt"] * 4, 90.0, 100.0),
        # Articles: lavis keeps "a dog" in the answers, pred "dog": k=1 -> 30.
        # vqa-tools drops the article on both sides: k=3 -> 90.
        ("dog", ["a dog"] * 2 + ["dog"] + ["cat"] * 7, 30.0, 90.0),
        # Case: lavis never lower-cases answers: k=1 -> 30; vqa-tools does: k=3 -> 90.
        ("red", ["Red"] * 2 + ["red"] + ["blue"] * 7, 30.0, 90.0),
        # Whitespace decides agreement in vqa-tools only. lavis: set has 2 values, punctuation
        # pass leaves "yes " as is, pred "yes": k=9 -> 100. vqa-tools: after the strip all ten
        # are "yes", so "Yes" is compared raw: 0.
        ("Yes", ["yes"] * 9 + ["yes "], 100.0, 0.0),
        # Where both normalise the same way they agree: "No" -> "no", k=3 -> 90 in both.
        ("No", ["yes"] * 7 + ["no"] * 3, 90.0, 90.0),
        # A number word in the answers that the prediction spells as a digit: lavis k=0 -> 0
        # ("three" stays), vqa-tools "three" -> "3": k=4 -> 100.
        ("3", ["three"] * 4 + ["4"] * 6, 0.0, 100.0),
    ],
)
def test_variants_on_hand_made_cases(prediction, answers, lavis, vqa_tools):
    questions = [_q(1, answers)]
    assert vqa_accuracy({1: prediction}, questions, metric="lavis")["per_question"][1] == lavis
    assert vqa_accuracy({1: prediction}, questions, metric="vqa-tools")["per_question"][1] == vqa_tools


def test_default_variant_is_named_and_recorded():
    assert DEFAULT_VQA_METRIC == "lavis" and set(VQA_METRICS) == {"lavis", "vqa-tools"}
    assert vqa_accuracy({1: "yes"}, [_q(1, ["yes"] * 10)])["metric"] == "lavis"
    with pytest.raises(ValueError, match="'lavis' reproduces"):
        vqa_accuracy({1: "yes"}, [_q(1, ["yes"] * 10)], metric="official")


def test_identical_answer_entries_leave_together():
    # The tools leave annotator i out by dropping every answer dict equal to entry i. Two
    # identical dicts (same answer *and* answer_id) therefore leave together: dropping either
    # removes both matches. Pred "cat", 2 cat entries (identical) + 8 distinct dogs:
    # 2 subsets with 0 matches, 8 with 2 -> (8 * 2/3) / 10 = 0.5333 -> 53.33 (by index: 60).
    answers = [{"answer": "cat", "answer_id": 1}] * 2 + [{"answer": "dog", "answer_id": i} for i in range(2, 10)]
    for metric in VQA_METRICS:
        assert vqa_accuracy({1: "cat"}, [_q(1, answers)], metric=metric)["per_question"][1] == 53.33
    answers[1] = {"answer": "cat", "answer_id": 11}  # distinct ids: k=2 -> 60
    assert vqa_accuracy({1: "cat"}, [_q(1, answers)])["per_question"][1] == 60.0


# Per question on the official-format fixture (fake_results.json against the annotations):
#   qid     pred           answers (10)                                  lavis  vqa-tools
#   42000   "Yes"          yes x10 (agree)                                 1.0    0.0  raw "Yes"
#   42001   "two"          2 x6, two, Two., 3, 1                           1.0    1.0  k=6 / k=8
#   42002   "red"          red x3, orange x3, Red., pink x2, "red "        0.9    1.0  k=3 / k=5
#   73003   "no"           no x8, yes x2                                   1.0    1.0
#   73004   "no"           yes x9, no                                      0.3    0.3
#   73005   "the parasol"  umbrella x5, an umbrella x3, parasol, stick     0.3    0.3
#   74006   "yes."         yes x10 (agree)                                 1.0    0.0  raw "yes."
#   74007   "No"           yes x7, no x3                                   0.9    0.9
#   74008   "yes"          yes x2, no x8                                   0.6    0.6
#   74009   "no"           yes x10                                         0.0    0.0
#   133010  "yes"          yes x10                                         1.0    1.0
#   133011  " yes\n"       yes x10 (agree; stripped by both)               1.0    1.0
# lavis: sum 9.0 -> 75.00; vqa-tools: sum 7.1 -> 59.17 (100 * 7.1 / 12 = 59.1666...).
FIXTURE_EXPECTED = {
    "lavis": {
        "overall": 75.0,
        # yes/no: 9 questions, 6.8 -> 75.56; number 42001; other 42002 + 73005: 1.2 / 2
        "perAnswerType": {"yes/no": 75.56, "number": 100.0, "other": 60.0},
        "perQuestionType": {"is the": 86.67,  # 42000, 74008, 133010: 2.6 / 3
                            "how many": 100.0, "what color is the": 90.0, "is there a": 100.0, "is it": 30.0,
                            "what is the man": 30.0, "is this a": 100.0, "are the": 90.0, "is": 0.0},
    },
    "vqa-tools": {
        "overall": 59.17,
        "perAnswerType": {"yes/no": 53.33, "number": 100.0, "other": 65.0},  # 4.8 / 9; 1.3 / 2
        "perQuestionType": {"is the": 53.33,  # 1.6 / 3
                            "how many": 100.0, "what color is the": 100.0, "is there a": 100.0, "is it": 30.0,
                            "what is the man": 30.0, "is this a": 50.0,  # 74006 0, 133011 1
                            "are the": 90.0, "is": 0.0},
    },
}


@pytest.mark.parametrize("metric", VQA_METRICS)
def test_official_fixture_both_variants(metric):
    preds = read_vqa_results(RESULTS)
    result = vqa_accuracy(preds, read_vqa_annotations(ANNOTATIONS), metric=metric)
    expected = FIXTURE_EXPECTED[metric]
    assert result["overall"] == expected["overall"]
    assert result["perAnswerType"] == expected["perAnswerType"]
    assert result["perQuestionType"] == expected["perQuestionType"]
    assert result["n"] == 12 and result["metric"] == metric


# ---- readers of the official files ---------------------------------------------------------


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.mark.parametrize(
    "data, message",
    [
        ("[{", "is not JSON"),
        ({"annotations": []}, "got a JSON dict. It has 'annotations': an annotation file"),
        ([], "empty list"),
        ([["42000", "yes"]], r"entry \[0\] is \['42000', 'yes'\]"),
        ([{"question_id": 1}], r"entry \[0\] has no 'answer'"),
        ([{"question_id": "42000", "answer": "yes"}], r"entry \[0\]: question_id '42000' \(str\) must be an integer"),
        ([{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": 2}],
         r"entry \[1\] \(question_id 2\): answer 2 \(int\) must be a string \(write \"2\"\)"),
        ([{"question_id": 1, "answer": "yes"}, {"question_id": 1, "answer": "no"}],
         r"entry \[1\]: question_id 1 again \(first at entry \[0\]\)"),
    ],
)
def test_results_reader_names_file_and_entry(tmp_path, data, message):
    path = _write(tmp_path, "res.json", data)
    with pytest.raises(FileFormatError, match=message) as err:
        read_vqa_results(path)
    assert str(path) in str(err.value)


def test_questions_and_annotations_readers(tmp_path):
    assert sorted(read_vqa_questions(QUESTIONS)) == [a["question_id"] for a in read_vqa_annotations(ANNOTATIONS)]
    with pytest.raises(FileFormatError, match="It is a JSON list: a results file"):
        read_vqa_annotations(RESULTS)
    with pytest.raises(FileFormatError, match="It has 'questions': a questions file"):
        read_vqa_annotations(QUESTIONS)
    with pytest.raises(FileFormatError, match="It has 'annotations': an annotation file"):
        read_vqa_questions(ANNOTATIONS)
    annotations = json.loads(ANNOTATIONS.read_text())
    annotations["annotations"][3]["answers"][5] = {"answer": 5, "answer_id": 6}
    path = _write(tmp_path, "ann.json", annotations)
    with pytest.raises(FileFormatError, match=r"annotations\[3\] \(question_id 73003\): answers\[5\] must be"):
        read_vqa_annotations(path)
    del annotations["annotations"][3]["answer_type"]
    with pytest.raises(FileFormatError, match=r"annotations\[3\] \(question_id 73003\): 'answer_type' must be"):
        read_vqa_annotations(_write(tmp_path, "ann.json", annotations))
