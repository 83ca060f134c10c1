"""Appendix D: which of SPADE's choices matter (sample sources, augmentations, layer sparsity).

Each ablation is a set of :class:`spade_lib.results.Variant` objects explained on the same samples
as chapter B's main table, whose dense, SPADE (``ISI``), linear-schedule and ISD rows are reused
(:func:`join`), so nothing is traced twice for the same sample, variant and config:

* Table D.11, :func:`source_variants`: where the Hessians come from (:mod:`spade_lib.sources`).
* Table D.12, :func:`recipe_variants` and :func:`count_variants`: the augmentation recipe and the
  number of augmented views.
* Table D.13, :func:`block_variants`: one block pruned at 0.99, the others dense.
* Figure D.4, :func:`last_stage_variants`: the last stage alone at a sweep of sparsities.
* Figure D.3, :func:`search_gain`: how the search's mean AUC grew group by group.
* Table D.14: dense, SPADE with the searched schedule and with the linear one (chapter B's rows).

The layouts are the paper's (:func:`cell_table`: ``AUC/PG`` per method and column), with a tidy
table of every column against dense (:func:`against`) and the paper's claims checked by
:func:`verdicts` (holds / fails / inconclusive at one standard error of the paired per-sample
difference, :func:`spade_lib.tables.claim_verdict`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from torch import nn

from spade_lib import search, sources, tables
from spade_lib.config import Config
from spade_lib.variants import Variant

__all__ = [
    "AUGMENTATION_COUNTS", "BLOCK_SPARSITY", "DEFAULT_SAMPLES", "LAST_STAGE_SPARSITIES",
    "PAPER", "RECIPES", "against", "block_variants", "blocks", "cell_table", "count_variants",
    "join", "last_stage", "last_stage_curve", "last_stage_variants", "late_share",
    "methods_above", "no_better_verdict", "pair_verdicts", "paper_beside", "paper_blocks",
    "recipe_variants", "search_gain", "source_variants", "verdicts",
]

DEFAULT_SAMPLES = 6
"""Samples the chapter explains by default (the paper: 100, ``-p samples 100``): chosen so that
the chapter fits the ``make book`` budget at the ``cpu`` preset on a 2-core machine."""

RECIPES = ("J+RC", "J+G+RC", "RR", "G+RC", "RR+RC", "G")
"""The augmentation recipes of Table D.12 (J+RC is SPADE's default)."""

AUGMENTATION_COUNTS = (16, 32, 128, 512, 1024)
"""The sweep of the number of augmented views (beyond the paper, which fixes it)."""

BLOCK_SPARSITY = 0.99
"""The sparsity of the one pruned block of Table D.13."""

LAST_STAGE_SPARSITIES = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99, 0.995)
"""The sparsities of Figure D.4 (0 is the dense model)."""

PAPER = {
    "D.11": {"Dense": (90.1, 77.6), "ISI": (95.6, 86.2), "IST": (69.7, 36.2),
             "ISC": (58.3, 16.2), "ISD": (59.3, 20.7), "MST": (69.4, 34.1),
             "MSC": (56.0, 11.9), "MSD": (56.0, 15.4)},
    "D.12": {"Dense": (90.1, 77.6), "J+RC": (95.6, 85.9), "J+G+RC": (92.9, 81.7),
             "RR": (94.8, 85.8), "G+RC": (92.7, 79.9), "RR+RC": (95.3, 86.5),
             "G": (91.9, 79.1)},
    "D.13": {"Dense": (90.3, 73.1), "fc": (90.4, 75.5), "last stage": (95.6, 82.5),
             "stage 3": (57.4, 14.8), "stage 2": (62.8, 19.4), "first stage": (68.1, 28.3)},
    "D.14": {"Dense": (90.09, 81.48), "SPADE + search": (95.78, 88.33),
             "SPADE + linear": (93.51, 86.92)},
}
"""The ``Average`` rows of the paper's Tables D.11 to D.14 (ResNet50, ImageNet): column ->
(AUC, Pointing Game) in %. D.13's blocks are named by their place here: ResNet50's block 4 is
the last stage, block 1 the first."""


# --------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------

def source_variants(cfg: Config, images: int = sources.PAPER_IMAGES) -> dict[str, Variant]:
    """Table D.11's sources besides ISI (chapter B's ``spade``) and ISD (its ``isd``).

    ``images`` is the number of training images per many-image source (MST, MSC, MSD).
    """
    return {s: Variant(s, cfg.sparsity, source=s, images=images)
            for s in sources.SOURCES if s not in ("ISI", "ISD")}


def recipe_variants(cfg: Config, recipes: Sequence[str] = RECIPES) -> dict[str, Variant]:
    """Table D.12: SPADE with each augmentation recipe (the config's own recipe is left out:
    those are chapter B's ``spade`` rows)."""
    from spade_lib.augment import recipe_components

    own = recipe_components(cfg.augment)
    return {r: Variant(r, cfg.sparsity, recipe=r) for r in recipes
            if recipe_components(r) != own}


def count_variants(cfg: Config, counts: Sequence[int] = AUGMENTATION_COUNTS
                   ) -> dict[str, Variant]:
    """SPADE with ``n`` augmented views for each count (the config's own count is left out)."""
    return {f"n={n}": Variant(f"n={n}", cfg.sparsity, n_augmentations=int(n)) for n in counts
            if int(n) != cfg.n_augmentations}


def blocks(model: nn.Module) -> dict[str, str]:
    """The blocks of Table D.13, from the output back: label -> block prefix.

    The groups of :func:`spade_lib.search.layer_groups` (ResNet: ``fc``, ``layers.3``, ...,
    ``layers.0``), labelled ``fc`` (the last group, the classifier), ``last stage``, ``stage k``
    and ``first stage``. A network with a single group has only ``last stage``.
    """
    groups = list(search.layer_groups(model))
    head = groups[-1] if len(groups) > 1 else None
    stages = [g for g in groups if g != head]
    out = {} if head is None else {"fc": head}
    for k in range(len(stages), 0, -1):
        label = ("last stage" if k == len(stages) else "first stage" if k == 1
                 else f"stage {k}")
        out[label] = stages[k - 1]
    return out


def paper_blocks(model: nn.Module) -> dict[str, tuple[float, float]]:
    """Table D.13's paper numbers for the blocks of ``model`` that have a counterpart: dense, fc,
    the last and the first stage always; ``stage 2`` and ``stage 3`` only for a network of four
    stages like ResNet-50 (elsewhere the numbering would not match)."""
    labels = blocks(model)
    stages = sum(1 for label in labels if label != "fc")
    keep = {"Dense", "fc", "last stage", "first stage"} | (
        {"stage 2", "stage 3"} if stages == 4 else set())
    return {k: v for k, v in PAPER["D.13"].items() if k in keep and (k == "Dense" or k in labels)}


def block_variants(model: nn.Module, sparsity: float = BLOCK_SPARSITY) -> dict[str, Variant]:
    """Table D.13: one block of :func:`blocks` pruned at ``sparsity``, the rest dense."""
    return {label: Variant(label, f"only:{prefix}:{sparsity}")
            for label, prefix in blocks(model).items()}


def last_stage(model: nn.Module) -> str:
    """The block prefix of the last stage (before the classifier), e.g. ``layers.3``."""
    return blocks(model)["last stage"]


def last_stage_variants(model: nn.Module, sparsities: Sequence[float] = LAST_STAGE_SPARSITIES
                        ) -> dict[str, Variant]:
    """Figure D.4: the last stage alone at each sparsity above 0 (0 is the dense model)."""
    prefix = last_stage(model)
    return {f"last stage {s:g}": Variant(f"last stage {s:g}", f"only:{prefix}:{s}")
            for s in sparsities if s > 0}


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

def join(base: pd.DataFrame, names: Mapping[str, str], *extra: pd.DataFrame,
         common: bool = True) -> pd.DataFrame:
    """Chapter B's rows for the variants ``names`` (renamed), then the ``extra`` tables' rows.

    With ``common`` (the default) only the samples every table has are kept, so every column
    has the same samples; without it, every table keeps its own samples (a costly column may
    have fewer), and the base rows are kept for all of theirs.

    Raises
    ------
    ValueError
        A variant of ``names`` missing from ``base``, a sample of the extra tables missing from
        ``base``, or a variant name used twice.
    """
    missing = [v for v in names if v not in set(base["variant"])]
    if missing:
        raise ValueError(f"variants {missing} are not in the base table; it has "
                         f"{list(dict.fromkeys(base['variant']))}")
    ids = set(base["sample"])
    for t in extra:
        lost = set(t["sample"]) - set(base["sample"])
        if lost:
            raise ValueError(f"samples {sorted(lost)} have no base rows; explain them with the "
                             "base variants first")
        if common:
            ids &= set(t["sample"])
    parts = [base[base["variant"].isin(list(names))].replace({"variant": dict(names)}),
             *extra]
    out = pd.concat([p[p["sample"].isin(ids)] for p in parts], ignore_index=True)
    used = [*names.values(), *(v for t in extra for v in dict.fromkeys(t["variant"]))]
    if len(set(used)) != len(used):
        raise ValueError(f"variant names repeat across the joined tables: {used}")
    return out


def cell_table(results: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """The paper's layout: per method (and ``Average``) and column, ``"AUC/PG"`` in % (AUC to
    one decimal, Pointing Game to the unit), each the better aggregation's mean
    (:func:`spade_lib.tables.variant_table`); ``n`` row: samples scored by every method.
    A NaN number prints as ``nan``."""
    auc = tables.variant_table(results, "auc", columns)
    pg = tables.variant_table(results, "pointing", columns)
    out = pd.DataFrame(index=auc.index, columns=list(columns), dtype=object)
    for c in columns:
        out[c] = [f"{a:.1f}/{p:.0f}" for a, p in zip(auc[c], pg[c], strict=True)]
    out.loc["n"] = [str(int(auc.attrs["n"].loc["Average", c])) for c in columns]
    out.columns.name = None
    return out


def paper_beside(results: pd.DataFrame, paper: Mapping[str, tuple[float, float]]
                 ) -> pd.DataFrame:
    """The ``Average`` row of the paper's table and ours, ``"AUC/PG"`` per column of ``paper``
    that ``results`` has (rows ``paper`` and ``here``)."""
    columns = [c for c in paper if c in set(results["variant"])]
    here = cell_table(results, columns).loc["Average"]
    out = pd.DataFrame([[f"{paper[c][0]:.1f}/{paper[c][1]:.0f}" for c in columns],
                        here.tolist()], index=["paper", "here"], columns=columns)
    return out


AGAINST_COLUMNS = ("column", "AUC", "AUC delta", "+- se", "PG", "PG delta", "PG +- se",
                   "keeps prediction %", "AUC delta (kept)", "+- se (kept)", "n", "n kept")
"""Columns of :func:`against`."""


def against(results: pd.DataFrame, columns: Sequence[str], baseline: str = "Dense"
            ) -> pd.DataFrame:
    """Every column against ``baseline`` on the average over methods, a tidy table.

    Per column: the average AUC and Pointing Game (%), the paired delta to ``baseline`` with its
    standard error (:func:`spade_lib.tables.summary`), the share of samples on which the column's
    network keeps the Trojan prediction, and the AUC delta restricted to those samples (a copy
    that no longer makes the decision cannot explain it) with its sample count.
    """
    rows = []
    for c in columns:
        s = tables.summary(results, c, baseline).loc["Average"]
        kept_ids = tables.kept_samples(results, c)
        kept = results[results["sample"].isin(kept_ids)]
        if len(kept_ids):
            k = tables.summary(kept, c, baseline).loc["Average"]
            kept_delta, kept_se = float(k["auc_delta"]), float(k["auc_se"])
        else:
            kept_delta = kept_se = math.nan
        rows.append({"column": c, "AUC": s[f"auc_{c}"], "AUC delta": s["auc_delta"],
                     "+- se": s["auc_se"], "PG": s[f"pointing_{c}"],
                     "PG delta": s["pointing_delta"], "PG +- se": s["pointing_se"],
                     "keeps prediction %": 100 * s["keeps_prediction"],
                     "AUC delta (kept)": kept_delta, "+- se (kept)": kept_se,
                     "n": int(s["n"]), "n kept": len(kept_ids)})
    return pd.DataFrame(rows, columns=list(AGAINST_COLUMNS)).set_index("column")


def no_better_verdict(delta: float, se: float) -> str:
    """For a claim that one column is *no better* than another: ``"fails"`` when ``delta`` is
    more than one standard error above 0, ``"holds"`` otherwise, ``"not comparable"`` for NaN
    (with a NaN ``se``, ``"inconclusive"``)."""
    if math.isnan(delta):
        return "not comparable"
    if math.isnan(se):
        return "inconclusive"
    return "fails" if delta > se else "holds"


def verdicts(results: pd.DataFrame, paper: Mapping[str, tuple[float, float]],
             baseline: str = "Dense") -> pd.DataFrame:
    """The paper's direction for every column against ``baseline``, checked here.

    For each column of ``paper`` (besides ``baseline``) present in ``results``: the paper's
    average AUC change, ours with its standard error, and :func:`spade_lib.tables.claim_verdict`
    on our change in the paper's direction (a paper change under 0.5 points claims no
    direction and gets ``"no direction"``).
    """
    rows = []
    base = paper[baseline][0]
    for c, (auc, _) in paper.items():
        if c == baseline or c not in set(results["variant"]):
            continue
        s = tables.summary(results, c, baseline).loc["Average"]
        change = auc - base
        direction = 0 if abs(change) < 0.5 else math.copysign(1, change)
        verdict = ("no direction" if direction == 0 else
                   tables.claim_verdict(float(s["auc_delta"]), float(s["auc_se"]), direction))
        rows.append({"column": c, "paper AUC change": change,
                     "AUC change here": float(s["auc_delta"]), "+- se": float(s["auc_se"]),
                     "verdict": verdict})
    return pd.DataFrame(rows, columns=["column", "paper AUC change", "AUC change here", "+- se",
                                       "verdict"]).set_index("column")


def pair_verdicts(results: pd.DataFrame, claims: Sequence[tuple[str, str, str]]
                  ) -> pd.DataFrame:
    """Claims between two columns, ``(better, worse, kind)`` with kind ``"better"`` (``better``
    beats ``worse`` beyond one standard error) or ``"no better"`` (``better`` is not above
    ``worse`` by more than one); the paired average AUC difference and the verdict."""
    rows = []
    for a, b, kind in claims:
        if kind not in ("better", "no better"):
            raise ValueError(f"claim kind must be 'better' or 'no better', got {kind!r}")
        s = tables.summary(results, a, b).loc["Average"]
        delta, se = float(s["auc_delta"]), float(s["auc_se"])
        verdict = (tables.claim_verdict(delta, se, 1) if kind == "better"
                   else no_better_verdict(delta, se))
        rows.append({"claim": f"{a} {'beats' if kind == 'better' else 'is no better than'} {b}",
                     "AUC difference": delta, "+- se": se, "verdict": verdict})
    return pd.DataFrame(rows, columns=["claim", "AUC difference", "+- se", "verdict"]
                        ).set_index("claim")


def last_stage_curve(results: pd.DataFrame, sparsities: Sequence[float] = LAST_STAGE_SPARSITIES,
                     baseline: str = "Dense") -> pd.DataFrame:
    """Figure D.4's data: per sparsity (rows; 0 is ``baseline``) and method (columns, plus
    ``Average``), the AUC in % (:func:`spade_lib.tables.variant_table`)."""
    names = [baseline if s == 0 else f"last stage {s:g}" for s in sparsities]
    table = tables.variant_table(results, "auc", names).T
    table.index = pd.Index([float(s) for s in sparsities], name="sparsity")
    return table


def search_gain(history: pd.DataFrame, groups: Sequence[str]) -> pd.DataFrame:
    """Figure D.3's record as a table: the search's mean AUC after each group's choice.

    Parameters
    ----------
    history
        :attr:`spade_lib.search.SearchResult.history` (``step``, ``group``, ``value``,
        ``score``), groups searched from the last to the first.
    groups
        Every group in network order (for the normalised layer order, 0 = first, 1 = last).

    Returns
    -------
    pandas.DataFrame
        One row per searched group in search order: ``group``, ``order`` (its normalised
        position), ``chosen`` (the value kept), ``before`` and ``after`` (mean AUC with the group
        dense and at its choice), ``gain`` and ``share`` (of the whole search's gain).
    """
    groups = list(groups)
    rows = []
    for step, part in history.groupby("step", sort=True):
        group = part["group"].iloc[0]
        best = part.loc[part["score"].idxmax()]
        dense = part.loc[part["value"] == 0, "score"]
        before = float(dense.iloc[0]) if len(dense) else math.nan
        position = groups.index(group) / max(len(groups) - 1, 1)
        rows.append({"group": group, "order": position, "chosen": float(best["value"]),
                     "before": before, "after": float(best["score"]), "step": int(step)})
    out = pd.DataFrame(rows)
    out["gain"] = out["after"] - out["before"]
    total = out["gain"].sum()
    out["share"] = out["gain"] / total if total != 0 else np.nan
    return out.drop(columns="step")


def late_share(gain: pd.DataFrame, groups: Sequence[str], last: int = 2) -> tuple[float, str]:
    """Figure D.3's claim: the share of the search's gain (:func:`search_gain`) that the ``last``
    groups of ``groups`` (network order; by default the last stage and the classifier) bring,
    and the verdict: ``"holds"`` above one half, ``"fails"`` at or below it, ``"not
    comparable"`` when the search gained nothing (the search keeps means only, so there is no
    standard error)."""
    late = list(groups)[-last:]
    share = float(gain.loc[gain["group"].isin(late), "share"].sum(min_count=1))
    if math.isnan(share):
        return share, "not comparable"
    return share, "holds" if share > 0.5 else "fails"


def methods_above(results: pd.DataFrame, variant: str, baseline: str = "Dense"
                  ) -> tuple[int, int]:
    """How many methods' AUC ``variant`` raises over ``baseline`` by more than one standard error
    of the paired per-sample difference, and of how many methods."""
    per_method = tables.summary(results, variant, baseline).drop("Average")
    return int((per_method["auc_delta"] > per_method["auc_se"]).sum()), len(per_method)
