"""Chapter F's tables (:mod:`spade_lib.cost_tables`): slope and line fits, Table F.15's layout,
ratios and verdict."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from spade_lib import cost, cost_tables

# --------------------------------------------------------------------------------------------
# Slopes
# --------------------------------------------------------------------------------------------


def test_fit_slope_recovers_an_exact_power_law() -> None:
    x = np.array([2.0, 4.0, 8.0, 16.0, 32.0])
    s = cost_tables.fit_slope(x, 3.0 * x**1.7)
    # log-space least squares on exact points: only float64 round-off of logs ~ 1e-15 relative
    assert s.slope == pytest.approx(1.7, abs=1e-12)
    assert s.intercept == pytest.approx(math.log(3.0), abs=1e-12)
    assert s.se < 1e-12 and s.n == 5
    assert s.predict(1024.0) == pytest.approx(3.0 * 1024**1.7, rel=1e-10)


def test_fit_slope_hand_computed_and_its_standard_error_is_the_textbook_one() -> None:
    # log2: x -> (0, 1, 2), y -> (0, 1, 3): slope = sum(dx * dy) / sum(dx^2) = 3 / 2
    s = cost_tables.fit_slope([1, 2, 4], [1, 2, 8])
    assert s.slope == pytest.approx(1.5, abs=1e-12)
    gen = np.random.default_rng(0)
    x = np.geomspace(1, 1000, 12)
    y = 5 * x**0.8 * np.exp(gen.normal(0, 0.2, x.size))
    s = cost_tables.fit_slope(x, y)
    coef, cov = np.polyfit(np.log(x), np.log(y), 1, cov=True)  # cov scaled by RSS / (n - 2)
    assert s.slope == pytest.approx(coef[0], abs=1e-10)
    assert s.se == pytest.approx(math.sqrt(cov[0, 0]), rel=1e-8)
    assert abs(s.slope - 0.8) < 3 * s.se  # the known exponent within three standard errors


def test_fit_slope_degenerate_points() -> None:
    s = cost_tables.fit_slope([1, 2, 0, -1, 4], [1, 2, 5, 5, float("nan")])
    assert s.n == 2 and s.slope == pytest.approx(1.0) and math.isnan(s.se)
    assert math.isnan(cost_tables.fit_slope([3, 3, 3], [1, 2, 3]).slope)
    with pytest.raises(ValueError, match="same length"):
        cost_tables.fit_slope([1, 2], [1, 2, 3])


def test_fit_line_and_extrapolation_recover_a_fixed_cost_and_a_rate() -> None:
    x = np.array([4.0, 8.0, 16.0, 32.0])
    line = cost_tables.fit_line(x, 5.0 + 0.25 * x)
    assert line.intercept == pytest.approx(5.0, abs=1e-12)
    assert line.slope == pytest.approx(0.25, abs=1e-12) and line.se < 1e-12
    frame = pd.DataFrame({"m": ["a"] * 4, "n": x, "s": 5.0 + 0.25 * x})
    out = cost_tables.extrapolate(frame, "n", "s", 1024, "m")
    assert out.loc["a", "at 1024"] == pytest.approx(5.0 + 256.0)
    assert out.loc["a", "measured up to"] == 32.0
    assert math.isnan(cost_tables.fit_line([1.0], [2.0]).slope)


def test_slopes_table_per_group() -> None:
    x = np.array([1.0, 2.0, 4.0, 8.0])
    frame = pd.DataFrame({"g": ["a"] * 4 + ["b"] * 4, "x": np.tile(x, 2),
                          "y": np.concatenate([x**2, x**0.5])})
    out = cost_tables.slopes(frame, "x", ["y"], by="g").set_index("g")
    assert out.loc["a", "slope"] == pytest.approx(2.0)
    assert out.loc["b", "slope"] == pytest.approx(0.5)
    assert list(out["n"]) == [4, 4]


# --------------------------------------------------------------------------------------------
# Table F.15
# --------------------------------------------------------------------------------------------


def test_paper_table_ratios_are_computed_from_the_printed_times() -> None:
    paper = cost_tables.paper_table()
    assert paper.loc["ResNet50", "ratio"] == pytest.approx(41 / (40 * 60))
    assert paper.loc["MobileNetV2", "ratio"] == pytest.approx(12 / (53 * 60))
    assert paper.loc["ConvNeXt-T", "break_even"] == pytest.approx(21 * 60 / 46)


def _run(arch: str, obc: list[float], fast: list[float]) -> cost.CostRun:
    rows = [{"arch": arch, "solver": s, "sample": i, "first": v}
            for s, values in (("obc", obc), ("fastobc", fast)) for i, v in enumerate(values)]
    return cost.CostRun(pd.DataFrame(rows), pd.DataFrame(), {}, False)


def test_table_f15_layout_ratio_and_standard_error() -> None:
    runs = {"A": (_run("resnet18", [10.0, 12.0, 14.0], [1.0, 2.0, 3.0]), {"prepare": 100.0}),
            "B": (_run("convnext", [300.0, 300.0], [3.0, 5.0]), {"prepare": 100.0})}
    table = cost_tables.table_f15(runs)
    assert list(table.columns) == list(cost_tables.F15_COLUMNS)
    assert table.shape == (4, len(cost_tables.F15_COLUMNS))
    a = table.loc[("A", "SPADE (OBC)")]
    assert a["n"] == 3 and a["seconds"] == pytest.approx(12.0)
    assert a["se"] == pytest.approx(2.0 / math.sqrt(3))           # sd 2 over three samples
    assert a["ratio"] == pytest.approx(0.12) and a["ratio_se"] == pytest.approx(a["se"] / 100)
    assert a["break_even"] == pytest.approx(100 / 12)
    assert a["paper_architecture"] == "ResNet50"
    assert a["paper_ratio"] == pytest.approx(41 / 2400)
    assert table.loc[("B", "SPADE (OBC)"), "paper_architecture"] == "ConvNeXt-T"


def test_f15_sentence_verdicts_follow_the_numbers() -> None:
    runs = {"fast": (_run("resnet18", [1.0, 1.2, 1.4], [0.5, 0.6, 0.7]), {"prepare": 60.0}),
            "slow": (_run("mobilenetv2", [200.0, 220.0], [50.0, 70.0]), {"prepare": 60.0})}
    text = cost_tables.f15_sentence(cost_tables.table_f15(runs))
    # OBC: 'fast' at 2% (+- 0.2%) is sooner and inside the paper's 0.38%-3.7%; 'slow' at 350% fails
    assert "**SPADE (OBC)**: ready before Sparse FC **holds** on 1 of 2 models, fails on 1" in text
    assert "in the paper's range on 1, outside on 1" in text
    # FastOBC: 1% is inside the range, 100% +- 16.7% straddles 1: inconclusive
    assert "**SPADE (FastOBC)**: ready before Sparse FC **holds** on 1 of 2 models, fails on 0, " \
           "inconclusive on 1" in text


# --------------------------------------------------------------------------------------------
# The batched solver's benchmark file
# --------------------------------------------------------------------------------------------

def _solver_record():
    rows = [{"samples": 1, "solver": "columns", "ops_per_sample": 260000.0,
             "views_per_sample": 700000.0, "seconds_per_sample": 10.0},
            {"samples": 1, "solver": "batched", "ops_per_sample": 26000.0,
             "views_per_sample": 30000.0, "seconds_per_sample": 8.0, "mask_differs_%": 0.0,
             "max_weight_diff": 1e-7, "ops_ratio": 10.0, "speedup": 1.25},
            {"samples": 16, "solver": "columns", "ops_per_sample": 16000.0,
             "views_per_sample": 40000.0, "seconds_per_sample": 9.0},
            {"samples": 16, "solver": "batched", "ops_per_sample": 2000.0,
             "views_per_sample": 3000.0, "seconds_per_sample": 10.0, "mask_differs_%": 0.01,
             "max_weight_diff": 0.1, "ops_ratio": 8.0, "speedup": 0.9}]
    return {"format": 1, "device": "cpu", "date": "2026-12-01", "command": "python x.py",
            "machine": {"cpu": "Test CPU", "cpus": 2, "threads": 2, "torch": "2.x",
                        "capability": "AVX2", "gpu": None}, "sparsity": 0.9, "rows": rows}


def test_solver_benchmark_file_is_read_and_its_verdict_computed(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(cost, "RESULTS_DIR", tmp_path)
    record, text = cost.solver_note("cuda")
    assert record is None and "No GPU results file" in text
    (tmp_path / "solver-cpu.json").write_text(json.dumps(_solver_record()))
    record, text = cost.solver_note("cpu")
    assert "Test CPU" in text and "python x.py" in text
    table = cost_tables.solver_bench_table(record)
    assert list(table.columns) == list(cost_tables.SOLVER_BENCH_COLUMNS.values())
    assert table["operations per sample"].tolist() == [260000, 26000, 16000, 2000]
    sentence = cost_tables.solver_bench_sentence(record)
    assert "one sample, the batched solver dispatches 10.0x fewer operations" in sentence
    assert "1.25x as fast" in sentence
    assert "a batch of 16" in sentence and "1.11x slower" in sentence
    (tmp_path / "solver-cpu.json").write_text('{"format": 2}')
    with pytest.raises(ValueError, match="not a bench_solver.py results file"):
        cost.solver_note("cpu")
    with pytest.raises(ValueError, match="solver results kind"):
        cost.solver_note("gpu")
