"""Table layouts: Table B.2, the per-sample wins, the variant table, merged methods."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from spade_lib import metrics, results, tables


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


def test_on_kept_restricts_every_variant_to_the_samples_spade_keeps() -> None:
    frame = _frame()
    assert tables.kept_samples(frame) == [0, 1]               # spade loses sample 2
    assert tables.kept_samples(frame, "dense") == [0, 1, 2]
    kept = tables.on_kept(frame)
    assert sorted(set(kept["sample"])) == [0, 1] and set(kept["variant"]) == {"dense", "spade"}
    s = tables.summary(kept)
    # A: best-aggregation means on samples 0 and 1, dense abs 0.8 -> spade sum 0.95
    assert s.loc["A", "auc_delta"] == pytest.approx(100 * (0.95 - 0.8))
    assert s["n"].iloc[-1] == 2
    with pytest.raises(ValueError, match="variant 'isd' is not in the results"):
        tables.kept_samples(frame, "isd")


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


# --------------------------------------------------------------------------------------------
# The book's layouts and sentences
# --------------------------------------------------------------------------------------------

def test_table_b2_is_the_summary_in_the_book_layout() -> None:
    s = tables.summary(_frame())
    styled = tables.table_b2(_frame())
    t = styled.data
    assert list(t.columns) == [("AUC", "Dense"), ("AUC", "SPADE"), ("AUC", "delta"),
                               ("AUC", "+- se"), ("Pointing Game", "Dense"),
                               ("Pointing Game", "SPADE"), ("Pointing Game", "delta"),
                               ("Pointing Game", "+- se")]
    assert list(t.index) == ["A", "B", "Average"]
    assert t[("AUC", "SPADE")].tolist() == s["auc_spade"].tolist()
    assert t[("Pointing Game", "+- se")].tolist() == s["pointing_se"].tolist()
    assert styled.caption.startswith("3 samples;")
    versus = tables.table_b2(_frame(), "dense", "spade", label="X").data
    assert versus.loc["A", ("AUC", "X")] == pytest.approx(80.0)
    assert versus.loc["A", ("AUC", "delta")] == pytest.approx(-10.0)


def test_headline_reads_the_average_row() -> None:
    text = tables.headline(_frame())
    se = 100 * np.std((np.array([0.1, 0.2, 0.0]) + np.array([0.1, 0.0, 0.2])) / 2, ddof=1) / 3**.5
    assert text.startswith(f"SPADE moves the average AUC from 70.0 to 80.0 (**+10.0 +- {se:.1f}**")
    assert "Pointing Game from 50.0 to 83.3 (+33.3" in text
    assert text.endswith("it raises the AUC of 2 of 2 methods.")


@pytest.mark.parametrize(("value", "se", "verdict"), [
    (7.0, 1.0, "holds"), (3.0, 0.0, "holds"), (2.5, 1.0, "inconclusive"),
    (12.5, 1.0, "inconclusive"), (1.0, 1.0, "fails"), (14.0, 1.5, "fails"),
    (7.0, math.nan, "inconclusive"), (math.nan, 1.0, "not comparable"),
])
def test_range_verdict_at_one_standard_error(value, se, verdict) -> None:
    assert tables.range_verdict(value, se, 3.0, 12.0) == verdict


def test_gain_and_difference_sentences_follow_the_numbers() -> None:
    frame = _frame()[lambda f: f["method"] == "A"]  # AUC gain 10.0 +- 5.8 (deltas 10, 20, 0)
    text = tables.gain_sentence(frame)
    assert text.startswith("The paper's SPADE raises the average AUC by 3 to 12 points")
    assert "within that range" in text and "inconclusive" in text
    assert "holds" in tables.gain_sentence(frame, paper=(0.0, 20.0))
    assert "below that range: the paper's range fails" in tables.gain_sentence(
        frame, paper=(20.0, 30.0))
    both = _frame()
    nan = both.assign(auc_sum=np.where(both["method"] == "B", np.nan, both["auc_sum"]),
                      auc_abs=np.where(both["method"] == "B", np.nan, both["auc_abs"]))
    assert "not comparable" in tables.gain_sentence(nan)
    ahead = tables.difference_sentence(frame, "spade", "dense", "S", "D")
    assert ahead.startswith("S against D: **+10.0 +- ")
    assert ahead.endswith("S is ahead of D by more than one standard error.")
    behind = tables.difference_sentence(frame, "dense", "spade", "D", "S")
    assert behind.endswith("D is behind S by more than one standard error.")
    same = frame.copy()
    same.loc[same["variant"] == "spade", metrics.SCORE_COLUMNS] = same.loc[
        same["variant"] == "dense", metrics.SCORE_COLUMNS].to_numpy()
    assert "within one standard error" in tables.difference_sentence(same, "spade", "dense",
                                                                     "S", "D")


def test_overview_takes_each_models_average_row() -> None:
    merged = tables.merge_methods(
        pd.concat([_frame(), _frame().query("method == 'A'").assign(method="A2")]), ["A", "A2"])
    out = tables.overview({"first": _frame(), "second": merged})
    assert list(out.index) == ["first", "second"]
    assert list(out.columns) == list(tables.OVERVIEW_COLUMNS.values())
    s = tables.summary(merged).loc["Average"]
    assert out.loc["second", "AUC SPADE"] == s["auc_spade"]
    assert out.loc["second", "+- se"] == s["auc_se"]
    assert out.loc["first", "PG delta"] == pytest.approx(100 / 3)
    assert out.loc["first", "samples"] == 3
    empty = tables.overview({"none kept": _frame().iloc[:0]})
    assert empty.loc["none kept", "samples"] == 0
    assert empty.drop(columns="samples").isna().all(axis=None)


def test_class_change_names_both_classes() -> None:
    assert tables.class_change(4, 8) == "Coat -> Bag"
    assert tables.class_change(1, 5, ["n0", "n1"]) == "n1 -> class 5"
    assert tables.class_change(np.int64(0), 9, classes=list("abcdefghij")) == "a -> j"
    assert tables.class_change(10, 0) == "class 10 -> T-shirt/top"


def _rules_frame() -> pd.DataFrame:
    """``_frame`` on six samples: samples 0-2 of rule 0, 3-5 of rule 1 (rule 1 with other
    scores), plus a second method that must not enter rule_table's rows."""
    first = _frame()
    second = _frame().assign(sample=lambda f: f["sample"] + 3)
    second[["auc_sum", "auc_abs"]] = second[["auc_sum", "auc_abs"]] * 0.5
    out = pd.concat([first, second], ignore_index=True)
    out["rule"] = (out["sample"] >= 3).astype(int)
    out["rule_name"] = out["rule"].map({0: "star: T-shirt->Sandal", 1: "fish: Any->Sneaker"})
    return out


def test_rule_table_is_the_summary_of_each_rule_and_their_mean() -> None:
    frame = _rules_frame()
    table = tables.rule_table(frame, "A")
    assert list(table.index) == ["star: T-shirt->Sandal", "fish: Any->Sneaker", "Average"]
    for rule, name in enumerate(table.index[:2]):
        alone = tables.summary(frame[(frame["rule"] == rule) & (frame["method"] == "A")])
        for col in ("auc_dense", "auc_spade", "auc_delta", "auc_se", "pointing_delta", "n"):
            assert table.loc[name, col] == pytest.approx(alone.loc["A", col]), (name, col)
    assert table.loc["star: T-shirt->Sandal", "auc_spade"] == pytest.approx(90.0)
    assert table.loc["fish: Any->Sneaker", "auc_spade"] == pytest.approx(45.0)
    assert table.loc["Average", "auc_spade"] == pytest.approx(67.5)
    ses = table["auc_se"].iloc[:2].to_numpy()
    assert table.loc["Average", "auc_se"] == pytest.approx(math.sqrt((ses ** 2).sum()) / 2)
    assert table.loc["Average", "n"] == 6 and table["n"].dtype.kind == "i"
    with pytest.raises(ValueError, match="method 'LRP' is not in the results; they have"):
        tables.rule_table(frame, "LRP")


def test_full_evaluation_sentence_gives_the_verdict_of_both_scores() -> None:
    frame = _rules_frame()
    text = tables.full_evaluation_sentence(frame, "A")
    table = tables.rule_table(frame, "A")
    avg = table.loc["Average"]
    assert f"AUC {avg['auc_dense']:.1f} -> {avg['auc_spade']:.1f}" in text
    assert "on 6 samples" in text and "rises on 2 of 2 rules" in text
    pointing = tables.claim_verdict(avg["pointing_delta"], avg["pointing_se"], 1.0)
    auc = tables.claim_verdict(avg["auc_delta"], avg["auc_se"], 1.0)
    assert auc == "holds"
    want = "holds" if pointing == "holds" else "fails" if pointing == "fails" else "inconclusive"
    assert f"the claim {want}" in text or f"the claim is {want}" in text
    worse = frame.copy()
    spade = worse["variant"] == "spade"
    worse.loc[spade, ["auc_sum", "auc_abs"]] = 0.0  # SPADE's maps miss the patch everywhere
    assert "the claim fails" in tables.full_evaluation_sentence(worse, "A")


def test_table_l19_prints_the_rule_table() -> None:
    frame = _rules_frame()
    styled = tables.table_l19(frame, "A")
    data, numbers = styled.data, tables.rule_table(frame, "A")
    assert list(data.index) == list(numbers.index)
    assert data[("AUC", "SPADE")].tolist() == numbers["auc_spade"].tolist()
    assert data[("Pointing Game", "+- se")].tolist() == numbers["pointing_se"].tolist()
    assert data[("", "samples")].tolist() == [3, 3, 6]
    assert "6 samples" in styled.caption


def test_rule_table_over_named_rules_marks_a_rule_without_samples() -> None:
    frame = _rules_frame()
    names = ["star: T-shirt->Sandal", "fish: Any->Sneaker", "moon: Coat->Ankle boot"]
    table = tables.rule_table(frame, "A", rules=names)
    assert list(table.index) == [*names, "Average"]
    assert math.isnan(table.loc["moon: Coat->Ankle boot", "auc_spade"])
    assert table.loc["moon: Coat->Ankle boot", "n"] == 0
    assert math.isnan(table.loc["Average", "auc_spade"])  # not an average over fewer rules
    assert math.isnan(table.loc["Average", "auc_se"]) and table.loc["Average", "n"] == 6
    with pytest.raises(ValueError, match="leaves out"):
        tables.rule_table(frame, "A", rules=names[:1])


def test_rule_table_without_any_sample_is_nan_with_zero_counts() -> None:
    """None kept (the pruned copy loses every Trojan prediction): the table still names each
    rule, with NaN scores and 0 samples, and the sentence calls the claim not comparable."""
    frame = _rules_frame()
    names = ["star: T-shirt->Sandal", "fish: Any->Sneaker"]
    empty = frame[frame["sample"] < 0]
    table = tables.rule_table(empty, "A", rules=names)
    assert list(table.index) == [*names, "Average"]
    counts = [c for c in table.columns if c == "n" or "_n_" in c]
    assert table.drop(columns=counts).isna().all(axis=None)
    assert (table[counts] == 0).all(axis=None) and table["n"].dtype.kind == "i"
    assert tables.table_l19(empty, "A", rules=names).data[("", "samples")].tolist() == [0, 0, 0]
    assert "not comparable" in tables.full_evaluation_sentence(empty, "A", rules=names)
    assert list(tables.rule_table(empty, "A").index) == ["Average"]
    with pytest.raises(ValueError, match="lack columns"):
        tables.rule_table(pd.DataFrame(), "A")


def test_cost_table_gives_the_mean_seconds_of_traces_and_maps() -> None:
    frame = _frame()
    frame["trace_seconds"] = np.where(frame["variant"] == "spade", frame["sample"] + 1.0, 0.0)
    frame["attribution_seconds"] = np.where(frame["method"] == "A", 0.5, 2.0)
    cost = tables.cost_table(frame)
    assert list(cost.index) == ["dense", "spade"] and list(cost.columns) == ["trace", "A", "B"]
    assert cost.loc["spade", "trace"] == pytest.approx(2.0)  # samples 0, 1, 2: 1, 2, 3 s
    assert cost.loc["dense", "trace"] == 0.0 and cost.loc["spade", "B"] == pytest.approx(2.0)
