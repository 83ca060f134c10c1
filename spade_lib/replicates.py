"""How robust is the main result? Table B.2's average row on other draws of the benchmark.

A model trained on one machine with one seed is one draw. ``scripts/replicate.py`` trains a
variant of a preset (another ``seed``, or another ``image_size``), explains its evaluation samples
dense and through SPADE with the preset's schedule and with the linear one, and writes one row to
``params/PRESET-replicates.csv`` (:func:`replicate_row` builds it): the overrides, the model's
clean accuracy and attack success, and for each SPADE variant the average over methods of Table
B.2 (AUC and Pointing Game, dense / variant / delta +- standard error), the share of samples on
which the pruned copy keeps the Trojan prediction, and the AUC delta on those samples only.

A ``seed`` draws the whole benchmark anew: the scenes, which training images carry a Trojan, the
weights' initialization, the batch order and the evaluation samples. The schedule stays the
preset's (searched once, on the held-out model of seed 0).

Chapter B reads the record (:func:`load`) and lays it out with the build's own model as the first
row (:func:`seed_table`, :func:`size_table`); :func:`seed_sentence` is the verdict across seeds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from spade_lib import tables
from spade_lib.config import PARAMS_DIR, Config

__all__ = ["COLUMNS", "VARIANTS", "average_row", "load", "record_path", "replicate_row",
           "seed_sentence", "seed_table", "size_sentence", "size_table", "store_row"]

VARIANTS = ("spade", "spade-linear")
"""The SPADE variants a replicate explains besides dense: the preset's schedule and the linear
one (names of :func:`spade_lib.results.main_variants`)."""

_PER_VARIANT = ("auc_dense", "auc", "auc_delta", "auc_se", "pointing_dense", "pointing",
                "pointing_delta", "pointing_se", "keeps_prediction", "auc_delta_kept",
                "auc_se_kept", "n_kept")

COLUMNS = ("replicate", "seed", "image_size", "setup_seed", "setup_size", "clean_accuracy",
           "attack_success", "samples", "methods",
           *(f"{v}:{c}" for v in VARIANTS for c in _PER_VARIANT), "train_seconds", "eval_seconds")
"""Columns of a replicate record; scores in %, ``{variant}:{column}`` per SPADE variant.
``setup_seed`` / ``setup_size`` are digests of the config without ``seed`` / ``image_size``: rows
are set side by side only when everything else was the same (:func:`setup_digest`)."""


def setup_digest(cfg: Config, varied: str) -> str:
    """Digest of every config key but ``varied`` (and the name, paths and device): two configs
    with equal digests differ at most in ``varied``."""
    keys = tuple(k for k in cfg.to_dict() if k != varied)
    return cfg.digest(keys)


def average_row(results: pd.DataFrame, variant: str) -> dict[str, float]:
    """The ``Average`` row of Table B.2 for ``variant`` against dense, with the samples where the
    variant's copy keeps the Trojan prediction: the keys of a record's per-variant columns."""
    s = tables.summary(results, variant).loc["Average"]
    kept_ids = tables.kept_samples(results, variant)
    if kept_ids:
        k = tables.summary(tables.on_kept(results, variant), variant).loc["Average"]
        kept_delta, kept_se = float(k["auc_delta"]), float(k["auc_se"])
    else:
        kept_delta = kept_se = math.nan
    return {"auc_dense": float(s["auc_dense"]), "auc": float(s[f"auc_{variant}"]),
            "auc_delta": float(s["auc_delta"]), "auc_se": float(s["auc_se"]),
            "pointing_dense": float(s["pointing_dense"]),
            "pointing": float(s[f"pointing_{variant}"]),
            "pointing_delta": float(s["pointing_delta"]), "pointing_se": float(s["pointing_se"]),
            "keeps_prediction": 100 * float(s["keeps_prediction"]),
            "auc_delta_kept": kept_delta, "auc_se_kept": kept_se, "n_kept": len(kept_ids)}


def replicate_row(cfg: Config, overrides: Mapping[str, Any], clean_accuracy: float,
                  attack_success: Mapping[str, float], results: pd.DataFrame,
                  train_seconds: float, eval_seconds: float) -> dict[str, Any]:
    """One record row for a trained replicate.

    Parameters
    ----------
    cfg, overrides
        The replicate's config and the keys set on the preset (``{"seed": 1}``).
    clean_accuracy, attack_success
        Fractions in [0, 1]; ``attack_success`` per rule (its mean is recorded).
    results
        Its rows from :func:`spade_lib.results.evaluate` with the variants ``dense`` and
        :data:`VARIANTS`.
    train_seconds, eval_seconds
        Wall-clock times of the training and of the evaluation.
    """
    missing = [v for v in ("dense", *VARIANTS) if v not in set(results["variant"])]
    if missing:
        raise ValueError(f"the results lack the variant(s) {missing}; a replicate explains "
                         f"dense and {list(VARIANTS)}")
    row: dict[str, Any] = {
        "replicate": label(overrides),
        "seed": cfg.seed, "image_size": cfg.image_size,
        "setup_seed": setup_digest(cfg, "seed"), "setup_size": setup_digest(cfg, "image_size"),
        "clean_accuracy": 100 * clean_accuracy,
        "attack_success": (100 * sum(attack_success.values()) / len(attack_success)
                           if attack_success else math.nan),
        "samples": results["sample"].nunique(), "methods": results["method"].nunique(),
    }
    for v in VARIANTS:
        row.update({f"{v}:{k}": value for k, value in average_row(results, v).items()})
    row["train_seconds"] = train_seconds
    row["eval_seconds"] = eval_seconds
    return row


def label(overrides: Mapping[str, Any]) -> str:
    """A replicate's name: its overrides as ``key=value``, sorted by key (``"preset as is"``
    for none)."""
    return ", ".join(f"{k}={overrides[k]}" for k in sorted(overrides)) or "preset as is"


def record_path(preset: str) -> Path:
    """``params/PRESET-replicates.csv``."""
    return PARAMS_DIR / f"{preset}-replicates.csv"


def load(preset: str = "cpu", path: str | Path | None = None) -> pd.DataFrame | None:
    """The replicate record of a preset (one row per replicate), ``None`` when none is saved."""
    path = Path(path) if path is not None else record_path(preset)
    if not path.exists():
        return None
    return pd.read_csv(path)


def store_row(row: Mapping[str, Any], path: str | Path) -> pd.DataFrame:
    """Write ``row`` into the record at ``path``, replacing a row of the same ``replicate``
    (a replicate measured again); returns the record."""
    from spade_lib.files import atomic_write

    path = Path(path)
    frame = pd.DataFrame([dict(row)], columns=list(COLUMNS))
    if path.exists():
        old = pd.read_csv(path)
        frame = pd.concat([old[old["replicate"] != row["replicate"]], frame], ignore_index=True)
    text = frame.to_csv(index=False).encode()
    atomic_write(path, lambda fh: fh.write(text))
    return frame


_LAYOUT = {"clean_accuracy": "clean %", "attack_success": "attack %", "samples": "n",
           "spade:auc_dense": "AUC dense", "spade:auc": "AUC SPADE",
           "spade:auc_delta": "AUC delta", "spade:auc_se": "+- se",
           "spade:pointing_delta": "PG delta", "spade:pointing_se": "PG +- se",
           "spade:keeps_prediction": "SPADE keeps %",
           "spade:auc_delta_kept": "AUC delta (kept)", "spade:auc_se_kept": "+- se (kept)",
           "spade:n_kept": "n kept",
           "spade-linear:auc_delta": "linear: AUC delta", "spade-linear:auc_se": "linear: +- se",
           "spade-linear:keeps_prediction": "linear keeps %"}
SUMMARY_ROWS = ("mean over seeds", "sd over seeds", "se over seeds")
"""The rows :func:`seed_table` adds below the seeds (statistics of the per-seed values)."""


def _side_by_side(rows: pd.DataFrame | None, this: Mapping[str, Any], index: list[str]
                  ) -> pd.DataFrame:
    frame = pd.DataFrame([dict(this), *([] if rows is None else rows.to_dict("records"))])
    frame.index = index
    return frame[list(_LAYOUT)].rename(columns=_LAYOUT).astype(float)


def seed_table(record: pd.DataFrame | None, this: Mapping[str, Any]) -> pd.DataFrame:
    """This build's row (``this``: a :func:`replicate_row` mapping, labelled ``seed=N (this
    build)``) and every recorded ``seed=N`` replicate made with the same setup but the seed
    (:func:`setup_digest`), then, with two or more seeds, the mean, standard deviation and
    standard error over seeds of each column (NaN seeds left out of that column); columns in
    the book's names. ``attrs["other_setup"]`` counts the seed rows left out for another setup.
    """
    seeds, other = None, 0
    if record is not None and len(record):
        is_seed = record["replicate"].astype(str).str.fullmatch(r"seed=\d+")
        same = record["setup_seed"] == this["setup_seed"]
        seeds = record[is_seed & same & (record["seed"] != this["seed"])]
        other = int((is_seed & ~same).sum())
    index = [f"seed={this['seed']} (this build)",
             *([] if seeds is None else [f"seed={s}" for s in seeds["seed"]])]
    frame = _side_by_side(seeds, this, index)
    if len(frame) > 1:
        values = frame.copy()
        count = values.count()
        frame.loc[SUMMARY_ROWS[0]] = values.mean()
        frame.loc[SUMMARY_ROWS[1]] = values.std(ddof=1)
        frame.loc[SUMMARY_ROWS[2]] = values.std(ddof=1) / count.pow(0.5)
    frame.attrs["other_setup"] = other
    return frame


def size_table(record: pd.DataFrame | None, this: Mapping[str, Any]) -> pd.DataFrame:
    """This build's row and every recorded ``image_size=N`` replicate of this build's seed made
    with the same setup but the image size, indexed ``"N px"``, in the book's column names."""
    sizes = None
    if record is not None and len(record):
        is_size = record["replicate"].astype(str).str.fullmatch(r"image_size=\d+")
        sizes = record[is_size & (record["setup_size"] == this["setup_size"])
                       & (record["image_size"] != this["image_size"])]
    sizes_px = [this["image_size"], *([] if sizes is None else sizes["image_size"])]
    return _side_by_side(sizes, this, [f"{int(s)} px" for s in sizes_px])


def size_sentence(table: pd.DataFrame) -> str:
    """Whether SPADE's average AUC gain grows with the image size, from a :func:`size_table`.

    For each size after the first (this build's), the gain minus this build's gain, with the
    standard error of that difference (the two models' samples are independent, so the squared
    errors add), judged by :func:`spade_lib.tables.claim_verdict` (claim: larger), for the
    preset's schedule and for the linear one. With one size only, says that none is recorded.
    """
    if len(table) < 2:
        return "No replicate at another image size is recorded."
    base = table.iloc[0]
    parts = []
    for label, delta, se in (("the preset's schedule", "AUC delta", "+- se"),
                             ("the linear schedule", "linear: AUC delta", "linear: +- se")):
        for size, row in table.iloc[1:].iterrows():
            diff = float(row[delta] - base[delta])
            err = math.hypot(float(row[se]), float(base[se]))
            verdict = tables.claim_verdict(diff, err, +1.0)
            parts.append(f"with {label}, {row[delta]:+.1f} +- {row[se]:.1f} at {size} against "
                         f"{base[delta]:+.1f} +- {base[se]:.1f} at {table.index[0]}, a change of "
                         f"{diff:+.1f} +- {err:.1f} (the gain grows: {verdict})")
    return ("SPADE's average AUC gain by image size: " + "; ".join(parts) + ". The preset's "
            f"schedule was searched at {table.index[0]}, so at another size it is not tuned.")


def seed_sentence(table: pd.DataFrame, preset: str) -> str:
    """The verdict across seeds from a :func:`seed_table`: the mean AUC gain with its standard
    error over seeds (:func:`spade_lib.tables.claim_verdict`), on how many seeds the gain exceeds
    its own standard error, and the mean over the recorded seeds alone (this build's seed is the
    one whose held-out twin the schedule was searched on)."""
    per_seed = table.drop(index=[r for r in SUMMARY_ROWS if r in table.index])
    gains, ses = per_seed["AUC delta"], per_seed["+- se"]
    scored = int(gains.notna().sum())
    command = f"`python scripts/replicate.py {preset} --seeds 1 2 3`"
    if scored < 2:
        only = gains.iloc[0]
        return (f"Only this build's seed is recorded: SPADE's average AUC gain is "
                f"{only:+.1f} +- {ses.iloc[0]:.1f}. {command} records more.")
    mean, se = (float(table.loc[r, "AUC delta"]) for r in (SUMMARY_ROWS[0], SUMMARY_ROWS[2]))
    sd = float(table.loc[SUMMARY_ROWS[1], "AUC delta"])
    meaning = {"holds": "positive beyond one standard error over seeds",
               "fails": "negative beyond one standard error over seeds",
               "inconclusive": "within one standard error of zero over seeds",
               "not comparable": "not comparable"}[tables.claim_verdict(mean, se, +1.0)]
    up, down = int((gains > ses).sum()), int((gains < -ses).sum())
    others = gains.iloc[1:].dropna()
    linear = float(table.loc[SUMMARY_ROWS[0], "linear: AUC delta"])
    return (f"Over {scored} seeds SPADE's average AUC gain is **{mean:+.1f} +- {se:.1f}** (mean "
            f"+- standard error over seeds; sd {sd:.1f}), {meaning}. The gain exceeds its own "
            f"standard error on {up} of {scored} seeds and falls below minus it on {down}. A "
            f"searched schedule comes from the held-out twin of this build's seed; over the "
            f"{len(others)} other seed(s) alone the gain is {others.mean():+.1f}. The linear "
            f"schedule's gain is {linear:+.1f} on average over seeds.")
