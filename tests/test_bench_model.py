"""`trim bench`: decisions spread per sample, both layouts, and the costs each row reports."""

from __future__ import annotations

import pytest
import torch

from trim.eval.bench_model import format_table, run, spread_keeps
from trim.models import ModelConfig, TrimConfig, VisionConfig, create_model


def test_spread_keeps_are_even_around_the_mean():
    keeps = spread_keeps(0.5, 8, 0.25)
    assert sorted(keeps.tolist()) == pytest.approx(torch.linspace(0.25, 0.75, 8).tolist())
    assert spread_keeps(0.5, 1, 0.25).tolist() == [0.5]
    assert spread_keeps(0.1, 4, 0.25).min() >= 0.02  # never below a sliver


def test_bench_rows_report_per_sample_and_ran_costs(monkeypatch):
    import trim.nn.attention as attention

    # A model this small would mask heads and pad its attention cores (dispatch costs more than
    # they save); with no per-call overhead assumed, packed runs exactly each sample's own work.
    monkeypatch.setattr(attention, "_CALL_FLOPS", 0.0)
    torch.manual_seed(0)
    trim = TrimConfig(vision_token_layers=[1, 2], vision_head_layers=[1], cross_token_layers=[0],
                      cross_head_layers=[1])
    model = create_model(ModelConfig(vision=VisionConfig(layers=3), trim=trim))
    rows = run(model, batch_sizes=[4], targets=[0.5], warmup=0, repeats=1, spread=0.25)
    assert [(r["layout"], r["batch"]) for r in rows] == [("packed", 4), ("padded", 4)]
    packed, padded = rows
    assert packed["cost_ratio"] == pytest.approx(0.5, abs=0.05)  # the mean keep was solved for the target
    assert packed["cost_spread"] > 0.05  # samples cost differently, as a trained model's do
    assert packed["cost_ran"] == pytest.approx(packed["cost_ratio"], abs=1e-4)  # packed pays per sample
    assert padded["cost_ran"] > padded["cost_ratio"] + 0.02  # padded pays padding and head unions
    assert all(r["speedup"] > 0 and r["efficiency"] == pytest.approx(r["speedup"] * r["cost_ratio"]) for r in rows)
    assert "packed" in format_table(rows) and "cost ran" in format_table(rows)
    assert not any(getattr(m, "forced_ratio", None) is not None for m in model.modules())  # learned again
