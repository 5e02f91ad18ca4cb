"""`trim bench sam`: both pruned variants solved for the target cost, timed against the full encoder."""

import pytest

from trim.eval.bench_sam import PRESETS, bench_encoders, format_table, run


def test_bench_rows_solve_the_cost_and_restore_learned_decisions(one_thread):
    rows = run(PRESETS["tiny"], target=0.6, warmup=0, repeats=1)
    assert [r["variant"] for r in rows] == ["full", "window-trim", "big.LITTLE"]
    assert rows[1]["cost_ratio"] == pytest.approx(0.6, abs=0.05)
    assert all(r["speedup"] > 0 and r["efficiency"] == pytest.approx(r["speedup"] * r["cost_ratio"]) for r in rows)
    assert "big.LITTLE" in format_table(rows) and "efficiency" in format_table(rows)


def test_bench_encoders_share_the_full_weights():
    encoders = bench_encoders(PRESETS["tiny"])
    trimmed, routed = encoders["window-trim"], encoders["big.LITTLE"]
    for (name, a), b in zip(trimmed.blocks.named_parameters(), routed.blocks.parameters()):
        assert a.equal(b), name
    assert not any(getattr(m, "forced_ratio", None) is not None for m in routed.modules())
