"""How the ``cpu`` preset was chosen: the calibration record, its targets and verdicts.

``scripts/calibrate.py`` trains a variant of a preset and appends one row to
``params/PRESET-calibration.csv`` (:func:`record_row` builds it): the training keys that were
varied (:data:`KEYS`), ``train_seconds``, ``clean_accuracy`` and one ``attack_<rule>`` column per
rule (%), and the dense Trojan AUC of every method (``auc_abs_<method>``, ``auc_sum_<method>``,
``auc_abs_mean``, in %, with its standard error :data:`SE_COLUMN`) on the preset's evaluation
samples. Only dense numbers are recorded, so no choice made from the record can be tuned on SPADE.
A row whose keys repeat an earlier row's re-measures that variant (:func:`remeasured`).

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

__all__ = ["KEYS", "SE_COLUMN", "TARGETS", "Target", "chosen", "levers", "load", "record_row",
           "reference_auc", "reference_sentence", "remeasured", "summary", "table",
           "targets_markdown", "verdicts"]

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

SE_COLUMN = "se_auc_abs_mean"
"""The record's column with the standard error (AUC points) of ``auc_abs_mean``: over samples, of
each sample's mean over methods. Rows recorded before it existed hold NaN."""


def targets_markdown(targets: Sequence[Target] = TARGETS) -> str:
    """The targets as a Markdown list, one ``* ...;`` item each, the last ending in a period."""
    items = [f"* {t.describe()};" for t in targets]
    items[-1] = items[-1][:-1] + "."
    return "\n".join(items)


def load(path: str | Path | None = None, preset: str = "cpu") -> pd.DataFrame:
    """A calibration record, default ``params/PRESET-calibration.csv``, one row per variant."""
    record = pd.read_csv(PARAMS_DIR / f"{preset}-calibration.csv" if path is None else path)
    if SE_COLUMN not in record.columns:
        record[SE_COLUMN] = float("nan")
    return record


def reference_auc(preset: str = "plain") -> tuple[float, float]:
    """``(mean, standard error)`` of the dense AUC (absolute channel sum, in %) of the last row of
    ``params/PRESET-calibration.csv``: the reference point a benchmark is compared with (the plain
    Fashion-MNIST preset, where the patch is the only colour in the image)."""
    row = load(preset=preset).iloc[-1]
    return float(row["auc_abs_mean"]), float(row[SE_COLUMN])


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
    if SE_COLUMN not in record.columns:
        record = record.assign(**{SE_COLUMN: float("nan")})
    shown = record[["note", *KEYS, "train_seconds", "clean_accuracy", *attack, "auc_abs_mean",
                    SE_COLUMN, *per_method]].copy()
    shown["train (min)"] = (shown.pop("train_seconds") / 60).round(1)
    shown = pd.concat([shown, verdicts(record).map(lambda ok: "yes" if ok else "NO")], axis=1)
    shown["is the cpu preset"] = [("re-measured" if again else "yes") if c else "" for c, again
                                  in zip(chosen(record, cfg), remeasured(record), strict=True)]
    shown = shown.rename(columns={SE_COLUMN: "dense AUC mean: SE"}).rename(
        columns=lambda c: c.replace("attack_", "attack ").replace("auc_abs_", "dense AUC "))
    shown.index = [f"variant {i + 1}" for i in range(len(shown))]
    return shown


def remeasured(record: pd.DataFrame) -> list[bool]:
    """Per row, whether its :data:`KEYS` repeat an earlier row's: the same variant measured again
    (e.g. on the model as the book trains it now), not a new variant."""
    seen: set[tuple] = set()
    out = []
    for _, row in record.iterrows():
        key = tuple(row[k] for k in KEYS)
        out.append(key in seen)
        seen.add(key)
    return out


def _pairs(record: pd.DataFrame, changed: set[str]) -> list[tuple[int, int]]:
    """Pairs ``(i, j)``, ``i`` the row with the smaller value of the first changed key, of
    variants whose :data:`KEYS` differ exactly in ``changed`` (re-measured rows left out)."""
    out = []
    first = sorted(changed, key=KEYS.index)[0]
    again = remeasured(record)
    rows = [i for i in range(len(record)) if not again[i]]
    for i in rows:
        for j in (j for j in rows if j > i):
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


def _why_missed(record: pd.DataFrame, row: pd.Series, k: int, se: float | None) -> str:
    """The record's account of why no variant met all targets (the chosen one is row ``k``)."""
    attack_target, auc_target = TARGETS[1], TARGETS[2]
    record = record[[not again for again in remeasured(record)]]  # the variants tried
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
        f"{row['auc_abs_mean'] - auc_target.high:.1f} points above the bound"
        + ("." if se is None else
           f", {(row['auc_abs_mean'] - auc_target.high) / se:.1f} standard errors of a "
           f"{int(row['samples'])}-sample mean of the dense AUC ({se:.2f} points on the cpu "
           f"model)."))


def _remeasure_sentence(record: pd.DataFrame, rows: Sequence[int]) -> str:
    if not rows:
        return ""
    j = rows[-1]
    row = record.iloc[j]
    attack = row[_attack(record)]
    return (f" Variant {j + 1} is the same configuration measured again on the model as this "
            f"book trains it now (its note says how): clean accuracy {row['clean_accuracy']:.1f}%, "
            f"attack success {attack.min():.1f}-{attack.max():.1f}%, dense AUC "
            f"{row['auc_abs_mean']:.1f} +- {row[SE_COLUMN]:.2f}, "
            f"{row['train_seconds'] / 60:.1f} min of training" + _met(record, j) + ".")


def _met(record: pd.DataFrame, j: int) -> str:
    ok = verdicts(record).iloc[j]
    met, missed = list(ok[ok].index), list(ok[~ok].index)
    return "".join(f"; it {word}: {', '.join(names)}" for word, names
                   in (("meets", met), ("misses", missed)) if names)


def reference_sentence(record: pd.DataFrame, cfg: Config, reference: str = "plain") -> str:
    """The Markdown sentences comparing the dense AUC of the ``reference`` preset's record with
    the latest measurement of the preset ``cfg`` in ``record`` (difference read at one standard
    error of the difference)."""
    ref, ref_se = reference_auc(reference)
    rows = record[chosen(record, cfg)]
    own, own_se = float(rows["auc_abs_mean"].iloc[-1]), float(rows[SE_COLUMN].iloc[-1])
    diff, se = ref - own, math.hypot(ref_se, own_se)
    text = (f"On plain Fashion-MNIST with a coloured patch (the `{reference}` preset: gray items "
            f"on black, the patch the only colour in the image) the dense mean AUC is "
            f"{ref:.1f} +- {ref_se:.1f} (`params/{reference}-calibration.csv`); on the "
            f"`{cfg.name}` model it is {own:.1f} +- {own_se:.1f}. ")
    if diff > se:
        return text + (f"Dense maps find the patch better on the plain images ({diff:+.1f} "
                       f"points), which leaves SPADE less room there.")
    where = ("The two are within one standard error of each other" if abs(diff) <= se
             else "It is lower on the plain images")
    return text + (f"{where} ({diff:+.1f} points): the plain images do not leave dense maps less "
                   f"room, so room for SPADE is not why photos are used.")


def summary(record: pd.DataFrame, cfg: Config, se: float | None = None) -> str | None:
    """The Markdown sentence on the variant that is the preset ``cfg``: its numbers and the
    targets it meets or misses (with the record's account of why); None if no variant is it.

    ``se``: the standard error (AUC points) of the dense AUC mean the miss is read against;
    default: the latest :data:`SE_COLUMN` value recorded for the preset's keys (omitted if none).
    Rows that re-measure the preset (:func:`remeasured`) are reported after it.
    """
    if SE_COLUMN not in record.columns:
        record = record.assign(**{SE_COLUMN: float("nan")})
    picks, again = chosen(record, cfg), remeasured(record)
    if not any(picks):
        return None
    k = picks.index(True)
    later = [j for j in range(len(record)) if picks[j] and again[j]]
    if se is None:
        known = record[SE_COLUMN][[j for j in range(len(record)) if picks[j]]].dropna()
        se = float(known.iloc[-1]) if len(known) else None
    missed = [name for name, ok in verdicts(record).iloc[k].items() if not ok]
    row = record.iloc[k]
    attack = row[_attack(record)]
    head = (f"The `cpu` preset is variant {k + 1}: clean accuracy {row['clean_accuracy']:.1f}%, "
            f"attack success {attack.min():.1f}-{attack.max():.1f}%, dense AUC "
            f"{row['auc_abs_mean']:.1f}, {row['train_seconds'] / 60:.1f} min of training. ")
    if not missed:
        return head + "It meets all four targets." + _remeasure_sentence(record, later)
    return (head + f"**It misses: {', '.join(missed)}.** " + _why_missed(record, row, k, se)
            + _remeasure_sentence(record, later))


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
    per_sample = dense.groupby("sample")["auc_abs"].mean()
    row[SE_COLUMN] = round(100 * float(per_sample.std(ddof=1)) / len(per_sample) ** 0.5, 2)
    row["dense_eval_seconds"] = round(dense_seconds, 1)
    return row
