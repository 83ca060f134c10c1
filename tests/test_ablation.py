"""Appendix D's variants, layouts and verdicts (spade_lib.ablation), on hand-made tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from spade_lib import ablation, config, schedules, search
from spade_lib.models import build_model


def _rows(scores: dict[tuple[str, str], list[float]], kept: dict[str, list[bool]] | None = None
          ) -> pd.DataFrame:
    """A results table whose AUC and Pointing Game (sum and abs alike) are the given per-sample
    values: ``{(method, variant): [score of sample 0, 1, ...]}``."""
    rows = []
    for (method, variant), values in scores.items():
        for i, v in enumerate(values):
            keep = True if kept is None or variant not in kept else kept[variant][i]
            rows.append({"sample": i, "method": method, "variant": variant, "auc_sum": v,
                         "auc_abs": v, "pointing_sum": float(v > 0.7),
                         "pointing_abs": float(v > 0.7), "keeps_prediction": keep})
    return pd.DataFrame(rows)


@pytest.fixture
def frame() -> pd.DataFrame:
    return _rows({
        ("A", "Dense"): [0.6, 0.7, 0.8, 0.6], ("B", "Dense"): [0.5, 0.5, 0.6, 0.6],
        ("A", "X"): [0.9, 0.9, 0.9, 0.5], ("B", "X"): [0.8, 0.7, 0.9, 0.5],
        ("A", "Y"): [0.6, 0.7, 0.8, 0.6], ("B", "Y"): [0.5, 0.51, 0.6, 0.61],
    }, kept={"X": [True, True, True, False]})


def test_cell_table_prints_auc_and_pointing_game(frame):
    table = ablation.cell_table(frame, ["Dense", "X"])
    assert list(table.index) == ["A", "B", "Average", "n"]
    # A dense: AUC mean 0.675, PG: one of four above 0.7 -> 25
    assert table.loc["A", "Dense"] == "67.5/25"
    assert table.loc["Average", "X"] == f"{100 * np.mean([0.8, 0.725]):.1f}/{50 + 12.5:.0f}"
    assert table.loc["n", "X"] == "4"


def test_against_pairs_each_column_with_dense_and_restricts_to_kept_samples(frame):
    table = ablation.against(frame, ["X", "Y"])
    per_sample = np.array([(0.3 + 0.3) / 2, (0.2 + 0.2) / 2, (0.1 + 0.3) / 2, (-0.1 - 0.1) / 2])
    assert table.loc["X", "AUC delta"] == pytest.approx(100 * per_sample.mean())
    assert table.loc["X", "+- se"] == pytest.approx(100 * per_sample.std(ddof=1) / 2)
    assert table.loc["X", "keeps prediction %"] == pytest.approx(75.0)
    assert table.loc["X", "n kept"] == 3
    assert table.loc["X", "AUC delta (kept)"] == pytest.approx(100 * per_sample[:3].mean())
    assert table.loc["Y", "AUC delta"] == pytest.approx(100 * 0.02 / 2 / 4)


def test_verdicts_follow_the_papers_direction(frame):
    paper = {"Dense": (90.0, 0.0), "X": (95.0, 0.0), "Y": (60.0, 0.0), "Z": (99.0, 0.0)}
    table = ablation.verdicts(frame, paper)
    assert list(table.index) == ["X", "Y"]                   # Z is not in the results
    assert table.loc["X", "paper AUC change"] == pytest.approx(5.0)
    assert table.loc["X", "verdict"] == "holds"              # +15.0 +- 8.7, claimed up
    assert table.loc["Y", "verdict"] == "fails"              # +0.25 +- 0.14, claimed down
    assert table.loc["Y", "AUC change here"] == pytest.approx(0.25)
    flat = ablation.verdicts(frame, {"Dense": (90.0, 0.0), "X": (90.2, 0.0)})
    assert flat.loc["X", "verdict"] == "no direction"


def test_pair_verdicts(frame):
    table = ablation.pair_verdicts(frame, [("X", "Dense", "better"), ("Dense", "X", "better"),
                                           ("Dense", "Y", "no better"),
                                           ("X", "Dense", "no better")])
    assert table["verdict"].tolist() == ["holds", "fails", "holds", "fails"]
    with pytest.raises(ValueError, match="'better' or 'no better'"):
        ablation.pair_verdicts(frame, [("X", "Dense", "worse")])


def test_no_better_verdict():
    assert ablation.no_better_verdict(0.5, 1.0) == "holds"
    assert ablation.no_better_verdict(-3.0, 1.0) == "holds"
    assert ablation.no_better_verdict(2.0, 1.0) == "fails"
    assert ablation.no_better_verdict(math.nan, 1.0) == "not comparable"
    assert ablation.no_better_verdict(2.0, math.nan) == "inconclusive"


def test_join_renames_reuses_and_checks(frame):
    extra = _rows({("A", "Z"): [0.9, 0.9], ("B", "Z"): [0.9, 0.9]})
    out = ablation.join(frame, {"Dense": "dense!", "X": "spade"}, extra)
    assert set(out["variant"]) == {"dense!", "spade", "Z"}
    assert set(out["sample"]) == {0, 1}                      # the samples every table has
    assert len(out) == 2 * 2 * 3
    own = ablation.join(frame, {"Dense": "D"}, extra, common=False)
    assert set(own.loc[own["variant"] == "D", "sample"]) == {0, 1, 2, 3}
    assert set(own.loc[own["variant"] == "Z", "sample"]) == {0, 1}
    with pytest.raises(ValueError, match=r"variants \['nope'\] are not in the base table"):
        ablation.join(frame, {"nope": "N"})
    with pytest.raises(ValueError, match="repeat"):
        ablation.join(frame, {"Dense": "Z"}, extra)
    with pytest.raises(ValueError, match=r"samples \[4, 5, 6, 7\] have no base rows"):
        ablation.join(frame, {"Dense": "D"}, _rows({("A", "Z"): [0.1] * 8}))


def test_paper_beside(frame):
    table = ablation.paper_beside(frame, {"Dense": (90.1, 77.6), "X": (95.6, 86.2),
                                          "Q": (1.0, 1.0)})
    assert list(table.columns) == ["Dense", "X"] and list(table.index) == ["paper", "here"]
    assert table.loc["paper", "X"] == "95.6/86"
    assert table.loc["here", "X"] == ablation.cell_table(frame, ["X"]).loc["Average", "X"]


def test_blocks_of_the_resnet_from_the_output_back():
    model = build_model("resnet18", 10, 8, 32)
    assert ablation.blocks(model) == {"fc": "fc", "last stage": "layers.3",
                                      "stage 3": "layers.2", "stage 2": "layers.1",
                                      "first stage": "layers.0"}
    assert ablation.last_stage(model) == "layers.3"
    assert ablation.paper_blocks(model) == ablation.PAPER["D.13"]
    three = build_model("resnet20", 10, 8, 32)                # three stages: no middle match
    assert list(ablation.blocks(three)) == ["fc", "last stage", "stage 2", "first stage"]
    assert list(ablation.paper_blocks(three)) == ["Dense", "fc", "last stage", "first stage"]
    variants = ablation.block_variants(model)
    targets = schedules.resolve_sparsity(model, variants["stage 2"].sparsity)
    assert {n for n, s in targets.items() if s > 0} == set(search.layer_groups(model)["layers.1"])
    assert all(s in (0.0, 0.99) for s in targets.values())
    sweep = ablation.last_stage_variants(model)
    assert list(sweep) == [f"last stage {s:g}" for s in ablation.LAST_STAGE_SPARSITIES[1:]]
    assert schedules.resolve_sparsity(model, sweep["last stage 0.995"].sparsity)["fc"] == 0.0


def test_recipe_and_count_variants_leave_out_chapter_bs_own():
    cfg = config.load("smoke")                                # default recipe, 16 views
    recipes = ablation.recipe_variants(cfg)
    assert "J+RC" not in recipes and list(recipes) == ["J+G+RC", "RR", "G+RC", "RR+RC", "G"]
    assert recipes["RR"].recipe == "RR" and recipes["RR"].sparsity == cfg.sparsity
    counts = ablation.count_variants(cfg, [8, 16, 32])
    assert list(counts) == ["n=8", "n=32"] and counts["n=8"].n_augmentations == 8
    sources = ablation.source_variants(cfg, images=64)
    assert list(sources) == ["IST", "ISC", "MST", "MSC", "MSD"]
    assert sources["MSC"].images == 64 and sources["IST"].source == "IST"


def test_search_gain_and_late_share():
    history = pd.DataFrame({
        "step": [0, 0, 1, 1, 2, 2], "group": ["fc", "fc", "l1", "l1", "l0", "l0"],
        "value": [0.0, 0.5, 0.0, 0.5, 0.0, 0.5], "score": [0.6, 0.7, 0.7, 0.9, 0.9, 0.8]})
    gain = ablation.search_gain(history, ["l0", "l1", "fc"])
    assert gain["group"].tolist() == ["fc", "l1", "l0"]
    assert gain["order"].tolist() == [1.0, 0.5, 0.0]
    assert gain["chosen"].tolist() == [0.5, 0.5, 0.0]
    assert gain["gain"].tolist() == pytest.approx([0.1, 0.2, 0.0])
    assert gain["share"].sum() == pytest.approx(1.0)
    share, verdict = ablation.late_share(gain, ["l0", "l1", "fc"])
    assert share == pytest.approx(1.0) and verdict == "holds"
    share, verdict = ablation.late_share(gain, ["l0", "l1", "fc"], last=1)
    assert share == pytest.approx(1 / 3) and verdict == "fails"
    none = ablation.search_gain(history.assign(score=0.5), ["l0", "l1", "fc"])
    assert ablation.late_share(none, ["l0", "l1", "fc"])[1] == "not comparable"


def test_methods_above(frame):
    # X - Dense: A +0.125 +- 0.085, B +0.175 +- 0.095 (paired per sample): both above
    assert ablation.methods_above(frame, "X") == (2, 2)
    # Y - Dense: A exactly 0, B +0.005 +- 0.0029: one method
    assert ablation.methods_above(frame, "Y") == (1, 2)
