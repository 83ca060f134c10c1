"""Appendix I: the faster SPADE (FastOBC, fewer views, one stage) against exact OBC.

The solvers themselves live in :mod:`spade_lib.pruning`; this module is chapter I's experiment:
the columns of Tables I.16 and I.17 as :class:`spade_lib.results.Variant` objects
(:func:`variants`), their layout with the measured pruning time (:func:`solver_table`), the
paper's numbers (:data:`PAPER`), and, beyond the paper, FastOBC's reconstruction error with the
paper's mask group against one group per row (:func:`mask_group_errors`).

Columns: Dense; Sparse FC (:func:`spade_lib.baselines.sparse_fc`); OBC (exact, the searched
schedule); FOBC (FastOBC, the searched schedule: chapter B's SPADE rows when the preset's pruner
is FastOBC); FOBC L4 1024 and FOBC L4 128 (only the last stage, at the schedule's sparsity there,
with 1024 and 128 views); FOBC linear (chapter B's linear-schedule rows).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pandas as pd
from torch import nn

from spade_lib import ablation, schedules, tables
from spade_lib.config import Config
from spade_lib.samples import Samples, sample_seed
from spade_lib.trace import trace
from spade_lib.variants import TRACE_BATCH, Variant

__all__ = ["COLUMNS", "OBC_SAMPLES", "PAPER", "PAPER_SECONDS", "last_stage_sparsity",
           "mask_group_errors", "mask_group_table", "reused", "seconds", "solver_table",
           "time_ratios", "variants"]

COLUMNS = ("Dense", "Sparse FC", "OBC", "FOBC", "FOBC L4 1024", "FOBC L4 128", "FOBC linear")
"""The columns of Tables I.16 and I.17, in the paper's order."""

OBC_SAMPLES = 2
"""Samples the chapter explains with exact OBC by default. OBC removes one weight at a time and
updates the rest of its row, every row of every layer: about a minute per sample for the
``cpu`` preset's ResNet-18-style model on 2 CPU cores (41 minutes on the paper's GPU for
ResNet50), so the default ``make book`` affords two, the fewest that give a standard error;
``-p obc_samples N`` buys more."""

PAPER = {
    "auc": {"Dense": 90.96, "Sparse FC": 91.5, "OBC": 96.55, "FOBC": 95.16,
            "FOBC L4 1024": 94.09, "FOBC L4 128": 93.97, "FOBC linear": 93.83},
    "pointing": {"Dense": 84.41, "Sparse FC": 85.0, "OBC": 91.89, "FOBC": 91.25,
                 "FOBC L4 1024": 88.66, "FOBC L4 128": 88.48, "FOBC linear": 89.55},
}
"""The ``Average`` rows of Tables I.16 (AUC) and I.17 (Pointing Game), in %, ResNet50 on
ImageNet, 112 samples."""

PAPER_SECONDS = {"OBC": 41 * 60.0, "FOBC": 70.0, "FOBC L4 1024": 17.0, "FOBC L4 128": 14.0,
                 "FOBC linear": 69.0}
"""The pruning times per sample of Tables I.16/I.17 (the paper's GPU, ResNet50)."""


def last_stage_sparsity(cfg: Config, model: nn.Module) -> float:
    """The schedule's sparsity on the last stage (the largest of its layers' targets)."""
    prefix = ablation.last_stage(model)
    targets = schedules.resolve_sparsity(model, cfg.sparsity)
    values = [s for name, s in targets.items() if name == prefix or name.startswith(prefix + ".")]
    return max(values)


def reused(cfg: Config) -> dict[str, str]:
    """Chapter B's variants that are columns here, with their names in Tables I.16/I.17: dense
    always; SPADE and its linear schedule when the preset's pruner is FastOBC."""
    names = {"dense": "Dense"}
    if cfg.pruner == "fastobc":
        names.update({"spade": "FOBC", "spade-linear": "FOBC linear"})
    return names


def variants(cfg: Config, model: nn.Module) -> dict[str, Variant]:
    """The columns of Tables I.16/I.17 that chapter B does not already have (:func:`reused`),
    plus the mask group comparison: ``OBC``, ``FOBC L4 1024``, ``FOBC L4 128``, ``FOBC row
    group`` (FastOBC with one mask group per row instead of the paper's), and ``FOBC`` and
    ``FOBC linear`` when the preset prunes with another solver.

    Raises
    ------
    ValueError
        If the schedule leaves the last stage dense (the L4 columns would not prune).
    """
    s = last_stage_sparsity(cfg, model)
    if s <= 0:
        raise ValueError(f"the schedule {cfg.sparsity!r} leaves the last stage "
                         f"({ablation.last_stage(model)}) dense; the L4 columns need it pruned")
    only = f"only:{ablation.last_stage(model)}:{s}"
    own = {} if cfg.pruner == "fastobc" else {
        "FOBC": Variant("FOBC", cfg.sparsity, pruner="fastobc"),
        "FOBC linear": Variant("FOBC linear", "linear", pruner="fastobc")}
    return {**own,
        "OBC": Variant("OBC", cfg.sparsity, pruner="obc"),
        "FOBC L4 1024": Variant("FOBC L4 1024", only, pruner="fastobc", n_augmentations=1024),
        "FOBC L4 128": Variant("FOBC L4 128", only, pruner="fastobc", n_augmentations=128),
        "FOBC row group": Variant("FOBC row group", cfg.sparsity, pruner="fastobc",
                                  pruner_options={"mask_group": "row"}),
    }


def seconds(results: pd.DataFrame) -> pd.Series:
    """Mean trace seconds per sample of each variant (NaN for variants that prune nothing)."""
    per_sample = results.drop_duplicates(["sample", "variant"])
    out = per_sample.groupby("variant", sort=False)["trace_seconds"].mean()
    return out.where(out > 0)


def solver_table(results: pd.DataFrame, columns: tuple[str, ...] | list[str],
                 metric: str = "auc") -> pd.DataFrame:
    """Table I.16 (``metric="auc"``) or I.17 (``"pointing"``) here: the measured pruning time per
    sample (s), then per method and column the paper's number (:func:`spade_lib.tables.
    variant_table`), the ``Average`` and ``n`` (samples scored by every method)."""
    values = tables.variant_table(results, metric, list(columns))
    time = seconds(results).reindex(list(columns))
    out = pd.concat([pd.DataFrame([time.to_numpy()], index=["pruning time (s)"],
                                  columns=list(columns)), values])
    out.loc["n"] = values.attrs["n"].loc["Average", list(columns)].astype(float).to_numpy()
    out.index.name = "method"
    return out


def time_ratios(results: pd.DataFrame) -> pd.DataFrame:
    """The pruning time per sample of each column of :data:`PAPER_SECONDS` here and in the paper,
    each also as a share of OBC's (the machines differ, the ratios can be compared)."""
    here = seconds(results)
    rows = []
    for c, paper in PAPER_SECONDS.items():
        value = float(here.get(c, math.nan))
        rows.append({"column": c, "seconds here": value,
                     "share of OBC here (%)": 100 * value / float(here.get("OBC", math.nan)),
                     "seconds in the paper": paper,
                     "share of OBC in the paper (%)": 100 * paper / PAPER_SECONDS["OBC"]})
    return pd.DataFrame(rows).set_index("column")


def mask_group_errors(cfg: Config, model: nn.Module, samples: Samples,
                      groups: Mapping[str, int | str | None] | None = None) -> pd.DataFrame:
    """FastOBC's relative reconstruction error per layer for mask groups, on the samples' traces.

    Each sample is traced as the runner traces it (its seed, the preset's schedule, views and
    batch size) once per mask group; the error is the trace report's ``rel_error``
    (``||(W - W_hat) X||^2 / ||W X||^2`` on the views).

    Parameters
    ----------
    groups
        Label -> ``mask_group`` option; default ``{"paper": None, "row": "row"}`` (the paper's
        group of :func:`spade_lib.pruning.default_mask_group` against one group per row).

    Returns
    -------
    pandas.DataFrame
        One row per sample, group and pruned layer: ``sample``, ``group``, ``layer``,
        ``sparsity`` (achieved), ``rel_error``.
    """
    groups = {"paper": None, "row": "row"} if groups is None else dict(groups)
    rows = []
    for position in range(len(samples)):
        sample = int(samples.table.iloc[position]["sample"])
        image = samples.poisoned.float_images([sample])[0]
        for label, group in groups.items():
            report = trace(model, image, sparsity=cfg.sparsity, pruner="fastobc",
                           n_augmentations=cfg.n_augmentations, recipe=cfg.augment,
                           batch_size=TRACE_BATCH, seed=sample_seed(cfg.seed, sample),
                           mask_group=group).report
            rows += [{"sample": sample, "group": label, "layer": r.layer,
                      "sparsity": r.sparsity, "rel_error": r.rel_error}
                     for r in report.itertuples(index=False)]
    return pd.DataFrame(rows, columns=["sample", "group", "layer", "sparsity", "rel_error"])


def mask_group_table(errors: pd.DataFrame) -> pd.DataFrame:
    """Per layer (network order) and the mean over layers: each group's mean relative error over
    samples, and the ratio of the first group's to the second's."""
    order = list(dict.fromkeys(errors["layer"]))
    table = errors.pivot_table(index="layer", columns="group", values="rel_error",
                               aggfunc="mean", sort=False).reindex(order)
    table.loc["mean over layers"] = table.mean()
    labels = list(dict.fromkeys(errors["group"]))
    if len(labels) >= 2:
        a, b = labels[:2]
        table[f"{a} / {b}"] = table[a] / table[b].where(table[b] > 0, math.nan)
    table.columns.name = None
    return table
