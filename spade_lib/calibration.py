"""How the ``cpu`` preset was chosen: the calibration record, its targets and verdicts.

``scripts/calibrate.py`` trains a variant of a preset and appends one row to
``params/PRESET-calibration.csv`` (:func:`record_row` builds it): the training keys that were
varied (:data:`KEYS`), ``train_seconds``, ``clean_accuracy`` and one ``attack_<rule>`` column per
rule (%), and the dense Trojan AUC of every method (``auc_abs_<method>``, ``auc_sum_<method>``,
``auc_abs_mean``, in %) on the preset's evaluation samples. Only dense numbers are recorded, so
no choice made from the record can be tuned on SPADE.

The variants are judged against :data:`TARGETS` (:func:`verdicts`); :func:`table` is the chapter
C table of every variant and :func:`summary` the sentence on the chosen one, both computed from
the record.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from spade_lib.config import PARAMS_DIR, Config

__all__ = ["CPU_DENSE_AUC_SE", "KEYS", "TARGETS", "Target", "chosen", "levers", "load",
           "record_row", "summary", "table", "targets_markdown", "verdicts"]

KEYS = ("scene", "arch", "width", "epochs", "lr", "lr_step", "trojan_fraction", "patch_alpha",
        "random_shift")
"""The config keys a variant may change; a row is the preset when all of them match it."""


@dataclass(frozen=True)
class Target:
    """One calibration target: ``low <= measure <= high`` (None: unbounded).

    Attributes
    ----------
    label
        The verdict's column name in :func:`table`.
    measure
        What is compared: a column of the record, or ``"weakest_attack"`` (the lowest
        ``attack_*`` column of a row).
    text
        The target in words, a template filled with ``low``, ``high`` and ``high_minutes``.
    low, high
        Bounds, inclusive, in the measure's units (% or seconds).
    """

    label: str
    measure: str
    text: str
    low: float | None = None
    high: float | None = None

    def describe(self) -> str:
        """The target in words, its bounds filled in."""
        minutes = None if self.high is None else self.high / 60
        return self.text.format(low=self.low, high=self.high, high_minutes=minutes)


TARGETS: tuple[Target, ...] = (
    Target("clean >= 70", "clean_accuracy", "clean accuracy at least {low:g}%", low=70.0),
    Target("attack >= 85", "weakest_attack", "every rule's attack success at least {low:g}%",
           low=85.0),
    Target("AUC in [80, 92]", "auc_abs_mean",
           "a dense mean AUC (absolute channel sum) over the preset's five methods between "
           "{low:g} and {high:g}, the paper's dense range", low=80.0, high=92.0),
    Target("train <= 15 min", "train_seconds",
           "training within {high_minutes:g} minutes on the 2-core machine that builds this book",
           high=15 * 60.0),
)
"""The four targets the ``cpu`` preset was calibrated against: clean accuracy at least 70%, every
rule's attack success at least 85%, a dense mean AUC (absolute channel sum) over the preset's five
methods in the paper's dense range 80-92, and training within 15 minutes on the book's 2-core
machine."""

CPU_DENSE_AUC_SE = 0.47
"""Standard error (AUC points) of a 100-sample mean of the dense AUC on the ``cpu`` model (chapter
B's dense rows when the record was judged); the record itself holds means only."""


def targets_markdown(targets: Sequence[Target] = TARGETS) -> str:
    """The targets as a Markdown list, one ``* ...;`` item each, the last ending in a period."""
    items = [f"* {t.describe()};" for t in targets]
    items[-1] = items[-1][:-1] + "."
    return "\n".join(items)


def load(path: str | Path | None = None) -> pd.DataFrame:
    """The calibration record, default ``params/cpu-calibration.csv``, one row per variant."""
    return pd.read_csv(PARAMS_DIR / "cpu-calibration.csv" if path is None else path)


def _attack(record: pd.DataFrame) -> list[str]:
    return [c for c in record.columns if c.startswith("attack_")]


def _measure(record: pd.DataFrame, target: Target) -> pd.Series:
    if target.measure == "weakest_attack":
        return record[_attack(record)].min(axis=1)
    return record[target.measure]


def verdicts(record: pd.DataFrame, targets: Sequence[Target] = TARGETS) -> pd.DataFrame:
    """Whether each variant (row) meets each target: bool, one column per target label."""
    out = {}
    for target in targets:
        value = _measure(record, target)
        ok = pd.Series(True, index=record.index)
        if target.low is not None:
            ok &= value >= target.low
        if target.high is not None:
            ok &= value <= target.high
        out[target.label] = ok
    return pd.DataFrame(out)


def chosen(record: pd.DataFrame, cfg: Config) -> list[bool]:
    """Per variant, whether its :data:`KEYS` all equal ``cfg``'s (it is that preset)."""
    return [all(row[k] == getattr(cfg, k) for k in KEYS) for _, row in record.iterrows()]


def table(record: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """Every variant as a row ``variant 1..n``: note, keys, measures, verdicts ("yes"/"NO") and
    whether it is the preset ``cfg``."""
    attack = _attack(record)
    per_method = [c for c in record.columns if c.startswith("auc_abs_") and c != "auc_abs_mean"]
    shown = record[["note", *KEYS, "train_seconds", "clean_accuracy", *attack, "auc_abs_mean",
                    *per_method]].copy()
    shown["train (min)"] = (shown.pop("train_seconds") / 60).round(1)
    shown = pd.concat([shown, verdicts(record).map(lambda ok: "yes" if ok else "NO")], axis=1)
    shown["is the cpu preset"] = ["yes" if c else "" for c in chosen(record, cfg)]
    shown = shown.rename(columns=lambda c: c.replace("attack_", "attack ").replace("auc_abs_",
                                                                                   "dense AUC "))
    shown.index = [f"variant {i + 1}" for i in range(len(shown))]
    return shown


def _pairs(record: pd.DataFrame, changed: set[str]) -> list[tuple[int, int]]:
    """Pairs ``(i, j)``, ``i`` the row with the smaller value of the first changed key, of
    variants whose :data:`KEYS` differ exactly in ``changed``."""
    out = []
    first = sorted(changed, key=KEYS.index)[0]
    for i in range(len(record)):
        for j in range(i + 1, len(record)):
            differ = {k for k in KEYS if record.iloc[i][k] != record.iloc[j][k]}
            if differ == changed:
                a, b = (i, j) if record.iloc[i][first] < record.iloc[j][first] else (j, i)
                out.append((a, b))
    return out


def levers(record: pd.DataFrame) -> dict[str, list[tuple[float, float]]]:
    """What each lever did, from the variants that changed it alone: ``(AUC change, weakest-rule
    attack change)`` per pair, in points, from the lower to the higher setting.

    Keys: ``"share"`` (``trojan_fraction``; changes per doubling), ``"epochs"`` (``epochs`` with
    ``lr_step``) and ``"opacity"`` (``patch_alpha``).
    """
    weakest = record[_attack(record)].min(axis=1)
    auc = record["auc_abs_mean"]
    out: dict[str, list[tuple[float, float]]] = {}
    for name, changed in (("share", {"trojan_fraction"}), ("epochs", {"epochs", "lr_step"}),
                          ("opacity", {"patch_alpha"})):
        effects = []
        for a, b in _pairs(record, changed):
            per = (math.log2(record.iloc[b]["trojan_fraction"] / record.iloc[a]["trojan_fraction"])
                   if name == "share" else 1.0)
            effects.append(((auc.iloc[b] - auc.iloc[a]) / per,
                            (weakest.iloc[b] - weakest.iloc[a]) / per))
        out[name] = effects
    return out


def _span(values: Sequence[float], digits: int) -> str:
    low, high = f"{min(values):+.{digits}f}", f"{max(values):+.{digits}f}"
    return low if low == high else f"{low} to {high}"


def _why_missed(record: pd.DataFrame, row: pd.Series, k: int, se: float) -> str:
    """The record's account of why no variant met all targets (the chosen one is row ``k``)."""
    attack_target, auc_target = TARGETS[1], TARGETS[2]
    weakest = record[_attack(record)].min(axis=1)
    auc = record["auc_abs_mean"]
    lever = levers(record)
    share, epochs, opacity = lever["share"][0], lever["epochs"], lever["opacity"][0]
    fainter = (record["patch_alpha"] < record.iloc[k]["patch_alpha"]) & (
        record["trojan_fraction"] > record.iloc[k]["trojan_fraction"])
    return (
        f"No variant met all four, and the record shows why: every variant that met the attack "
        f"target has a dense AUC of at least {auc[weakest >= attack_target.low].min():.1f}, and "
        f"every variant under {auc_target.high:g} leaves a rule under {attack_target.low:g}% "
        f"attack. Three levers were tried, and each moved the two together: the Trojan share "
        f"(about {share[0]:+.0f} AUC and {share[1]:+.0f} points of weakest-rule attack per "
        f"doubling), training length (two epochs: {_span([e[0] for e in epochs], 1)} AUC and "
        f"{_span([e[1] for e in epochs], 0)} attack) and the icon's opacity (opaque: "
        f"{opacity[0]:+.1f} AUC, {opacity[1]:+.0f} attack; a fainter icon with a larger share "
        f"still rose to {auc[fainter].max():.1f}). A dense map finds the patch as well as the "
        f"network relies on it, and attack success measures that reliance. Variant {k + 1} is the "
        f"closest: it meets the other three, and its dense AUC is "
        f"{row['auc_abs_mean'] - auc_target.high:.1f} points above the bound, little more than "
        f"one standard error of a 100-sample mean of the dense AUC ({se:.2f} points on the cpu "
        f"model).")


def summary(record: pd.DataFrame, cfg: Config, se: float = CPU_DENSE_AUC_SE) -> str | None:
    """The Markdown sentence on the variant that is the preset ``cfg``: its numbers and the
    targets it meets or misses (with the record's account of why); None if no variant is it.

    ``se``: the standard error of the dense AUC mean the miss is read against (AUC points).
    """
    picks = chosen(record, cfg)
    if not any(picks):
        return None
    k = picks.index(True)
    missed = [name for name, ok in verdicts(record).iloc[k].items() if not ok]
    row = record.iloc[k]
    attack = row[_attack(record)]
    head = (f"The `cpu` preset is variant {k + 1}: clean accuracy {row['clean_accuracy']:.1f}%, "
            f"attack success {attack.min():.1f}-{attack.max():.1f}%, dense AUC "
            f"{row['auc_abs_mean']:.1f}, {row['train_seconds'] / 60:.1f} min of training. ")
    if not missed:
        return head + "It meets all four targets."
    return head + f"**It misses: {', '.join(missed)}.** " + _why_missed(record, row, k, se)


def record_row(cfg: Config, overrides: Mapping[str, Any], note: str, train_seconds: float,
               clean_accuracy: float, attack_success: Mapping[str, float],
               dense: pd.DataFrame, dense_seconds: float) -> dict[str, Any]:
    """One row of the record for a trained variant (what ``scripts/calibrate.py`` appends).

    Parameters
    ----------
    cfg, overrides, note
        The variant's config, the keys set on the preset, and why it was tried.
    train_seconds, clean_accuracy, attack_success
        From the training (accuracies as fractions in [0, 1], per rule name).
    dense
        The dense rows of :func:`spade_lib.results.evaluate` (``sample``, ``method``,
        ``auc_abs``, ``auc_sum``), and ``dense_seconds`` the time they took.
    """
    row: dict[str, Any] = {
        "variant": ", ".join(f"{k}={v}" for k, v in overrides.items()) or "preset as is",
        "note": note,
        **{k: getattr(cfg, k) for k in KEYS},
        "train_seconds": round(train_seconds, 1),
        "clean_accuracy": round(100 * clean_accuracy, 2),
    }
    for rule, acc in attack_success.items():
        row[f"attack_{rule}"] = round(100 * acc, 2)
    row["samples"] = dense["sample"].nunique()
    for method, rows in dense.groupby("method", sort=False):
        row[f"auc_abs_{method}"] = round(100 * rows["auc_abs"].mean(), 2)
        row[f"auc_sum_{method}"] = round(100 * rows["auc_sum"].mean(), 2)
    row["auc_abs_mean"] = round(100 * dense.groupby("method")["auc_abs"].mean().mean(), 2)
    row["dense_eval_seconds"] = round(dense_seconds, 1)
    return row
