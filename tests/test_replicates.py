"""The replicate record: Table B.2's average row per seed / image size, and its layout."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from spade_lib import config, replicates, tables


def _results(gain: float = 0.1, linear_gain: float = -0.05) -> pd.DataFrame:
    """Four samples, two methods; SPADE adds ``gain`` to every AUC (both aggregations) except
    on sample 3, where its copy loses the prediction and its AUC drops by 0.2."""
    rng = np.random.default_rng(0)
    rows = []
    for method in ("A", "B"):
        base = rng.uniform(0.5, 0.7, size=4)
        for variant, shift in (("dense", 0.0), ("spade", gain), ("spade-linear", linear_gain)):
            for i in range(4):
                lost = variant == "spade" and i == 3
                auc = base[i] + (-0.2 if lost else shift)
                rows.append({"sample": i, "method": method, "variant": variant,
                             "auc_sum": auc, "auc_abs": auc, "pointing_sum": float(auc > 0.6),
                             "pointing_abs": float(auc > 0.6), "keeps_prediction": not lost})
    return pd.DataFrame(rows)


def test_average_row_is_table_b2s_average_and_its_kept_part() -> None:
    res = _results(gain=0.1)
    row = replicates.average_row(res, "spade")
    s = tables.summary(res, "spade").loc["Average"]
    assert row["auc_delta"] == pytest.approx(float(s["auc_delta"]))
    # per sample: +10 on three samples, -20 on the one SPADE loses
    assert row["auc_delta"] == pytest.approx((3 * 10 - 20) / 4)
    assert row["keeps_prediction"] == pytest.approx(75.0)
    assert row["n_kept"] == 3
    assert row["auc_delta_kept"] == pytest.approx(10.0)
    assert row["auc_se_kept"] == pytest.approx(0.0, abs=1e-9)


def test_replicate_row_and_store_replace_a_remeasured_replicate(tmp_path) -> None:
    cfg = config.load("smoke", seed=3)
    res = _results()
    row = replicates.replicate_row(cfg, {"seed": 3}, 0.8, {"a": 0.9, "b": 0.7}, res, 12.0, 3.0)
    assert row["replicate"] == "seed=3" and row["seed"] == 3
    assert row["clean_accuracy"] == pytest.approx(80.0)
    assert row["attack_success"] == pytest.approx(80.0)
    assert math.isnan(replicates.replicate_row(cfg, {}, 0.8, {}, res, 1.0, 1.0)["attack_success"])
    assert row["samples"] == 4 and row["methods"] == 2
    assert row["spade-linear:auc_delta"] == pytest.approx(-5.0)
    assert set(row) == set(replicates.COLUMNS)
    path = tmp_path / "rec.csv"
    replicates.store_row(row, path)
    replicates.store_row({**row, "clean_accuracy": 81.0}, path)
    replicates.store_row({**row, "replicate": "seed=4", "seed": 4}, path)
    record = replicates.load(path=path)
    assert list(record["replicate"]) == ["seed=3", "seed=4"]
    assert record.loc[0, "clean_accuracy"] == pytest.approx(81.0)
    assert replicates.load(path=tmp_path / "none.csv") is None
    with pytest.raises(ValueError, match=r"lack the variant\(s\) \['spade-linear'\]"):
        replicates.replicate_row(cfg, {}, 0.8, {}, res[res["variant"] != "spade-linear"],
                                 1.0, 1.0)


def _record() -> tuple[dict, pd.DataFrame]:
    cfg = config.load("smoke")
    this = replicates.replicate_row(cfg, {}, 0.8, {"a": 0.9}, _results(0.30), 1.0, 1.0)
    others = [replicates.replicate_row(cfg.replace(seed=s), {"seed": s}, 0.8, {"a": 0.9},
                                       _results(g), 1.0, 1.0)
              for s, g in ((1, 0.25), (2, 0.20))]
    big = replicates.replicate_row(cfg.replace(image_size=64), {"image_size": 64}, 0.8,
                                   {"a": 0.9}, _results(0.4), 1.0, 1.0)
    # not comparable: another sample count (seed table) / another seed and size (size table)
    fewer = replicates.replicate_row(cfg.replace(seed=3, samples=7), {"seed": 3}, 0.8,
                                     {"a": 0.9}, _results(0.9), 1.0, 1.0)
    both = replicates.replicate_row(cfg.replace(seed=4, image_size=48),
                                    {"seed": 4, "image_size": 48}, 0.8, {"a": 0.9},
                                    _results(0.9), 1.0, 1.0)
    return this, pd.DataFrame([*others, big, fewer, both])


def test_seed_table_adds_the_spread_over_comparable_seeds_only() -> None:
    this, record = _record()
    table = replicates.seed_table(record, this)
    assert list(table.index) == ["seed=0 (this build)", "seed=1", "seed=2",
                                 *replicates.SUMMARY_ROWS]
    assert table.attrs["other_setup"] == 1                   # seed=3 has 7 samples
    gains = np.array([(3 * g * 100 - 20) / 4 for g in (0.30, 0.25, 0.20)])
    assert table["AUC delta"].iloc[:3].to_numpy() == pytest.approx(gains)
    assert table.loc["mean over seeds", "AUC delta"] == pytest.approx(gains.mean())
    assert table.loc["sd over seeds", "AUC delta"] == pytest.approx(gains.std(ddof=1))
    assert table.loc["se over seeds", "AUC delta"] == pytest.approx(gains.std(ddof=1) / 3 ** .5)
    assert table.loc["seed=1", "n kept"] == 3 and table.loc["seed=1", "+- se (kept)"] == 0
    sentence = replicates.seed_sentence(table, "smoke")
    assert f"**{gains.mean():+.1f} +- {gains.std(ddof=1) / 3 ** .5:.1f}**" in sentence
    assert "positive beyond one standard error" in sentence
    assert f"other seed(s) alone the gain is {gains[1:].mean():+.1f}" in sentence
    alone = replicates.seed_table(None, this)
    assert list(alone.index) == ["seed=0 (this build)"]
    assert replicates.seed_sentence(alone, "smoke").startswith("Only this build's seed")
    assert "replicate.py smoke --seeds" in replicates.seed_sentence(alone, "smoke")


def test_a_seed_without_a_score_is_left_out_of_its_columns_statistics() -> None:
    this, record = _record()
    record.loc[record["replicate"] == "seed=2", "spade:auc_delta"] = math.nan
    table = replicates.seed_table(record, this)
    gains = np.array([(3 * g * 100 - 20) / 4 for g in (0.30, 0.25)])
    assert table.loc["mean over seeds", "AUC delta"] == pytest.approx(gains.mean())
    assert table.loc["se over seeds", "AUC delta"] == pytest.approx(gains.std(ddof=1) / 2 ** .5)
    assert replicates.seed_sentence(table, "smoke").startswith("Over 2 seeds")


def test_size_table_has_one_row_per_image_size_of_the_same_setup() -> None:
    this, record = _record()
    table = replicates.size_table(record, this)
    assert list(table.index) == [f"{this['image_size']} px", "64 px"]   # not the 48 px seed 4
    assert table.loc["64 px", "AUC delta"] == pytest.approx((3 * 40 - 20) / 4)
    assert replicates.label({"seed": 4, "image_size": 48}) == "image_size=48, seed=4"
    assert replicates.setup_digest(config.load("smoke", seed=5), "seed") == this["setup_seed"]


def test_size_sentence_judges_the_change_of_the_gain() -> None:
    this, record = _record()
    table = replicates.size_table(record, this)
    text = replicates.size_sentence(table)
    base, other = table.iloc[0], table.loc["64 px"]
    diff = other["AUC delta"] - base["AUC delta"]
    err = math.hypot(other["+- se"], base["+- se"])
    assert f"a change of {diff:+.1f} +- {err:.1f}" in text
    assert f"(the gain grows: {tables.claim_verdict(diff, err, 1.0)})" in text
    assert text.count("the gain grows:") == 2  # the preset's schedule and the linear one
    assert replicates.size_sentence(table.iloc[:1]).startswith("No replicate")
