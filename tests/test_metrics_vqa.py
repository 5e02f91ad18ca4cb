"""VQA v2 official normalisation and leave-one-out accuracy, on hand-written cases."""

import json

import pytest

from trim.eval.metrics.vqa import export_evalai, normalize_answer, process_punctuation, vqa_accuracy


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
