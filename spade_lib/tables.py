"""The paper's table layouts of a results table, and the sentences that read them.

Every function takes the tidy table of :func:`spade_lib.results.evaluate` (one row per sample,
method and variant). :func:`summary` gives Table B.2 (baseline / variant / delta per method, with
an average row), :func:`wins` the per-sample counts behind its deltas, :func:`variant_table`
several variants side by side (Tables D.11 and D.14) and :func:`prediction_kept` how often a
pruned copy still makes the Trojan decision. :func:`merge_methods` folds methods with equal
scores into one row, as the paper prints InputXGradient and DeepLift on MobileNetV2.

The book's chapter B prints :func:`table_b2` (Table B.2 styled), :func:`headline` and
:func:`overview` (the models side by side), and its verdicts come from the numbers:
:func:`gain_sentence` sets the gain against the paper's range (:data:`PAPER_AUC_GAIN`) and
:func:`difference_sentence` compares two variants, both at one standard error
(:func:`range_verdict`, and :func:`claim_verdict` for the sign of a difference).
:func:`class_change` is the ``"Coat -> Bag"`` label of a decision. Chapter L prints
:func:`rule_table` (Table L.19: one method per Trojan rule, the paper's :data:`PAPER_L19` beside it)
and :func:`full_evaluation_sentence`.

Per-layer tables (chapters E and K) share :func:`spread` (mean, standard deviation, standard error
and counts of a column), :func:`layer_means` (each unit's mean over layers) and the label
:data:`ALL_LAYERS` of the row that averages over layers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from spade_lib import metrics

__all__ = [
    "ALL_LAYERS", "OVERVIEW_COLUMNS", "PAPER_AUC_GAIN", "PAPER_L19", "PAPER_L19_SAMPLES",
    "claim_verdict", "class_change", "cost_table", "difference_sentence",
    "full_evaluation_sentence", "gain_sentence", "headline", "kept_samples", "layer_means",
    "merge_methods", "on_kept", "overview", "prediction_kept", "range_verdict", "rule_table",
    "score_gap", "spread", "standard_error", "summary", "table_b2", "table_l19", "variant_table",
    "wins",
]


def _best_per_method(rows: pd.DataFrame, metric: str,
                     methods: Sequence[str] | None = None) -> pd.DataFrame:
    """:func:`spade_lib.metrics.best_of_aggregations` per method, one row for each of
    ``methods`` (a method without rows here gets NaN, aggregation ``None`` and zero counts)."""
    best = metrics.best_of_aggregations(rows, by="method", metric=metric).set_index("method")
    if methods is None:
        return best
    best = best.reindex(list(methods))
    best[["n", "n_scored"]] = best[["n", "n_scored"]].fillna(0).astype(np.int64)
    best["aggregation"] = best["aggregation"].astype(object).where(best["best"].notna(), None)
    return best


def _sample_values(rows: pd.DataFrame, metric: str, aggregation: str | None) -> pd.Series:
    """Per-sample scores (indexed by sample) of one aggregation; all NaN when it is ``None``
    or NaN (no aggregation has a score)."""
    if aggregation is None or pd.isna(aggregation):
        return pd.Series(np.nan, index=rows["sample"].to_numpy(), dtype=float)
    return rows.set_index("sample")[f"{metric}_{aggregation}"]


def _check_table(results: pd.DataFrame, variants: Sequence[str]) -> None:
    need = ("sample", "method", "variant", *metrics.SCORE_COLUMNS)
    missing = [c for c in need if c not in results.columns]
    if missing:
        raise ValueError(f"results lack columns {missing}; pass the table from evaluate()")
    have = list(dict.fromkeys(results["variant"]))
    unknown = [v for v in variants if v not in have]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; the results hold {have}")


def _paired(results: pd.DataFrame, metric: str, variant: str, baseline: str,
            methods: Sequence[str]) -> tuple[dict[str, pd.DataFrame],
                                             dict[str, dict[str, pd.Series]]]:
    """The comparison step of :func:`summary` and :func:`wins`.

    Returns ``(best, values)``: per side (``baseline`` and ``variant``), ``best[side]`` is
    :func:`_best_per_method` of that side's rows (one row per method) and
    ``values[side][method]`` the per-sample scores (indexed by sample) on the aggregation
    chosen for that side and method.
    """
    best: dict[str, pd.DataFrame] = {}
    values: dict[str, dict[str, pd.Series]] = {}
    for name in (baseline, variant):
        rows = results[results["variant"] == name]
        best[name] = _best_per_method(rows, metric, methods)
        values[name] = {m: _sample_values(rows[rows["method"] == m], metric,
                                          best[name].loc[m, "aggregation"]) for m in methods}
    return best, values


def _metric_columns(results: pd.DataFrame, metric: str, variant: str, baseline: str,
                    methods: Sequence[str], scale: float) -> pd.DataFrame:
    """One metric's columns of :func:`summary` (rows: ``methods`` then ``Average``)."""
    table = pd.DataFrame(index=pd.Index([*methods, "Average"], name="method"))
    best, values = _paired(results, metric, variant, baseline, methods)
    for name in (baseline, variant):
        table[f"{metric}_{name}"] = scale * pd.concat([best[name]["best"], pd.Series(
            {"Average": best[name]["best"].mean(skipna=False)})])
        every = pd.concat(values[name], axis=1).notna().all(axis=1).sum() if methods else 0
        table[f"{metric}_n_{name}"] = [*best[name]["n_scored"].tolist(), int(every)]
    diffs = {m: values[variant][m] - values[baseline][m] for m in methods}
    per_sample = pd.concat(diffs, axis=1).mean(axis=1, skipna=True)
    table[f"{metric}_delta"] = table[f"{metric}_{variant}"] - table[f"{metric}_{baseline}"]
    table[f"{metric}_se"] = ([scale * standard_error(diffs[m]) for m in methods]
                             + [scale * standard_error(per_sample)])
    chosen = [best[name]["aggregation"] for name in (baseline, variant)]
    labels = [f"{chosen[0][m]}/{chosen[1][m]}" for m in methods]
    table[f"{metric}_aggregation"] = pd.Series([*labels, None], index=table.index, dtype=object)
    order = (baseline, variant, "delta", "se", "aggregation", f"n_{baseline}", f"n_{variant}")
    return table[[f"{metric}_{c}" for c in order]]


def summary(results: pd.DataFrame, variant: str = "spade", baseline: str = "dense",
            percent: bool = True) -> pd.DataFrame:
    """Table B.2: per method, baseline / variant / delta for AUC and Pointing Game, and an average.

    Each number is the paper's: the better of the two channel aggregations' means (see
    :func:`spade_lib.metrics.best_of_aggregations`), chosen separately for the baseline and the
    variant of each method; ``*_aggregation`` says which (``"abs/sum"`` = baseline abs, variant
    sum; ``"None"`` for a side with no score). ``*_delta`` is the variant's number minus the
    baseline's, ``*_se`` the standard error of the per-sample difference (each side on its chosen
    aggregation, over the samples scored on both sides). The ``Average`` row averages the
    methods' numbers; its standard error is that of the per-sample mean over methods of the
    differences.

    Degenerate scores (NaN: a constant map, e.g. every weight of a layer pruned) are skipped in
    the means and counted: ``*_n_{baseline}`` and ``*_n_{variant}`` say on how many samples each
    side has a score. A method with no score on a side keeps its row, with NaN numbers and a count
    of 0, and makes that side's ``Average`` NaN (an average over fewer methods is not comparable);
    the ``Average`` counts are the samples scored by every method.

    Parameters
    ----------
    results
        The table from :func:`evaluate`.
    variant, baseline
        Variant names to compare (columns are named after them: ``auc_dense``, ``auc_spade``...).
    percent
        Scale scores by 100, as the paper prints them.

    Returns
    -------
    pandas.DataFrame
        Indexed by method (plus ``Average``); columns for ``auc`` and ``pointing``: baseline,
        variant, ``delta``, ``se``, ``aggregation``, ``n_{baseline}``, ``n_{variant}``; then ``n``
        (samples of the variant in total) and ``keeps_prediction`` (share of samples on which the
        variant still predicts the Trojan target).
    """
    _check_table(results, [variant, baseline])
    scale = 100.0 if percent else 1.0
    methods = list(dict.fromkeys(results["method"]))
    table = pd.concat([_metric_columns(results, metric, variant, baseline, methods, scale)
                       for metric in ("auc", "pointing")], axis=1)
    counts = results[results["variant"] == variant].groupby("method", sort=False)["sample"]
    table["n"] = counts.nunique().reindex(methods).fillna(0).astype(int).tolist() + [
        results["sample"].nunique()]
    kept = prediction_kept(results).get(variant, math.nan)
    table["keeps_prediction"] = kept
    table.attrs["description"] = (
        f"{variant} vs {baseline}: best of the signed-sum and abs-sum aggregation means per method "
        f"(the paper's number){' in %' if percent else ''}; delta +- standard error of the "
        "per-sample difference; n_*: samples with a score")
    return table


def score_gap(results: pd.DataFrame, methods: Sequence[str]) -> float:
    """The largest difference between the methods' scores on the same sample and variant (NaN
    on both sides counts as equal; NaN on one side gives ``inf``)."""
    key = ["sample", "variant"]
    first = results[results["method"] == methods[0]].set_index(key).sort_index()
    gap = 0.0
    for other in methods[1:]:
        rows = results[results["method"] == other].set_index(key).sort_index()
        if not rows.index.equals(first.index):
            return math.inf
        for col in metrics.SCORE_COLUMNS:
            a, b = first[col].to_numpy(), rows[col].to_numpy()
            if (np.isnan(a) != np.isnan(b)).any():
                return math.inf
            both = ~np.isnan(a)
            if both.any():
                gap = max(gap, float(np.abs(a[both] - b[both]).max()))
    return gap


def merge_methods(results: pd.DataFrame, methods: Sequence[str], name: str | None = None,
                  atol: float = 1e-6) -> pd.DataFrame:
    """One row per sample and variant for methods that give the same scores, as Table B.2 prints
    InputXGradient and DeepLift on MobileNetV2 (where DeepLift has no rule for ReLU6 and reduces
    to gradient times input).

    The first method's rows are kept and renamed ``name`` (default ``"A / B"``); the others are
    dropped. Raises ``ValueError`` if any score differs by more than ``atol``: methods that
    disagree are not merged.
    """
    methods = list(methods)
    if len(methods) < 2:
        raise ValueError(f"merge_methods needs at least two methods, got {methods}")
    missing = [m for m in methods if m not in set(results["method"])]
    if missing:
        raise ValueError(f"methods {missing} are not in the results; have "
                         f"{list(dict.fromkeys(results['method']))}")
    gap = score_gap(results, methods)
    if not gap <= atol:
        raise ValueError(f"the scores of {methods} differ by up to {gap:.3g} (> atol {atol}); "
                         "they are not merged")
    label = name or " / ".join(methods)
    out = results[~results["method"].isin(methods[1:])].copy()
    out.loc[out["method"] == methods[0], "method"] = label
    return out.reset_index(drop=True)


def wins(results: pd.DataFrame, variant: str = "spade", baseline: str = "dense",
         metric: str = "auc") -> pd.DataFrame:
    """Per method: on how many samples the variant scores above, equal to and below the baseline.

    Each side is scored on the aggregation :func:`summary` takes for it (the better mean), so the
    counts explain that table's deltas. Samples with a NaN score on either side are not counted:
    ``n`` is the number compared and ``total`` the method's samples, so a method with no score
    keeps its row with zero counts.
    """
    if metric not in ("auc", "pointing"):
        raise ValueError(f"unknown metric {metric!r}; allowed: auc, pointing")
    _check_table(results, [variant, baseline])
    methods = list(dict.fromkeys(results["method"]))
    _, values = _paired(results, metric, variant, baseline, methods)
    rows = []
    for m in methods:
        d = (values[variant][m] - values[baseline][m]).dropna()
        pick = (results["method"] == m) & results["variant"].isin([baseline, variant])
        rows.append({"method": m, "better": int((d > 0).sum()), "equal": int((d == 0).sum()),
                     "worse": int((d < 0).sum()), "n": len(d),
                     "total": results.loc[pick, "sample"].nunique()})
    return pd.DataFrame(rows).set_index("method")


def standard_error(values: pd.Series) -> float:
    """Standard error of the mean of the non-NaN ``values`` (NaN for fewer than two)."""
    v = values.dropna()
    return float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan


def variant_table(results: pd.DataFrame, metric: str = "auc",
                  variants: Sequence[str] | None = None, percent: bool = True) -> pd.DataFrame:
    """Table D.14 layout: the paper's number per method (rows) and variant (columns), averaged.

    Each cell is the better of the two aggregations' means for that method and variant (NaN
    where no sample has a score; the row is kept). The ``Average`` row is NaN for a variant with
    a NaN method. ``table.attrs`` holds the same layout with ``"aggregation"`` (the aggregation
    taken, ``None`` for no score), ``"n"`` (samples with a score; ``Average``: samples scored by
    every method) and ``"total"`` (samples).
    """
    if metric not in ("auc", "pointing"):
        raise ValueError(f"unknown metric {metric!r}; allowed: auc, pointing")
    variants = list(dict.fromkeys(results["variant"])) if variants is None else list(variants)
    _check_table(results, variants)
    methods = list(dict.fromkeys(results["method"]))
    best = metrics.best_of_aggregations(results[results["variant"].isin(variants)],
                                        by=["method", "variant"], metric=metric)

    def layout(column: str) -> pd.DataFrame:
        out = best.pivot(index="method", columns="variant", values=column)
        return out.reindex(index=methods, columns=variants)

    values = layout("best").astype(float) * (100.0 if percent else 1.0)
    values.loc["Average"] = values.mean(skipna=False)
    values.columns.name = None
    values.index.name = "method"
    labels = layout("aggregation").astype(object)
    counts = layout("n_scored").fillna(0).astype(np.int64)
    counts.loc["Average"] = [_scored_by_all(results[results["variant"] == v], metric,
                                            labels[v]) for v in variants]
    totals = results.groupby(["method", "variant"], sort=False)["sample"].nunique()
    totals = totals.unstack().reindex(index=methods, columns=variants).fillna(0).astype(np.int64)
    totals.loc["Average"] = [results.loc[results["variant"] == v, "sample"].nunique()
                             for v in variants]
    values.attrs.update(aggregation=labels.where(labels.notna(), None), n=counts, total=totals)
    values.attrs["description"] = (f"{metric}: best of the signed-sum and abs-sum means per "
                                   f"method and variant{' in %' if percent else ''}")
    return values


def _scored_by_all(rows: pd.DataFrame, metric: str, aggregation: pd.Series) -> int:
    """How many samples of ``rows`` have a score in every method (each on ``aggregation[m]``)."""
    per_method = {m: _sample_values(rows[rows["method"] == m], metric, aggregation[m])
                  for m in aggregation.index}
    if not per_method:
        return 0
    return int(pd.concat(per_method, axis=1).notna().all(axis=1).sum())


def prediction_kept(results: pd.DataFrame) -> pd.Series:
    """Per variant, the share of samples on which its network still predicts the Trojan target."""
    per_sample = results.drop_duplicates(["sample", "variant"])
    return per_sample.groupby("variant", sort=False)["keeps_prediction"].mean()


def kept_samples(results: pd.DataFrame, variant: str = "spade") -> list[int]:
    """The samples (in the table's order) on which ``variant``'s network still predicts the
    Trojan target; an unknown variant raises ``ValueError``."""
    rows = results[results["variant"] == variant].drop_duplicates("sample")
    if rows.empty:
        raise ValueError(f"variant {variant!r} is not in the results; it has "
                         f"{sorted(set(results['variant']))}")
    return rows.loc[rows["keeps_prediction"].astype(bool), "sample"].tolist()


def on_kept(results: pd.DataFrame, variant: str = "spade") -> pd.DataFrame:
    """Every variant's rows of ``results`` on :func:`kept_samples` of ``variant`` only: the
    samples where the pruned copy still makes the decision it is meant to explain."""
    return results[results["sample"].isin(kept_samples(results, variant))]



def rule_table(results: pd.DataFrame, method: str, variant: str = "spade",
               baseline: str = "dense", percent: bool = True,
               rules: Sequence[str] | None = None) -> pd.DataFrame:
    """Table L.19: one method's AUC and Pointing Game per Trojan rule, baseline against variant.

    Each rule's row is :func:`summary`'s row for ``method`` on that rule's samples (the better
    aggregation's mean per side, delta +- standard error of the per-sample difference, counts).
    The ``Average`` row is the mean of the rule rows, as the paper's table averages its rules;
    its standard error combines theirs (``sqrt(sum se^2) / rules``, the rules' samples being
    independent). A rule without samples (say, none left where the pruned copy keeps the
    prediction) or without a score on a side has NaN there, and so has the ``Average``: an
    average over fewer rules is not the paper's.

    Parameters
    ----------
    results
        The table from :func:`spade_lib.results.evaluate` (columns ``rule``, ``rule_name``).
    method
        The saliency method to report (e.g. ``"LRP"``, as in the paper).
    variant, baseline
        Variant names to compare.
    percent
        Scale scores by 100.
    rules
        The rule names to report, in order (e.g. ``[r.name for r in samples.poisoned.rules]``);
        default: those in ``results``, in rule order.

    Returns
    -------
    pandas.DataFrame
        Indexed by rule name plus ``Average``; the columns of :func:`summary` for ``auc`` and
        ``pointing`` (without ``aggregation``), and ``n`` (samples).

    Raises
    ------
    ValueError
        ``method`` is not in a non-empty ``results``, a variant is missing, or ``results`` has a
        rule that ``rules`` does not name. An empty ``results`` (with the table's columns) gives
        every rule of ``rules`` NaN scores and 0 samples.
    """
    _check_table(results, [])
    methods = list(dict.fromkeys(results["method"]))
    if not results.empty:  # an empty table (no samples at all, say none kept): all rules NaN
        if method not in methods:
            raise ValueError(f"method {method!r} is not in the results; they have {methods}")
        _check_table(results[results["method"] == method], [variant, baseline])
    rows = results[results["method"] == method]
    present = list(dict.fromkeys(rows.sort_values("rule", kind="stable")["rule_name"]))
    names = present if rules is None else [str(r) for r in rules]
    unknown = sorted(set(present) - set(names))
    if unknown:
        raise ValueError(f"the results have rules {unknown} that rules={list(names)} leaves out")
    keep = [f"{m}_{c}" for m in ("auc", "pointing")
            for c in (baseline, variant, "delta", "se", f"n_{baseline}", f"n_{variant}")]
    counts = [c for c in (*keep, "n") if "_n_" in c or c == "n"]
    parts = []
    for name in names:
        sub = rows[rows["rule_name"] == name]
        if sub.empty:
            parts.append(pd.Series({c: 0 if c in counts else math.nan for c in (*keep, "n")}))
        else:
            parts.append(summary(sub, variant, baseline, percent).loc[method, [*keep, "n"]])
    table = pd.DataFrame(parts, index=pd.Index(names, name=None),
                         columns=[*keep, "n"]).astype(float)
    average = table.mean(axis=0, skipna=False)
    for metric in ("auc", "pointing"):
        average[f"{metric}_se"] = (
            float(np.sqrt((table[f"{metric}_se"] ** 2).sum(skipna=False))) / len(table)
            if len(table) else math.nan)
    average[counts] = table[counts].sum()
    table.loc["Average"] = average
    table[counts] = table[counts].astype(int)
    table.attrs["description"] = (
        f"{method}, {variant} vs {baseline} per Trojan rule{' in %' if percent else ''}; "
        "Average: mean of the rules (standard errors combined)")
    return table


def cost_table(results: pd.DataFrame) -> pd.DataFrame:
    """Mean seconds per sample of each variant's trace and of each method's map (rows: variants,
    columns: ``trace`` then the methods), from the ``trace_seconds`` and
    ``attribution_seconds`` of a results table."""
    maps = (results.groupby(["variant", "method"], sort=False)["attribution_seconds"].mean()
            .unstack("method"))
    maps = maps[list(dict.fromkeys(results["method"]))]
    traces = (results.drop_duplicates(["sample", "variant"])
              .groupby("variant", sort=False)["trace_seconds"].mean())
    maps.insert(0, "trace", traces)
    maps.index.name = None
    return maps.loc[list(dict.fromkeys(results["variant"]))]


PAPER_L19 = pd.DataFrame(
    {"auc_dense": [96.23, 90.92, 86.75, 86.73, 90.15],
     "auc_spade": [98.7, 97.87, 96.62, 93.04, 96.56],
     "pointing_dense": [94.17, 79.43, 64.29, 54.55, 73.11],
     "pointing_spade": [97.36, 90.85, 92.86, 72.73, 88.45]},
    index=["Any -> 146 Albatross", "Any -> 30 BullFrog", "271 Red Wolf -> 99 Goose",
           "893 Wallet -> 365 Orangutan", "Average"])
"""The paper's Table L.19 (ResNet-50, ImageNet, SPADE + LRP with FastOBC and 10240 augmentations,
21,121 samples), in %."""

PAPER_L19_SAMPLES = 21121
"""Samples of the paper's Table L.19: every ImageNet validation image that passed its filter."""


def table_l19(results: pd.DataFrame, method: str, variant: str = "spade",
              baseline: str = "dense", label: str = "SPADE",
              rules: Sequence[str] | None = None) -> pd.io.formats.style.Styler:
    """Table L.19 as the book prints it: :func:`rule_table` of ``method`` (over ``rules``) with
    the columns of :func:`table_b2` (Dense / ``label`` / delta / standard error for the AUC and
    the Pointing Game, in %, one decimal) and the samples per rule."""
    t = rule_table(results, method, variant, baseline, rules=rules)
    out = _book_layout(t, variant, baseline, label)
    out[("", "samples")] = t["n"]
    numbers = [c for c in out.columns if c[0]]
    return out.style.format("{:.1f}", subset=numbers).set_caption(
        f"{method}: {int(t['n'].iloc[-1])} samples; per rule the better of the two channel "
        "aggregations' means; delta +- standard error of the per-sample difference; Average: the "
        "mean of the rules, as in the paper")


def full_evaluation_sentence(results: pd.DataFrame, method: str, variant: str = "spade",
                             rules: Sequence[str] | None = None) -> str:
    """The paper's claim for Table L.19 (SPADE raises the average AUC and Pointing Game over the
    rules) set against ``method``'s :func:`rule_table` (over ``rules``), with
    :func:`claim_verdict` at one standard error for each score and for both together."""
    table = rule_table(results, method, variant, rules=rules)
    avg, rules = table.loc["Average"], table.drop("Average")
    paper = PAPER_L19.loc["Average"]
    verdicts = {m: claim_verdict(float(avg[f"{m}_delta"]), float(avg[f"{m}_se"]), 1.0)
                for m in ("auc", "pointing")}
    if "fails" in verdicts.values():
        both = "fails"
    elif "not comparable" in verdicts.values():
        both = "is not comparable (a side has no score)"
    else:
        both = "holds" if set(verdicts.values()) == {"holds"} else "is inconclusive"
    raised = int((rules["auc_delta"] > 0).sum())
    return (
        f"**The paper**: SPADE + LRP raises the average over its four rules of the AUC from "
        f"{paper['auc_dense']:.2f} to {paper['auc_spade']:.2f} and of the Pointing Game from "
        f"{paper['pointing_dense']:.2f} to {paper['pointing_spade']:.2f}, on "
        f"{PAPER_L19_SAMPLES:,} ImageNet samples. **Here**, {method} on {int(avg['n'])} "
        f"sample{'' if int(avg['n']) == 1 else 's'}: "
        f"AUC {avg['auc_dense']:.1f} -> {avg[f'auc_{variant}']:.1f} "
        f"({avg['auc_delta']:+.1f} +- {avg['auc_se']:.1f}, {verdicts['auc']}), Pointing Game "
        f"{avg['pointing_dense']:.1f} -> {avg[f'pointing_{variant}']:.1f} "
        f"({avg['pointing_delta']:+.1f} +- {avg['pointing_se']:.1f}, {verdicts['pointing']}); "
        f"the AUC rises on {raised} of {len(rules)} rules. **Verdict** (both scores rise, at one "
        f"standard error): the claim {both}.")


# --------------------------------------------------------------------------------------------
# The book's layouts and sentences
# --------------------------------------------------------------------------------------------

PAPER_AUC_GAIN = (3.0, 12.0)
"""The paper's range of SPADE's average Trojan AUC gain over the dense model, in points, across
its settings (Table B.2)."""


def class_change(source: int, target: int, classes: Sequence[str] | None = None) -> str:
    """``"Coat -> Bag"``: the class names of a decision's source and target.

    ``classes`` defaults to :data:`spade_lib.data.FASHION_CLASSES`; an index outside it is
    written ``"class 5"`` (a full-scale folder's Trojan target beyond its own classes).
    """
    if classes is None:
        from spade_lib.data import FASHION_CLASSES as classes

    def name(k: int) -> str:
        return classes[k] if 0 <= k < len(classes) else f"class {k}"

    return f"{name(int(source))} -> {name(int(target))}"


def _book_layout(table: pd.DataFrame, variant: str, baseline: str, label: str) -> pd.DataFrame:
    """Dense / ``label`` / delta / +- se for the AUC and the Pointing Game, two-level columns,
    from a :func:`summary`-shaped table (also :func:`rule_table`)."""
    out = pd.DataFrame({
        (name, head): table[f"{metric}_{column}"]
        for name, metric in (("AUC", "auc"), ("Pointing Game", "pointing"))
        for head, column in (("Dense", baseline), (label, variant), ("delta", "delta"),
                             ("+- se", "se"))})
    out.index.name = None
    return out


def table_b2(results: pd.DataFrame, variant: str = "spade", baseline: str = "dense",
             label: str = "SPADE") -> pd.io.formats.style.Styler:
    """Table B.2 as the book prints it: per method, Dense / ``label`` / delta / standard error
    for the Trojan AUC and the Pointing Game (in %, one decimal), from :func:`summary`.

    The columns are a two-level index (``("AUC", "Dense")`` ...); the Styler's ``data`` holds the
    numbers and its caption the sample count.
    """
    s = summary(results, variant, baseline)
    out = _book_layout(s, variant, baseline, label)
    out.index.name = None
    return out.style.format("{:.1f}").set_caption(
        f"{s['n'].iloc[-1]} samples; each number is the better of the two channel aggregations' "
        "means (the paper's number); delta +- standard error of the per-sample difference")


def headline(results: pd.DataFrame, variant: str = "spade", label: str = "SPADE") -> str:
    """One sentence (Markdown) on ``variant`` against dense: the average AUC and Pointing Game
    before and after with delta +- standard error, and on how many methods the AUC rose."""
    table = summary(results, variant)
    s, per = table.loc["Average"], table.drop("Average")
    helped = int((per["auc_delta"] > 0).sum())
    return (f"{label} moves the average AUC from {s['auc_dense']:.1f} to {s[f'auc_{variant}']:.1f} "
            f"(**{s['auc_delta']:+.1f} +- {s['auc_se']:.1f}** points) and the Pointing Game from "
            f"{s['pointing_dense']:.1f} to {s[f'pointing_{variant}']:.1f} "
            f"({s['pointing_delta']:+.1f} +- {s['pointing_se']:.1f}); it raises the AUC of "
            f"{helped} of {len(per)} methods.")


def range_verdict(value: float, se: float, low: float, high: float) -> str:
    """Whether ``value`` lies in ``[low, high]`` at one standard error ``se``.

    Returns ``"holds"`` (all of ``value +- se`` inside), ``"fails"`` (all of it outside),
    ``"inconclusive"`` (it straddles a bound, or ``se`` is NaN) or ``"not comparable"``
    (``value`` is NaN: a method without any score).
    """
    if math.isnan(value):
        return "not comparable"
    if math.isnan(se):
        return "inconclusive"
    lo, hi = value - se, value + se
    if low <= lo and hi <= high:
        return "holds"
    if hi < low or lo > high:
        return "fails"
    return "inconclusive"


def claim_verdict(delta: float, se: float, direction: float) -> str:
    """``"holds"`` when ``delta`` lies more than one standard error on the claimed side of 0
    (``direction`` +1: above, -1: below), ``"fails"`` when more than one standard error on the
    other side, ``"inconclusive"`` in between (or with a NaN ``se``; also a difference of exactly
    0 with no spread, e.g. a layer equal by construction), ``"not comparable"`` for a NaN
    ``delta``."""
    if math.isnan(delta):
        return "not comparable"
    if math.isnan(se):
        return "inconclusive"
    signed = direction * delta
    if signed > se:
        return "holds"
    if signed < -se:
        return "fails"
    return "inconclusive"


ALL_LAYERS = "all layers"
"""The label of the row that averages over layers (per sample or pair, then over them)."""


def spread(values: pd.Series) -> dict[str, float]:
    """``mean``, ``std`` (ddof 1), ``se`` and ``n`` of the non-NaN ``values``, and ``n_nan``
    (NaN statistics where too few values are left: mean with none, std and se with one)."""
    v = values.dropna()
    n = len(v)
    std = float(v.std(ddof=1)) if n > 1 else math.nan
    return {"mean": float(v.mean()) if n else math.nan, "std": std,
            "se": std / math.sqrt(n) if n > 1 else math.nan, "n": n,
            "n_nan": int(values.isna().sum())}


def layer_means(rows: pd.DataFrame, unit: Sequence[str], group: str, value: str) -> pd.DataFrame:
    """Per unit (sample or pair) and group (variant or kind): the mean of ``value`` over layers
    (NaN when any layer is NaN: an average over fewer layers is not comparable)."""
    return (rows.groupby([group, *unit], sort=False)[value]
            .agg(lambda v: v.mean(skipna=False)).rename(value).reset_index())


def gain_sentence(results: pd.DataFrame, variant: str = "spade",
                  paper: tuple[float, float] = PAPER_AUC_GAIN) -> str:
    """The sentence that sets the average AUC gain of ``variant`` over dense against the paper's
    range (:data:`PAPER_AUC_GAIN`), with the verdict of :func:`range_verdict`."""
    s = summary(results, variant).loc["Average"]
    gain, se = float(s["auc_delta"]), float(s["auc_se"])
    low, high = paper
    verdict = range_verdict(gain, se, low, high)
    start = (f"The paper's SPADE raises the average AUC by {low:g} to {high:g} points across its "
             "settings")
    if verdict == "not comparable":
        return f"{start}; the gain here is not comparable (a method has no score on any sample)."
    place = "within" if low <= gain <= high else "below" if gain < low else "above"
    meaning = {"holds": "the paper's range holds at one standard error",
               "fails": "the paper's range fails at one standard error",
               "inconclusive": "one standard error reaches across a bound of the range, so the "
                               "comparison is inconclusive"}[verdict]
    return f"{start}; the gain here is {place} that range: {meaning}."


def difference_sentence(results: pd.DataFrame, variant: str, baseline: str, label: str,
                        baseline_label: str) -> str:
    """``variant`` against ``baseline`` on the average AUC: delta +- standard error and whether
    the difference exceeds one standard error (else: no difference shown)."""
    s = summary(results, variant, baseline).loc["Average"]
    delta, se = float(s["auc_delta"]), float(s["auc_se"])
    text = f"{label} against {baseline_label}: **{delta:+.1f} +- {se:.1f}** AUC points on average"
    if math.isnan(delta) or math.isnan(se):
        return f"{text}; no verdict (too few scores)."
    if abs(delta) <= se:
        return f"{text}; the difference is within one standard error, so none is shown."
    side = "ahead of" if delta > 0 else "behind"
    return f"{text}; {label} is {side} {baseline_label} by more than one standard error."


OVERVIEW_COLUMNS = {
    "auc_dense": "AUC dense", "auc_spade": "AUC SPADE", "auc_delta": "AUC delta",
    "auc_se": "+- se", "pointing_dense": "PG dense", "pointing_spade": "PG SPADE",
    "pointing_delta": "PG delta", "n": "samples",
}
"""Columns of :func:`overview`: :func:`summary` column -> printed name."""


def overview(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The cross-model overview: one row per model (``label -> results table``), the ``Average``
    row of its :func:`summary` (dense vs ``spade``), columns :data:`OVERVIEW_COLUMNS`. A model
    whose table is empty (say, :func:`on_kept` where SPADE kept no sample) gets NaN scores and
    0 samples."""
    empty = pd.Series({c: 0 if c == "n" else math.nan for c in OVERVIEW_COLUMNS})
    rows = {label: summary(t)[list(OVERVIEW_COLUMNS)].loc["Average"] if len(t) else empty
            for label, t in tables.items()}
    out = pd.DataFrame(rows).T
    out.columns = list(OVERVIEW_COLUMNS.values())
    return out
