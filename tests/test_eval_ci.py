"""The accuracy's 95% interval: how far apart two methods must be on a split before the split tells them apart."""

import math

import numpy as np
import pytest

from trim.eval.scores import ci95, score


def test_interval_of_right_or_wrong_answers_is_the_binomial_one():
    per_sample = np.array([100.0] * 850 + [0.0] * 150)
    expected = 1.96 * math.sqrt(0.85 * 0.15 * 1000 / 999) * 100 / math.sqrt(1000)
    assert ci95(per_sample) == pytest.approx(expected)
    assert ci95(np.array([100.0])) is None  # one sample: no spread to estimate


def test_five_times_the_samples_shrink_the_interval_by_sqrt_5():
    small = ci95(np.array([100.0] * 800 + [0.0] * 200))
    large = ci95(np.array([100.0] * 4000 + [0.0] * 1000))
    assert small / large == pytest.approx(math.sqrt(5), rel=1e-3)


def test_nlvr2_and_vqa_scores_carry_their_interval():
    ids = [f"dev-{i}-0-{j}" for i in range(10) for j in range(2)]
    labels = [1, 0] * 10
    nlvr2 = score("nlvr2", {"ids": ids, "label": labels, "predictions": [bool(v) for v in labels[:15]] + [True] * 5,
                            "loss": [0.1] * 20})
    p = nlvr2.metrics["accuracy"]
    assert nlvr2.ci95 == pytest.approx(100 * 1.96 * math.sqrt(p * (1 - p) * 20 / 19) / math.sqrt(20))
    vqa = score("vqa", {"ids": [1, 2, 3, 4], "predictions": ["red", "red", "blue", "2"],
                        "answers": [["red"] * 10, ["blue"] * 10, ["blue"] * 10, ["2"] * 10],
                        "answer_type": ["other"] * 3 + ["number"], "question_type": ["what color"] * 3 + ["how many"]})
    assert vqa.accuracy == pytest.approx(75.0)
    assert vqa.ci95 == pytest.approx(1.96 * np.std([100, 0, 100, 100], ddof=1) / 2)
