"""Degenerate scores: tables, summaries and the search keep methods whose scores are NaN.

A map that is constant (every weight of a layer pruned, every input dead) has no Trojan AUC or
Pointing Game: its score is NaN. Whether a trained model lands on that edge depends on the
machine it was trained on, so every table must show such a method with NaN and a count of the
samples scored, never crash and never drop the row.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from spade_lib import metrics, results, search

NAN = math.nan
SAMPLES = 4


def _frame() -> pd.DataFrame:
    """Methods A (always scored), B (no score under spade) and C (spade: samples 2 and 3 are NaN
    in both aggregations, and the signed sum is NaN on every sample) on four samples."""
    scores = {
        ("A", "dense"): ([0.5, 0.6, 0.7, 0.8], [0.6, 0.6, 0.6, 0.6], [0, 1, 1, 1], [1, 1, 0, 0]),
        ("A", "spade"): ([0.9, 0.8, 0.7, 0.6], [0.5, 0.5, 0.5, 0.5], [1, 1, 1, 0], [0, 0, 0, 0]),
        ("B", "dense"): ([0.7, 0.7, 0.7, 0.7], [0.8, 0.8, 0.8, 0.8], [1, 1, 0, 0], [1, 1, 1, 0]),
        ("B", "spade"): ([NAN] * 4, [NAN] * 4, [NAN] * 4, [NAN] * 4),
        ("C", "dense"): ([0.4, 0.5, 0.6, 0.7], [0.9, 0.9, 0.9, 0.9], [0, 0, 0, 1], [1, 1, 1, 1]),
        ("C", "spade"): ([NAN] * 4, [1.0, 0.8, NAN, NAN], [NAN] * 4, [1, 0, NAN, NAN]),
    }
    rows = []
    for (method, variant), (a_sum, a_abs, p_sum, p_abs) in scores.items():
        for i in range(SAMPLES):
            rows.append({"sample": 10 + i, "method": method, "variant": variant,
                         "auc_sum": a_sum[i], "auc_abs": a_abs[i], "pointing_sum": p_sum[i],
                         "pointing_abs": p_abs[i], "keeps_prediction": i != 3})
    return pd.DataFrame(rows)


def test_best_of_aggregations_never_takes_an_aggregation_without_scores() -> None:
    table = metrics.best_of_aggregations(_frame(), by=["method", "variant"]).set_index(
        ["method", "variant"])
    c = table.loc[("C", "spade")]
    assert c["aggregation"] == "abs" and c["best"] == pytest.approx(0.9)
    assert c["n"] == 4 and c["n_scored"] == 2
    b = table.loc[("B", "spade")]
    assert b["aggregation"] is None and math.isnan(b["best"]) and b["n_scored"] == 0
    assert table.loc[("A", "dense"), "n_scored"] == 4


def test_summary_keeps_nan_methods_with_their_counts() -> None:
    table = results.summary(_frame())
    assert list(table.index) == ["A", "B", "C", "Average"]
    for metric in ("auc", "pointing"):
        assert list(table.columns[table.columns.str.startswith(metric)]) == [
            f"{metric}_{c}" for c in ("dense", "spade", "delta", "se", "aggregation",
                                      "n_dense", "n_spade")]
    # B: no score under spade
    assert math.isnan(table.loc["B", "auc_spade"]) and math.isnan(table.loc["B", "auc_delta"])
    assert math.isnan(table.loc["B", "auc_se"])
    assert table.loc["B", "auc_dense"] == pytest.approx(80.0)
    assert table.loc["B", "auc_n_dense"] == 4 and table.loc["B", "auc_n_spade"] == 0
    assert table.loc["B", "auc_aggregation"] == "abs/None"
    # C: abs scored on two samples (the signed sum on none)
    assert table.loc["C", "auc_spade"] == pytest.approx(90.0)
    assert table.loc["C", "auc_n_spade"] == 2 and table.loc["C", "pointing_n_spade"] == 2
    assert table.loc["C", "auc_aggregation"] == "abs/abs"
    assert table.loc["C", "auc_delta"] == pytest.approx(0.0)
    assert table.loc["C", "auc_se"] == pytest.approx(100 * np.std([0.1, -0.1], ddof=1)
                                                     / math.sqrt(2))
    # the average over methods is NaN on the side where a method has no score
    assert math.isnan(table.loc["Average", "auc_spade"])
    assert table.loc["Average", "auc_dense"] == pytest.approx(100 * (0.65 + 0.8 + 0.9) / 3)
    assert table.loc["Average", "auc_n_dense"] == 4 and table.loc["Average", "auc_n_spade"] == 0
    assert (table["n"] == SAMPLES).all()
    assert table.loc["A", "auc_n_spade"] == 4
    flipped = results.summary(_frame(), variant="dense", baseline="spade")
    assert flipped.loc["B", "auc_n_spade"] == 0 and math.isnan(flipped.loc["B", "auc_delta"])


def test_wins_count_only_scored_samples_and_keep_every_method() -> None:
    table = results.wins(_frame())
    assert list(table.index) == ["A", "B", "C"]
    assert table.loc["B"].to_dict() == {"better": 0, "equal": 0, "worse": 0, "n": 0, "total": 4}
    # C: spade abs 1.0, 0.8 against dense abs 0.9, 0.9
    assert table.loc["C"].to_dict() == {"better": 1, "equal": 0, "worse": 1, "n": 2, "total": 4}
    assert table.loc["A", "n"] == 4
    assert results.wins(_frame(), metric="pointing").loc["B", "n"] == 0


def test_variant_table_shows_nan_and_counts() -> None:
    table = results.variant_table(_frame(), "auc")
    assert list(table.index) == ["A", "B", "C", "Average"]
    assert math.isnan(table.loc["B", "spade"]) and table.loc["C", "spade"] == pytest.approx(90.0)
    assert math.isnan(table.loc["Average", "spade"])
    assert table.loc["Average", "dense"] == pytest.approx(100 * (0.65 + 0.8 + 0.9) / 3)
    n, total = table.attrs["n"], table.attrs["total"]
    assert n.loc["B", "spade"] == 0 and n.loc["C", "spade"] == 2 and n.loc["A", "spade"] == 4
    assert n.loc["Average", "spade"] == 0 and n.loc["Average", "dense"] == 4
    assert (total == SAMPLES).all().all()
    assert table.attrs["aggregation"].loc["B", "spade"] is None
    pointing = results.variant_table(_frame(), "pointing", percent=False)
    assert pointing.attrs["n"].loc["C", "spade"] == 2


def test_merge_score_gap_and_prediction_kept_with_nan_scores() -> None:
    frame = _frame()
    twin = frame[frame["method"] == "B"].assign(method="B2")
    both = pd.concat([frame, twin], ignore_index=True)
    assert results.score_gap(both, ["B", "B2"]) == 0.0
    merged = results.merge_methods(both, ["B", "B2"])
    assert list(dict.fromkeys(merged["method"])) == ["A", "B / B2", "C"]
    assert results.summary(merged).loc["B / B2", "auc_n_spade"] == 0
    assert results.score_gap(frame, ["A", "B"]) == math.inf
    with pytest.raises(ValueError, match="differ by up to inf"):
        results.merge_methods(frame, ["A", "C"])
    kept = results.prediction_kept(frame)
    assert kept.to_dict() == {"dense": 0.75, "spade": 0.75}


def test_schedule_score_is_nan_when_a_method_has_no_score(monkeypatch) -> None:
    table = _frame()

    def scores(net, image, mask, target, methods, options=None):
        rows = table[(table["variant"] == net) & (table["sample"] == 10 + int(target))]
        return rows.set_index("method").loc[list(methods)].reset_index()

    monkeypatch.setattr(results, "score_methods", scores)
    class Samples(list):
        """Four samples; ``targets`` tells the fake scorer which sample it is."""

        def images(self) -> torch.Tensor:
            return torch.zeros(len(self), 3, 2, 2)

        def masks(self) -> torch.Tensor:
            return torch.zeros(len(self), 2, 2, dtype=torch.bool)

        def targets(self) -> torch.Tensor:
            return torch.arange(len(self))

    four = Samples(range(SAMPLES))
    for variant, methods, want in (("dense", ["A", "B", "C"], (0.65 + 0.8 + 0.9) / 3),
                                   ("spade", ["A", "C"], (0.75 + 0.9) / 2),
                                   ("spade", ["A", "B", "C"], NAN)):
        candidates = SimpleNamespace(load=lambda i, schedule, v=variant: v)
        got = search.schedule_score(candidates, four, {}, methods)["score"]
        assert got == pytest.approx(want, nan_ok=True), (variant, methods)
        fixed = search.schedule_score(candidates, four, {}, methods, aggregation="abs")["score"]
        assert math.isnan(fixed) == math.isnan(want)
