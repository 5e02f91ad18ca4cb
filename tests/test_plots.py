"""Each report figure is produced into a run folder and is a real, non-blank PNG."""

import matplotlib.image
import numpy as np
import pytest

from trim.eval.plots import kept_token_overlay, pareto_front, plot_cost_histogram, plot_kept_tokens, plot_pareto


def assert_real_png(path, min_bytes=8_000):
    assert path.exists() and path.stat().st_size > min_bytes
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert pixels[..., :3].std() > 0.05  # not a blank canvas


POINTS = [
    {"name": "full", "speedup": 1.0, "accuracy": 70.0, "group": "trim"},
    {"name": "t=0.7", "speedup": 1.3, "accuracy": 69.5, "group": "trim"},
    {"name": "t=0.5", "speedup": 1.8, "accuracy": 68.0, "group": "trim"},
    {"name": "ToMe r=8", "speedup": 1.3, "accuracy": 68.9, "group": "tome"},  # beaten by t=0.7
    {"name": "ToMe r=16", "speedup": 2.1, "accuracy": 65.0, "group": "tome"},
    {"name": "random", "speedup": 1.7, "accuracy": 60.0, "group": "random"},  # beaten by t=0.5
]


def test_pareto_front():
    assert [p["name"] for p in pareto_front(POINTS)] == ["full", "t=0.7", "t=0.5", "ToMe r=16"]


def test_plot_pareto(tmp_path):
    path = plot_pareto(POINTS, tmp_path / "run" / "report" / "pareto.png", accuracy_label="VQA accuracy (%)")
    assert_real_png(path)


def test_plot_cost_histogram(tmp_path):
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(0, 3, size=500)
    costs = np.clip(0.4 + 0.1 * difficulty + rng.normal(0, 0.05, size=500), 0, 1)  # harder -> costlier
    path = plot_cost_histogram(costs, tmp_path / "run" / "report" / "cost.png", title="VQA val", difficulty=difficulty)
    assert_real_png(path)
    plain = plot_cost_histogram(costs, tmp_path / "run" / "report" / "cost_plain.png")
    assert_real_png(plain)
    with pytest.raises(ValueError, match="one per sample"):
        plot_cost_histogram(costs, tmp_path / "x.png", difficulty=difficulty[:10])


def test_kept_token_overlay_dims_exactly_the_dropped_patches():
    image = np.full((6, 9, 3), 200, np.uint8)  # 6x9 image over a 2x3 grid: 3x3-pixel patches
    keep = np.array([[True, False, True], [False, True, False]])
    out = kept_token_overlay(image, keep, dim=0.25)
    assert out.shape == (6, 9, 3)
    expected = np.where(np.kron(keep, np.ones((3, 3), bool))[..., None], 200 / 255, 0.25 * 200 / 255)
    assert np.allclose(out, np.broadcast_to(expected, out.shape))
    # image sizes that are not a multiple of the grid: pixel y -> patch floor(y * gh / H)
    odd = kept_token_overlay(np.ones((5, 5, 3)), np.array([[True, False]]), dim=0.0)
    assert odd[:, :3].min() == 1.0 and odd[:, 3:].max() == 0.0  # cols 0,1,2 -> patch 0 (2*2//5 = 0)


def test_plot_kept_tokens(tmp_path):
    yy, xx = np.mgrid[:224, :224]
    image = np.stack([xx / 224, yy / 224, 0.5 * np.ones_like(xx)], -1)  # float in [0, 1]
    rng = np.random.default_rng(0)
    keep = {layer: rng.random((14, 14)) < ratio for layer, ratio in [(2, 0.9), (6, 0.6), (10, 0.3)]}
    path = plot_kept_tokens(image, keep, tmp_path / "eval" / "kept_q123.png",
                            question="What color is the umbrella held by the person on the left?")
    assert_real_png(path)
