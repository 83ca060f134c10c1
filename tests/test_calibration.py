"""Tests for spade_lib.calibration: the targets, verdicts, table and sentence of chapter C."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from spade_lib import calibration, config


@pytest.fixture(scope="module")
def record() -> pd.DataFrame:
    return calibration.load()


def _row(**changes: object) -> dict:
    base = {"variant": "v", "note": "", "scene": "photo", "arch": "resnet18", "width": 16,
            "epochs": 8, "lr": 0.05, "lr_step": 6, "trojan_fraction": 0.05, "patch_alpha": 0.8,
            "random_shift": 0, "train_seconds": 900.0, "clean_accuracy": 70.0,
            "attack_a": 85.0, "attack_b": 99.0, "auc_abs_mean": 92.0}
    return {**base, **changes}


def test_verdicts_bounds_are_inclusive() -> None:
    frame = pd.DataFrame([_row(), _row(train_seconds=900.1), _row(clean_accuracy=69.99),
                          _row(attack_b=84.9), _row(auc_abs_mean=79.9), _row(auc_abs_mean=92.01)])
    got = calibration.verdicts(frame)
    assert list(got.columns) == ["clean >= 70", "attack >= 85", "AUC in [80, 92]",
                                 "train <= 15 min"]
    assert got.iloc[0].all()
    assert [list(got.iloc[i][~got.iloc[i]].index) for i in range(1, 6)] == [
        ["train <= 15 min"], ["clean >= 70"], ["attack >= 85"], ["AUC in [80, 92]"],
        ["AUC in [80, 92]"]]


def test_the_record_s_verdicts(record: pd.DataFrame) -> None:
    got = calibration.verdicts(record)
    assert not got.all(axis=1).any(), "no variant met all four"
    cpu = config.load("cpu")
    assert calibration.chosen(record, cpu).index(True) == 4
    assert list(got.iloc[4][~got.iloc[4]].index) == ["AUC in [80, 92]"]


def test_table_marks_the_preset(record: pd.DataFrame) -> None:
    shown = calibration.table(record, config.load("cpu"))
    assert list(shown.index) == [f"variant {i + 1}" for i in range(len(record))]
    assert shown["is the cpu preset"].tolist().count("yes") == 1
    assert shown.loc["variant 5", "AUC in [80, 92]"] == "NO"
    assert shown.loc["variant 5", "train (min)"] == round(record["train_seconds"][4] / 60, 1)
    assert "dense AUC mean" in shown.columns and "attack star: T-shirt->Sandal" in shown.columns


def test_summary_is_computed_from_the_record(record: pd.DataFrame) -> None:
    text = calibration.summary(record, config.load("cpu"))
    assert text.startswith("The `cpu` preset is variant 5: clean accuracy 83.0%, attack success "
                           "87.3-95.3%, dense AUC 92.6, 13.3 min of training. **It misses: AUC "
                           "in [80, 92].**")
    for part in ("a dense AUC of at least 92.6", "every variant under 92 leaves a rule under 85%",
                 "about +1 AUC and +14 points", "two epochs: +0.7 to +0.8 AUC and +2 to +9",
                 "opaque: +2.1 AUC, +8 attack", "still rose to 93.8", "Variant 5 is the closest",
                 "0.6 points above the bound"):
        assert part in text, part
    # the standard error the distance is read against comes from the record, else is left out
    with_se = record.copy()
    with_se[calibration.SE_COLUMN] = float("nan")
    assert "0.6 points above the bound." in calibration.summary(with_se, config.load("cpu"))
    with_se.loc[4, calibration.SE_COLUMN] = 0.3
    assert ("0.6 points above the bound, 2.0 standard errors of a 100-sample mean of the dense "
            "AUC (0.30 points on the cpu model)") in calibration.summary(with_se,
                                                                         config.load("cpu"))
    # another record, other numbers: a higher AUC of variant 5 moves the distance to the bound
    shifted = record.copy()
    shifted.loc[4, "auc_abs_mean"] = 93.0
    assert "1.0 points above the bound" in calibration.summary(shifted, config.load("cpu"))
    met = record.copy()
    met.loc[4, "auc_abs_mean"] = 91.0
    assert "It meets all four targets." in calibration.summary(met, config.load("cpu"))
    other = dataclasses.replace(config.load("cpu"), epochs=99)
    assert calibration.summary(record, other) is None


def test_levers(record: pd.DataFrame) -> None:
    got = calibration.levers(record)
    assert got["share"] == [pytest.approx((1.0, 13.63))]
    assert got["epochs"] == [pytest.approx((0.71, 2.0)), pytest.approx((0.82, 9.23))]
    assert got["opacity"] == [pytest.approx((2.11, 7.68))]


def test_targets_markdown() -> None:
    text = calibration.targets_markdown()
    assert text.splitlines() == [
        "* clean accuracy at least 70%;", "* every rule's attack success at least 85%;",
        "* a dense mean AUC (absolute channel sum) over the preset's five methods between 80 and "
        "92, the paper's dense range;",
        "* training within 15 minutes on the 2-core machine that builds this book."]


def test_record_row_has_the_csv_schema(record: pd.DataFrame) -> None:
    cfg = config.load("cpu")
    methods = [c[len("auc_abs_"):] for c in record.columns
               if c.startswith("auc_abs_") and c != "auc_abs_mean"]
    dense = pd.DataFrame([{"sample": s, "method": m, "auc_abs": 0.5 + 0.1 * s, "auc_sum": 0.25}
                          for s in range(3) for m in methods])
    attack = {c[len("attack_"):]: 0.9 for c in record.columns if c.startswith("attack_")}
    row = calibration.record_row(cfg, {"epochs": 6}, "why", 640.123, 0.8095, attack, dense, 31.94)
    assert set(row) == set(record.columns)
    assert row["variant"] == "epochs=6" and row["train_seconds"] == 640.1
    assert row["clean_accuracy"] == 80.95 and row["samples"] == 3
    assert row["auc_abs_mean"] == 60.0 and row["dense_eval_seconds"] == 31.9
    # per-sample means 0.5, 0.6, 0.7 (%: 50, 60, 70): SE = 10 / sqrt(3)
    assert row[calibration.SE_COLUMN] == round(10 / 3 ** 0.5, 2)


def test_a_remeasured_preset_is_reported_after_it_and_not_a_lever(record: pd.DataFrame) -> None:
    cpu = config.load("cpu")
    k = calibration.chosen(record, cpu).index(True)
    again = record.iloc[[k]].assign(note="pinned", clean_accuracy=83.7, auc_abs_mean=91.5,
                                    **{calibration.SE_COLUMN: 0.5})
    grown = pd.concat([record, again], ignore_index=True)
    assert calibration.remeasured(grown) == calibration.remeasured(record) + [True]
    assert calibration.levers(grown) == calibration.levers(record)
    text = calibration.summary(grown, cpu)
    assert text.startswith(f"The `cpu` preset is variant {k + 1}: clean accuracy")
    attack = again[[c for c in record if c.startswith("attack_")]].iloc[0]
    assert text.endswith(f" Variant {len(grown)} is the same configuration measured again on the "
                         "model as this book trains it now (its note says how): clean accuracy "
                         "83.7%, "
                         f"attack success {attack.min():.1f}-{attack.max():.1f}%, dense AUC "
                         f"91.5 +- 0.50, {again['train_seconds'].iloc[0] / 60:.1f} min of "
                         "training; it meets: clean >= 70, attack >= 85, AUC in [80, 92], "
                         "train <= 15 min.")
    shown = calibration.table(grown, cpu)["is the cpu preset"]
    assert shown.tolist().count("yes") == 1 and shown.iloc[-1] == "re-measured"
    assert "(0.50 points on the cpu model)" in text


def test_reference_auc_reads_the_plain_record() -> None:
    plain = calibration.load(preset="plain")
    mean, se = calibration.reference_auc("plain")
    assert mean == plain["auc_abs_mean"].iloc[-1] and 0 < se < 5


def test_reference_sentence_reads_the_difference_at_one_standard_error() -> None:
    cpu = config.load("cpu")
    plain, plain_se = calibration.reference_auc("plain")
    record = calibration.load()
    k = calibration.chosen(record, cpu).index(True)
    row = record.iloc[[k]]

    def sentence(auc: float, se: float) -> str:
        again = row.assign(auc_abs_mean=auc, **{calibration.SE_COLUMN: se})
        return calibration.reference_sentence(pd.concat([record, again]), cpu)

    text = sentence(plain - 10, 0.5)
    assert f"the dense mean AUC is {plain:.1f} +- {plain_se:.1f}" in text
    assert f"it is {plain - 10:.1f} +- 0.5" in text and "less room there" in text
    assert "within one standard error" in sentence(plain, 0.5)
    assert "lower on the plain images (-10.0 points)" in sentence(plain + 10, 0.5)
