"""Computational cost (chapter F): slope fits, the F.15 layout and verdict, the machine-keyed cache,
the OBC row scaling and the benchmark's results file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from spade_lib import cost, samples
from spade_lib.samples import Samples

# --------------------------------------------------------------------------------------------
# Slopes
# --------------------------------------------------------------------------------------------


def test_fit_slope_recovers_an_exact_power_law() -> None:
    x = np.array([2.0, 4.0, 8.0, 16.0, 32.0])
    s = cost.fit_slope(x, 3.0 * x**1.7)
    # log-space least squares on exact points: only float64 round-off of logs ~ 1e-15 relative
    assert s.slope == pytest.approx(1.7, abs=1e-12)
    assert s.intercept == pytest.approx(math.log(3.0), abs=1e-12)
    assert s.se < 1e-12 and s.n == 5
    assert s.predict(1024.0) == pytest.approx(3.0 * 1024**1.7, rel=1e-10)


def test_fit_slope_hand_computed_and_its_standard_error_is_the_textbook_one() -> None:
    # log2: x -> (0, 1, 2), y -> (0, 1, 3): slope = sum(dx * dy) / sum(dx^2) = 3 / 2
    s = cost.fit_slope([1, 2, 4], [1, 2, 8])
    assert s.slope == pytest.approx(1.5, abs=1e-12)
    gen = np.random.default_rng(0)
    x = np.geomspace(1, 1000, 12)
    y = 5 * x**0.8 * np.exp(gen.normal(0, 0.2, x.size))
    s = cost.fit_slope(x, y)
    coef, cov = np.polyfit(np.log(x), np.log(y), 1, cov=True)  # cov scaled by RSS / (n - 2)
    assert s.slope == pytest.approx(coef[0], abs=1e-10)
    assert s.se == pytest.approx(math.sqrt(cov[0, 0]), rel=1e-8)
    assert abs(s.slope - 0.8) < 3 * s.se  # the known exponent within three standard errors


def test_fit_slope_degenerate_points() -> None:
    s = cost.fit_slope([1, 2, 0, -1, 4], [1, 2, 5, 5, float("nan")])
    assert s.n == 2 and s.slope == pytest.approx(1.0) and math.isnan(s.se)
    assert math.isnan(cost.fit_slope([3, 3, 3], [1, 2, 3]).slope)
    with pytest.raises(ValueError, match="same length"):
        cost.fit_slope([1, 2], [1, 2, 3])


def test_fit_line_and_extrapolation_recover_a_fixed_cost_and_a_rate() -> None:
    x = np.array([4.0, 8.0, 16.0, 32.0])
    line = cost.fit_line(x, 5.0 + 0.25 * x)
    assert line.intercept == pytest.approx(5.0, abs=1e-12)
    assert line.slope == pytest.approx(0.25, abs=1e-12) and line.se < 1e-12
    frame = pd.DataFrame({"m": ["a"] * 4, "n": x, "s": 5.0 + 0.25 * x})
    out = cost.extrapolate(frame, "n", "s", 1024, "m")
    assert out.loc["a", "at 1024"] == pytest.approx(5.0 + 256.0)
    assert out.loc["a", "measured up to"] == 32.0
    assert math.isnan(cost.fit_line([1.0], [2.0]).slope)


def test_slopes_table_per_group() -> None:
    x = np.array([1.0, 2.0, 4.0, 8.0])
    frame = pd.DataFrame({"g": ["a"] * 4 + ["b"] * 4, "x": np.tile(x, 2),
                          "y": np.concatenate([x**2, x**0.5])})
    out = cost.slopes(frame, "x", ["y"], by="g").set_index("g")
    assert out.loc["a", "slope"] == pytest.approx(2.0)
    assert out.loc["b", "slope"] == pytest.approx(0.5)
    assert list(out["n"]) == [4, 4]


# --------------------------------------------------------------------------------------------
# Table F.15
# --------------------------------------------------------------------------------------------


def test_paper_table_ratios_are_computed_from_the_printed_times() -> None:
    paper = cost.paper_table()
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
    table = cost.table_f15(runs)
    assert list(table.columns) == list(cost.F15_COLUMNS)
    assert table.shape == (4, len(cost.F15_COLUMNS))
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
    text = cost.f15_sentence(cost.table_f15(runs))
    # OBC: 'fast' at 2% (+- 0.2%) is sooner and inside the paper's 0.38%-3.7%; 'slow' at 350% fails
    assert "**SPADE (OBC)**: ready before Sparse FC **holds** on 1 of 2 models, fails on 1" in text
    assert "in the paper's range on 1, outside on 1" in text
    # FastOBC: 1% is inside the range, 100% +- 16.7% straddles 1: inconclusive
    assert "**SPADE (FastOBC)**: ready before Sparse FC **holds** on 1 of 2 models, fails on 0, " \
           "inconclusive on 1" in text


# --------------------------------------------------------------------------------------------
# Solver time per layer
# --------------------------------------------------------------------------------------------


def _spd(n: int, seed: int) -> torch.Tensor:
    x = torch.randn(2 * n, n, generator=torch.Generator().manual_seed(seed))
    return 2 * x.T @ x / x.shape[0]


def test_solver_seconds_times_each_shape_once_and_scales_rows(tiny: torch.nn.Module,
                                                             monkeypatch) -> None:
    tiny.conv3 = torch.nn.Conv2d(12, 12, 3, padding=1)       # same shape as conv2
    names = ["conv", "conv2", "conv3", "fc"]
    modules = dict(tiny.named_modules())
    stats = {k: _spd(modules[k].weight[0].numel(), i) for i, k in enumerate(names)}
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    budget = 2 * 108**3 + 1                                     # conv2/conv3: n = 108, 12 rows
    calls = []
    real = cost.pruning.prune_layer
    monkeypatch.setattr(cost.pruning, "prune_layer", lambda w, h, s, m, **o: (
        calls.append((tuple(w.shape), o)), real(w, h, s, m, **o))[1])
    out = cost.solver_seconds(tiny, stats, dict.fromkeys(names, 0.5), "obc", budget)
    assert list(out.columns) == list(cost.LAYER_COLUMNS)
    by = out.set_index("layer")
    assert by.loc["conv2", "rows_timed"] == 2 and by.loc["conv2", "rows"] == 12
    assert by.loc["conv2", "seconds"] == pytest.approx(6 * by.loc["conv2", "timed_seconds"])
    assert by.loc["conv3", "timed_as"] == "conv2"
    assert by.loc["conv3", "seconds"] == by.loc["conv2", "seconds"]
    assert by.loc["conv", "rows_timed"] == 6                    # n = 72: budget // 72^3 = 6
    assert by.loc["conv", "seconds"] == pytest.approx(2 * by.loc["conv", "timed_seconds"])
    assert by.loc["fc", "rows_timed"] == 5
    # one call per shape; a scaled layer runs in batches of the rows timed (float32: 4 bytes)
    assert calls == [((6, 8, 3, 3), {"batch_bytes": 6 * 72 * 72 * 4}),
                     ((2, 12, 3, 3), {"batch_bytes": 2 * 108 * 108 * 4}), ((5, 12), {})]
    fast = cost.solver_seconds(tiny, stats, dict.fromkeys(names, 0.5), "fastobc", budget)
    assert (fast["rows_timed"] == fast["rows"]).all()           # no row scaling for FastOBC
    whole = cost.solver_seconds(tiny, stats, dict.fromkeys(names, 0.5), "obc", None)
    assert (whole["rows_timed"] == whole["rows"]).all()
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    with pytest.raises(ValueError, match="unknown solver 'sgd'"):
        cost.solver_seconds(tiny, stats, {"fc": 0.5}, "sgd")
    with pytest.raises(ValueError, match=r"no Hessian for layers \['conv'\]"):
        cost.solver_seconds(tiny, {}, {"conv": 0.5})


# --------------------------------------------------------------------------------------------
# Measurements: the table's shape and the machine-keyed cache
# --------------------------------------------------------------------------------------------


@pytest.fixture
def two_samples(monkeypatch, scenes) -> None:
    """evaluation_samples gives the first two poisoned scenes (no filter: a random model)."""
    test, poisoned = scenes
    monkeypatch.setattr(samples, "evaluation_samples",
                        lambda cfg, model: Samples.from_ids(poisoned, test, [0, 1]))


def test_spade_timings_rows_and_phases(cfg, model, two_samples, one_thread) -> None:
    run = cost.spade_timings(cfg, model, samples=2, row_budget=1e6, progress=False)
    t = run.samples
    assert len(t) == 4 and set(t["solver"]) == {"obc", "fastobc"}
    assert list(t.columns) == ["preset", "arch", "solver", "sample", *cost.PHASES,
                               "solve_timed", "weights"]
    for _, pair in t.groupby("sample"):
        fast, obc = (pair[pair["solver"] == s].iloc[0] for s in ("fastobc", "obc"))
        for col in ("augment", "hessians", "attribution"):             # shared by both rows
            assert fast[col] == obc[col]
        assert obc["trace"] - obc["solve"] == pytest.approx(fast["trace"] - fast["solve"])
        assert fast["first"] == pytest.approx(fast["trace"] + fast["attribution"])
        assert fast["solve_timed"] == 1.0 and 0 < obc["solve_timed"] <= 1.0
    layers = run.layers
    assert set(layers["solver"]) == {"obc", "fastobc"}
    assert len(layers) == 2 * layers["layer"].nunique()
    obc = layers[layers["solver"] == "obc"]
    assert t[t["solver"] == "obc"]["solve"].iloc[0] == pytest.approx(obc["seconds"].sum())
    assert not run.loaded and run.record["machine"] == cost.machine("cpu")


def test_measurements_are_cached_per_machine(cfg, model, two_samples, one_thread,
                                             monkeypatch) -> None:
    first = cost.sweep(cfg, model, "n_augmentations", [4], progress=False)
    again = cost.sweep(cfg, model, "n_augmentations", [4], progress=False)
    pd.testing.assert_frame_equal(first, again)                       # read back, not remeasured
    files = list(Path(cfg.cache_dir, "cost").glob("sweep-*.json"))
    assert len(files) == 1
    other = {**cost.machine("cpu"), "cpu": "Another CPU 9000"}
    monkeypatch.setattr(cost, "machine", lambda device="cpu": other)
    cost.sweep(cfg, model, "n_augmentations", [4], progress=False)
    files = list(Path(cfg.cache_dir, "cost").glob("sweep-*.json"))
    assert len(files) == 2                                             # measured again
    assert {json.loads(f.read_text())["machine"]["cpu"] for f in files} == {
        "Another CPU 9000", cost._cpu_model()}


def test_sweep_values_and_checks(cfg, model) -> None:
    assert cost.sweep_values(cfg, "n_augmentations") == (2, 4, 8, 16)
    assert cost.sweep_values(cfg, "sparsity") == cost.SWEEP_SPARSITIES
    with pytest.raises(ValueError, match="unknown sweep parameter 'width'"):
        cost.sweep(cfg, model, "width")
    with pytest.raises(ValueError, match="sparsity value"):
        cost.sweep(cfg, model, "sparsity", [1.5])


# --------------------------------------------------------------------------------------------
# The benchmark's results file
# --------------------------------------------------------------------------------------------


def test_results_file_round_trip_and_missing(tmp_path) -> None:
    assert cost.read_results(tmp_path / "none.json") is None
    traces = pd.DataFrame([{"model": "m", "n_augmentations": 4, "solve": 1.5}])
    solvers = pd.DataFrame([{"model": "m", "fastobc_seconds": 1.5, "obc_seconds": 30.0}])
    path = cost.write_results(tmp_path / "r.json", traces, solvers, "cpu", "python x",
                              checks=[{"layer": "a", "whole_seconds": 1.0}])
    back = cost.read_results(path)
    assert back.device == "cpu" and back.command == "python x"
    assert back.machine == cost.machine("cpu")
    pd.testing.assert_frame_equal(back.traces, traces)
    pd.testing.assert_frame_equal(back.solvers, solvers)
    assert back.checks["whole_seconds"].tolist() == [1.0]
    (tmp_path / "bad.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match="bad.json.*not a bench_cost.py results file"):
        cost.read_results(tmp_path / "bad.json")
    assert cost.results_file("gpu").name == "cost-gpu.json"
