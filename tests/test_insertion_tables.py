"""Table J.18's tidy numbers, layout, verdict and curves on hand-made rows with known answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from spade_lib import insertion, insertion_tables, metrics

VARIANTS = ("dense", "sparse_fc", "spade")


def _rows(values: dict[tuple[str, str, str], list[float]], metric_offset: float = 0.5,
          ) -> pd.DataFrame:
    """Rows with given normalised insertion per (method, variant, aggregation) and sample;
    deletion = ``metric_offset`` - insertion, so a better insertion is a better deletion."""
    out = []
    for (method, variant, how), per_sample in values.items():
        for s, v in enumerate(per_sample):
            out.append({"sample": s, "kind": "trojan", "rule_name": "r", "label": 1,
                        "explained": 1, "method": method, "variant": variant,
                        "aggregation": how, "full_probability": 0.5, "insertion": v / 2,
                        "deletion": (metric_offset - v) / 2, "insertion_normalised": v,
                        "deletion_normalised": metric_offset - v,
                        "insertion_curve": np.zeros(3), "deletion_curve": np.zeros(3),
                        "constant_map": False, "keeps_prediction": True, "trace_seconds": 0.0,
                        "attribution_seconds": 0.0, "config_hash": "k"})
    return insertion.typed_rows(pd.DataFrame(out))


def test_summary_differences_and_verdict_by_hand() -> None:
    values = {
        ("A", "dense", "sum"): [0.2, 0.4, 0.3], ("A", "dense", "abs"): [0.1, 0.1, 0.1],
        ("A", "spade", "sum"): [0.3, 0.5, 0.7], ("A", "spade", "abs"): [0.6, 0.6, 0.6],
        ("B", "dense", "sum"): [0.5, 0.5, 0.5], ("B", "dense", "abs"): [0.5, 0.5, 0.5],
        ("B", "spade", "sum"): [0.4, 0.6, 0.6], ("B", "spade", "abs"): [0.0, 0.0, 0.0],
    }
    rows = _rows(values)
    s = insertion_tables.summary(rows, percent=False).set_index(["metric", "method", "variant"])
    # insertion: A dense takes sum (mean .3 > .1), A spade takes abs (.6 > .5)
    assert s.loc[("insertion", "A", "dense"), "aggregation"] == "sum"
    assert s.loc[("insertion", "A", "spade"), "aggregation"] == "abs"
    assert s.loc[("insertion", "A", "dense"), "value"] == pytest.approx(0.3)
    assert s.loc[("insertion", "A", "dense"), "se"] == pytest.approx(0.1 / math.sqrt(3))
    assert s.loc[("insertion", "B", "dense"), "aggregation"] == "sum"  # a tie keeps sum
    # deletion = 0.5 - insertion: the lower deletion is the same choice
    assert s.loc[("deletion", "A", "spade"), "value"] == pytest.approx(0.5 - 0.6)
    assert s.loc[("insertion", "Average", "spade"), "value"] == pytest.approx((0.6 + 1.6 / 3) / 2)
    d = insertion_tables.differences(rows, percent=False).set_index(["metric", "method"])
    assert d.loc[("insertion", "A"), "delta"] == pytest.approx(0.3)
    assert d.loc[("insertion", "A"), "se"] == pytest.approx(0.1 / math.sqrt(3))
    assert d.loc[("insertion", "B"), ["better", "worse"]].tolist() == [2, 1]
    per_sample = np.array([[0.4, 0.2, 0.3], [-0.1, 0.1, 0.1]]).mean(0)
    assert d.loc[("insertion", "Average"), "delta"] == pytest.approx(per_sample.mean())
    assert d.loc[("deletion", "Average"), "delta"] == pytest.approx(-per_sample.mean())
    assert d.loc[("deletion", "Average"), "better"] == 3
    se = per_sample.std(ddof=1) / math.sqrt(3)
    assert d.loc[("insertion", "Average"), "se"] == pytest.approx(se)
    assert insertion_tables.claim_verdict(-0.15, 0.05, -1.0) == "holds"
    assert insertion_tables.claim_verdict(-0.15, 0.05, 1.0) == "fails"
    assert insertion_tables.claim_verdict(0.04, 0.05, 1.0) == "inconclusive"
    assert insertion_tables.claim_verdict(math.nan, 0.05, 1.0) == "not comparable"
    sentence = insertion_tables.claim_sentence(rows)
    gain = f"{100 * per_sample.mean():.2f} +- {100 * se:.2f}"
    assert (f"insertion +{gain} (paper +8.74): the claimed direction **holds** (2 of 2 methods "
            "better)") in sentence
    assert (f"deletion -{gain} (paper -1.12): the claimed direction **holds** (2 of 2 methods "
            "better)") in sentence
    level = insertion_tables.claim_sentence(rows.assign(variant=rows["variant"].replace(
        {"spade": "sparse_fc"})))
    assert "Sparse FC against Dense (3 samples): insertion" in level and "**better** than" in level
    assert "Sparse FC" in sentence and "87.74" in sentence  # the paper's numbers, quoted
    fixed = insertion_tables.summary(rows, aggregation="abs", percent=False).set_index(
        ["metric", "method", "variant"])
    assert fixed.loc[("insertion", "A", "dense"), "value"] == pytest.approx(0.1)


def test_table_j18_layout_and_paper_numbers() -> None:
    values = {(m, v, how): [0.8, 0.9] for m in ("Saliency", "Lime")
              for v in VARIANTS for how in metrics.AGGREGATIONS}
    table = insertion_tables.table_j18(_rows(values))
    frame = table.data
    assert list(frame.index) == ["Saliency", "Lime", "Average"]
    assert frame.iloc[0, 0] == "85.00 +- 5.00"
    assert frame.loc["Average", ("Insertion (higher is better)", "paper: SPADE")] == "87.74"
    assert frame.loc["Lime", ("Deletion (lower is better)", "paper: Sparse FC")] == "5.32"
    assert "2 samples" in table.caption and "normalisation" in table.caption
    raw = insertion_tables.table_j18(_rows(values), normalised=False).data
    assert raw.shape[1] == 6 and raw.iloc[0, 0] == "42.50 +- 2.50"  # paper columns: normalised only
    # the transcription: each Average of the paper's table is the mean of its rows, to rounding
    paper = insertion_tables.PAPER_J18
    np.testing.assert_allclose(paper.drop("Average").mean(), paper.loc["Average"], atol=0.01)


def test_mean_curves() -> None:
    rows = _rows({("A", v, how): [0.5, 0.5] for v in VARIANTS for how in metrics.AGGREGATIONS})
    rows["insertion_curve"] = [np.array([0.1, 0.3, 0.5]), np.array([0.1, 0.2, 0.5])] * 6
    curves = insertion_tables.mean_curves(rows, "A", "insertion")
    assert curves.index.tolist() == [0.0, 0.5, 1.0] and list(curves.columns) == list(VARIANTS)
    np.testing.assert_allclose(curves["dense"], [0.2, 0.5, 1.0])  # p / p(full) = p / 0.5
    with pytest.raises(ValueError, match="no scored rows of method 'B'"):
        insertion_tables.mean_curves(rows, "B")
