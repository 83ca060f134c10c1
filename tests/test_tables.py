"""Table layouts: Table B.2, the per-sample wins, the variant table, merged methods."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from spade_lib import results, tables


def _frame() -> pd.DataFrame:
    """Two methods, three samples, dense and spade, with chosen scores."""
    rows = []
    values = {
        ("A", "dense"): ([0.5, 0.6, 0.7], [0.8, 0.8, 0.8], [0, 0, 1], [1, 1, 0]),
        ("A", "spade"): ([0.9, 1.0, 0.8], [0.7, 0.7, 0.7], [1, 1, 1], [0, 0, 0]),
        ("B", "dense"): ([0.6, 0.6, 0.6], [0.5, 0.5, 0.5], [1, 0, 0], [0, 0, 0]),
        ("B", "spade"): ([0.5, 0.5, 0.5], [0.7, 0.6, 0.8], [1, 1, 0], [0, 0, 0]),
    }
    for (method, variant), (a_sum, a_abs, p_sum, p_abs) in values.items():
        for i in range(3):
            rows.append({"sample": i, "method": method, "variant": variant,
                         "auc_sum": a_sum[i], "auc_abs": a_abs[i], "pointing_sum": p_sum[i],
                         "pointing_abs": p_abs[i], "keeps_prediction": variant == "dense" or i < 2})
    return pd.DataFrame(rows)


def test_summary_has_the_table_b2_layout() -> None:
    table = tables.summary(_frame())
    assert list(table.index) == ["A", "B", "Average"]
    assert list(table.columns) == [
        "auc_dense", "auc_spade", "auc_delta", "auc_se", "auc_aggregation", "auc_n_dense",
        "auc_n_spade", "pointing_dense", "pointing_spade", "pointing_delta", "pointing_se",
        "pointing_aggregation", "pointing_n_dense", "pointing_n_spade", "n", "keeps_prediction"]
    # A: dense best is abs (0.8), spade best is sum (0.9); per-sample deltas 0.1, 0.2, 0.0
    assert table.loc["A", "auc_dense"] == pytest.approx(80.0)
    assert table.loc["A", "auc_spade"] == pytest.approx(90.0)
    assert table.loc["A", "auc_delta"] == pytest.approx(10.0)
    assert table.loc["A", "auc_aggregation"] == "abs/sum"
    assert table.loc["A", "auc_se"] == pytest.approx(100 * np.std([0.1, 0.2, 0.0], ddof=1)
                                                     / math.sqrt(3))
    # B: dense sum 0.6, spade abs 0.7
    assert table.loc["B", "auc_delta"] == pytest.approx(10.0)
    assert table.loc["B", "auc_aggregation"] == "sum/abs"
    assert table.loc["Average", "auc_dense"] == pytest.approx(70.0)
    assert table.loc["Average", "auc_spade"] == pytest.approx(80.0)
    per_sample = (np.array([0.1, 0.2, 0.0]) + np.array([0.1, 0.0, 0.2])) / 2
    assert table.loc["Average", "auc_se"] == pytest.approx(
        100 * np.std(per_sample, ddof=1) / math.sqrt(3))
    # Pointing Game: A dense abs 2/3 vs spade sum 1; B dense sum 1/3 vs spade sum 2/3
    assert table.loc["A", "pointing_delta"] == pytest.approx(100 / 3)
    assert table.loc["Average", "pointing_dense"] == pytest.approx(50.0)
    assert table.loc["Average", "pointing_spade"] == pytest.approx(100 * 5 / 6)
    assert (table["n"] == 3).all()
    assert table["keeps_prediction"].iloc[0] == pytest.approx(2 / 3)
    raw = tables.summary(_frame(), percent=False)
    assert raw.loc["A", "auc_spade"] == pytest.approx(0.9)


def test_variant_table_and_prediction_kept() -> None:
    frame = _frame()
    table = tables.variant_table(frame, "auc")
    assert list(table.columns) == ["dense", "spade"] and list(table.index) == ["A", "B", "Average"]
    assert table.loc["A", "spade"] == pytest.approx(90.0)
    assert table.loc["Average", "dense"] == pytest.approx(70.0)
    assert table.attrs["aggregation"].loc["A", "dense"] == "abs"
    kept = tables.prediction_kept(frame)
    assert kept["dense"] == 1.0 and kept["spade"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="unknown variant\\(s\\) \\['isd'\\]"):
        tables.summary(frame, variant="isd")
    with pytest.raises(ValueError, match="unknown metric 'iou'"):
        tables.variant_table(frame, "iou")


def test_merge_methods_only_merges_equal_scores() -> None:
    frame = _frame()
    twin = frame[frame["method"] == "A"].assign(method="A2")
    both = pd.concat([frame, twin], ignore_index=True)
    assert tables.score_gap(both, ["A", "A2"]) == 0.0
    merged = tables.merge_methods(both, ["A", "A2"], "A / A2")
    assert list(dict.fromkeys(merged["method"])) == ["A / A2", "B"]
    assert len(merged) == len(frame)
    assert tables.summary(merged).loc["A / A2", "auc_delta"] == pytest.approx(10.0)
    # the largest gap over every score column: a Pointing Game hit against a miss
    assert tables.score_gap(frame, ["A", "B"]) == 1.0
    auc_only = frame.assign(pointing_sum=0, pointing_abs=0)
    assert tables.score_gap(auc_only, ["A", "B"]) == pytest.approx(0.5)  # spade sum 1.0 vs 0.5
    with pytest.raises(ValueError, match="differ by up to 1"):
        tables.merge_methods(frame, ["A", "B"])
    with pytest.raises(ValueError, match="not in the results"):
        tables.merge_methods(frame, ["A", "C"])


def test_wins_count_the_per_sample_differences() -> None:
    table = tables.wins(_frame())
    # A: dense abs 0.8 each, spade sum 0.9, 1.0, 0.8 -> better, better, equal
    assert table.loc["A"].to_dict() == {"better": 2, "equal": 1, "worse": 0, "n": 3,
                                        "total": 3}
    # B: dense sum 0.6 each, spade abs 0.7, 0.6, 0.8 -> better, equal, better
    assert table.loc["B"].to_dict() == {"better": 2, "equal": 1, "worse": 0, "n": 3,
                                        "total": 3}
    flipped = tables.wins(_frame(), variant="dense", baseline="spade")
    assert flipped.loc["A", "worse"] == 2
    with pytest.raises(ValueError, match="unknown metric"):
        tables.wins(_frame(), metric="iou")


def test_results_keeps_the_moved_names() -> None:
    assert results.summary is tables.summary and results.wins is tables.wins
    assert results.variant_table is tables.variant_table

