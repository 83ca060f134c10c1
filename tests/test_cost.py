"""Computational cost (chapter F, :mod:`spade_lib.cost`): the machine-keyed cache, the OBC row
scaling, the measurements' layout and the benchmark's results file."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from spade_lib import cost, samples
from spade_lib.samples import Samples

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


def test_a_model_no_trojan_fooled_is_timed_on_patched_images(cfg, model, monkeypatch, scenes,
                                                             one_thread) -> None:
    """SPADE's time does not depend on the filter: a model with no sample is timed on the first
    patched test images, and the record says so."""
    test, poisoned = scenes

    def none_pass(cfg, model):
        raise samples.NoSampleError("no candidate passes the filter")

    monkeypatch.setattr(samples, "evaluation_samples", none_pass)
    run = cost.spade_timings(cfg, model, samples=1, row_budget=1e6, progress=False)
    assert run.record["images"] == cost.TIMED_PATCHED
    assert run.samples["sample"].tolist() == [0, 0], "the first patched image, both solvers"
    monkeypatch.setattr(samples, "evaluation_samples",
                        lambda cfg, model: Samples.from_ids(poisoned, test, [3]))
    again = cost.spade_timings(cfg, model, samples=1, row_budget=1e6, cache=False,
                               progress=False)
    assert again.record["images"] == cost.TIMED_SAMPLES
    assert again.samples["sample"].tolist() == [3, 3]


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
