"""Table J.18's layouts, verdicts and curves, from the rows of :func:`spade_lib.insertion.evaluate`.

The runner (:mod:`spade_lib.insertion`) keeps one tidy row per sample, method, variant and channel
aggregation. This module reads those rows: :func:`summary` and :func:`differences` are the tidy
numbers (means, paired differences, standard errors, counts) behind :func:`table_j18`, the paper's
layout beside the paper's own numbers (:data:`PAPER_J18`); :func:`claim_sentence` gives the verdict
on the paper's claim, computed at one standard error (:func:`spade_lib.tables.claim_verdict`);
:func:`endpoints_sentence` says how much room the curves have; :func:`timings` is the cost table;
:func:`mean_curves` and :func:`plot_curves` draw the mean curves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from spade_lib import metrics
from spade_lib.insertion import SPARSE_FC, VARIANTS
from spade_lib.tables import claim_verdict, standard_error

__all__ = [
    "LABELS", "METRICS", "PAPER_J18", "PAPER_J18_GAIN", "claim_sentence", "claim_verdict",
    "differences", "endpoints", "endpoints_sentence", "mean_curves", "plot_curves", "summary",
    "table_j18", "timings",
]


# --------------------------------------------------------------------------------------------
# Names, and the paper's numbers
# --------------------------------------------------------------------------------------------

LABELS = {"dense": "Dense", SPARSE_FC: "Sparse FC", "spade": "SPADE"}
"""Printed names of the variants."""

METRICS = ("insertion", "deletion")
"""The two games; higher insertion and lower deletion are better."""

_PAPER_ROWS = {
    "Saliency": (67.98, 68.13, 85.81, 5.03, 4.9, 2.5),
    "InputXGradient": (66.64, 66.96, 84.29, 5.24, 5.12, 2.54),
    "DeepLift": (84.77, 84.88, 87.29, 2.23, 2.33, 1.92),
    "LRP": (84.25, 88.5, 92.88, 2.92, 2.41, 1.67),
    "GuidedBackprop": (81.4, 81.64, 84.75, 2.08, 2.07, 1.93),
    "GuidedGradCam": (87.61, 87.64, 88.54, 1.64, 1.71, 1.62),
    "Lime": (95.25, 94.63, 93.55, 4.58, 5.32, 5.51),
    "Occlusion": (74.91, 72.57, 88.89, 4.5, 4.94, 2.35),
    "IntegratedGradients": (73.92, 75.08, 85.1, 3.87, 3.65, 2.28),
    "GradientShap": (73.24, 73.99, 86.3, 3.62, 3.5, 2.12),
    "Average": (79.0, 79.4, 87.74, 3.57, 3.6, 2.45),
}

PAPER_J18 = pd.DataFrame(
    _PAPER_ROWS.values(), index=pd.Index(list(_PAPER_ROWS), name="method"),
    columns=pd.MultiIndex.from_product([METRICS, VARIANTS], names=["metric", "variant"]))
"""The paper's Table J.18 (ResNet-50 on ImageNet; normalised areas in %), as printed, with our
method names."""

PAPER_J18_GAIN = 8.77
"""The average insertion gain of SPADE over dense that the paper's text of Appendix J states
(its table's averages differ by 8.74); the text also says SPADE helps 9 of the 10 methods."""


# --------------------------------------------------------------------------------------------
# Tidy numbers
# --------------------------------------------------------------------------------------------

def _column(metric: str, normalised: bool) -> str:
    """The area column of ``metric`` (normalised or not); refuses an unknown metric."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
    return f"{metric}_normalised" if normalised else metric


def _choose(rows: pd.DataFrame, metric: str, normalised: bool,
            aggregation: str) -> pd.DataFrame:
    """Per (method, variant): the aggregation used and its per-sample values.

    ``aggregation="best"`` takes, per method and variant, the aggregation with the better mean
    (higher insertion, lower deletion; one with no score never wins; ``sum`` on a tie), as the
    book reports Table B.2. Returns the long frame ``method, variant, sample, value,
    aggregation``.
    """
    column = _column(metric, normalised)
    if aggregation not in ("best", *metrics.AGGREGATIONS):
        raise ValueError(f"unknown aggregation {aggregation!r}; allowed: best, "
                         f"{', '.join(metrics.AGGREGATIONS)}")
    keys = ["method", "variant"]
    means = rows.groupby([*keys, "aggregation"], sort=False)[column].mean().unstack()
    means = means.reindex(columns=list(metrics.AGGREGATIONS))
    if aggregation == "best":
        sign = 1.0 if metric == "insertion" else -1.0
        score = (sign * means).fillna(-math.inf)
        pick = np.where(score["abs"] > score["sum"], "abs", "sum")
    else:
        pick = np.full(len(means), aggregation)
    chosen = pd.DataFrame({"aggregation": pick}, index=means.index).reset_index()
    out = rows.merge(chosen, on=[*keys, "aggregation"])
    return out[[*keys, "sample", "aggregation"]].assign(value=out[column].to_numpy())


def summary(rows: pd.DataFrame, normalised: bool = True, aggregation: str = "best",
            percent: bool = True) -> pd.DataFrame:
    """Mean insertion and deletion per method and variant, with standard errors (tidy).

    Parameters
    ----------
    rows
        The table from :func:`spade_lib.insertion.evaluate`.
    normalised
        The paper's areas divided by the full image's probability (``True``), or the raw areas.
    aggregation
        ``"best"`` (per method and variant the better aggregation, labelled), ``"sum"`` or
        ``"abs"``.
    percent
        Scale by 100, as the paper prints them.

    Returns
    -------
    pandas.DataFrame
        Columns ``metric, method, variant, value, se, n, aggregation``: one row per metric,
        method (plus ``Average``: the mean of the methods' values, NaN if one is NaN; its ``se``
        and ``n`` are over the samples every method scores) and variant. ``n`` counts the
        samples with a score (constant maps have none).
    """
    scale = 100.0 if percent else 1.0
    methods = list(dict.fromkeys(rows["method"]))
    variants = list(dict.fromkeys(rows["variant"]))
    out = []
    for metric in METRICS:
        long = _choose(rows, metric, normalised, aggregation)
        for v in variants:
            part = long[long["variant"] == v]
            wide = part.pivot(index="sample", columns="method", values="value")
            wide = wide.reindex(columns=methods)
            for m in methods:
                label = part.loc[part["method"] == m, "aggregation"]
                out.append({"metric": metric, "method": m, "variant": v,
                            "value": scale * wide[m].mean(),
                            "se": scale * standard_error(wide[m]),
                            "n": int(wide[m].notna().sum()),
                            "aggregation": label.iloc[0] if len(label) else None})
            every = wide.dropna()
            means = [r["value"] for r in out[-len(methods):]]
            out.append({"metric": metric, "method": "Average", "variant": v,
                        "value": float(np.mean(means)) if methods else math.nan,
                        "se": scale * standard_error(every.mean(axis=1)), "n": len(every),
                        "aggregation": None})
    return pd.DataFrame(out)


def differences(rows: pd.DataFrame, variant: str = "spade", baseline: str = "dense",
                normalised: bool = True, aggregation: str = "best",
                percent: bool = True) -> pd.DataFrame:
    """Paired differences ``variant - baseline`` per method and metric, with standard errors.

    Each side is on its own chosen aggregation (as in :func:`summary`). Returns columns
    ``metric, method, delta, se, n, better, worse``: ``delta`` is the mean per-sample
    difference over the samples both sides score (``n``), ``better`` / ``worse`` count samples
    on which ``variant`` is better (higher insertion, lower deletion) / worse; the ``Average``
    row is the per-sample mean over methods of the differences (samples every method scores).
    """
    have = set(rows["variant"])
    for name in (variant, baseline):
        if name not in have:
            raise ValueError(f"unknown variant {name!r}; the rows hold {sorted(have)}")
    scale = 100.0 if percent else 1.0
    methods = list(dict.fromkeys(rows["method"]))
    out = []
    for metric in METRICS:
        long = _choose(rows, metric, normalised, aggregation)
        side = {name: long[long["variant"] == name].pivot(
            index="sample", columns="method", values="value").reindex(columns=methods)
            for name in (variant, baseline)}
        diff = scale * (side[variant] - side[baseline])
        sign = 1.0 if metric == "insertion" else -1.0
        for m in [*methods, "Average"]:
            d = diff.dropna().mean(axis=1) if m == "Average" else diff[m].dropna()
            out.append({"metric": metric, "method": m, "delta": float(d.mean()) if len(d)
                        else math.nan, "se": standard_error(d), "n": len(d),
                        "better": int((sign * d > 0).sum()), "worse": int((sign * d < 0).sum())})
    return pd.DataFrame(out)


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------

def table_j18(rows: pd.DataFrame, normalised: bool = True, aggregation: str = "best",
              paper: bool = True) -> pd.io.formats.style.Styler:
    """Table J.18 as the book prints it: per method, insertion and deletion for each variant
    (mean +- standard error, in %), and, with ``paper``, the paper's numbers beside them
    (:data:`PAPER_J18`, normalised areas; shown only when ``normalised``).

    The caption says what the numbers are: normalised or not, the sample count and the
    aggregation rule.
    """
    s = summary(rows, normalised, aggregation)
    methods = list(dict.fromkeys(s["method"]))
    variants = list(dict.fromkeys(s["variant"]))
    cells: dict[tuple[str, str], list[str]] = {}
    arrows = {"insertion": "Insertion (higher is better)",
              "deletion": "Deletion (lower is better)"}
    for metric in METRICS:
        part = s[s["metric"] == metric].set_index(["method", "variant"])
        for v in variants:
            cells[(arrows[metric], LABELS.get(v, v))] = [
                _cell(part.loc[(m, v), "value"], part.loc[(m, v), "se"]) for m in methods]
        if paper and normalised:
            for v in VARIANTS:
                cells[(arrows[metric], f"paper: {LABELS[v]}")] = [
                    f"{PAPER_J18.loc[m, (metric, v)]:.2f}" if m in PAPER_J18.index else ""
                    for m in methods]
    out = pd.DataFrame(cells, index=pd.Index(methods, name=None))
    n = int(rows["sample"].nunique())
    what = ("area under the curve divided by the dense model's probability on the full image "
            "(the paper's normalisation)" if normalised else
            "area under the probability curve, unnormalised")
    rule = ("per method and variant the better of the signed-sum and abs-sum maps" if
            aggregation == "best" else f"the {aggregation} aggregation of each map")
    return out.style.set_caption(f"{n} samples; {what}, in %; mean +- standard error; {rule}")


def endpoints(rows: pd.DataFrame) -> pd.DataFrame:
    """Per sample, the dense model's probability of the explained class on the full image
    (``full``), on the insertion canvas (``canvas``: the blurred image, where every insertion curve
    starts) and on the deletion canvas (``constant``: where every deletion curve ends)."""
    first = rows.drop_duplicates("sample").set_index("sample")
    return pd.DataFrame({"full": first["full_probability"],
                         "canvas": [c[0] for c in first["insertion_curve"]],
                         "constant": [c[-1] for c in first["deletion_curve"]]})


def endpoints_sentence(rows: pd.DataFrame, what: str = "the Trojan samples") -> str:
    """How much room the curves have: the mean probabilities of :func:`endpoints`. An insertion
    curve runs from the blurred canvas's probability to the full image's, so a canvas that
    already convinces the model leaves insertion no room to tell maps apart."""
    e = endpoints(rows).mean()
    return (f"On {what} the dense model gives its predicted class a mean probability of "
            f"{e['full']:.3f} on the full image, {e['canvas']:.3f} on the blurred image (where "
            f"insertion starts: {100 * e['canvas'] / e['full']:.0f}% of the full image's) and "
            f"{e['constant']:.3f} on the constant image (where deletion ends).")


def timings(rows: pd.DataFrame) -> pd.DataFrame:
    """Seconds per map (mean over samples) of each method (rows) and variant (columns), plus the
    mean trace time per sample of each variant (row ``trace``) and the sample count (``n``)."""
    per_map = rows.drop_duplicates(["sample", "method", "variant"])
    table = per_map.pivot_table(index="method", columns="variant", values="attribution_seconds",
                                aggfunc="mean", sort=False)
    traces = per_map.drop_duplicates(["sample", "variant"]).groupby("variant", sort=False)
    table.loc["trace"] = traces["trace_seconds"].mean()
    table = table.rename(columns=LABELS)
    table["n"] = per_map.groupby("method", sort=False)["sample"].nunique().reindex(
        table.index).fillna(per_map["sample"].nunique()).astype(int)
    table.columns.name = None
    return table


def _cell(value: float, se: float) -> str:
    """One cell of :func:`table_j18`: ``value +- se`` to two decimals, ``n/a`` for NaN."""
    if math.isnan(value):
        return "n/a"
    return f"{value:.2f} +- {se:.2f}" if not math.isnan(se) else f"{value:.2f}"


# --------------------------------------------------------------------------------------------
# The verdict
# --------------------------------------------------------------------------------------------

def claim_sentence(rows: pd.DataFrame, what: str = "the Trojan samples",
                   normalised: bool = True, aggregation: str = "best") -> str:
    """The paper's claim of Appendix J and the verdict on it, computed from ``rows`` (Markdown).

    The claim: SPADE's maps have a higher insertion and a lower deletion area on the dense model
    than the dense model's own maps (the text: an average insertion gain of
    :data:`PAPER_J18_GAIN`, for 9 of 10 methods) and than Sparse FC's, while Sparse FC stays about
    level with dense. Each comparison is judged on the ``Average`` row's paired difference at one
    standard error (:func:`claim_verdict`): for SPADE whether the claimed direction holds, for
    Sparse FC against dense whether it is better, worse or level within one standard error. The
    paper's own difference of averages is printed beside each, for the size.
    """
    variants = set(rows["variant"])
    pairs = [(v, b) for v, b in (("spade", "dense"), ("spade", SPARSE_FC), (SPARSE_FC, "dense"))
             if {v, b} <= variants]
    lines = [_paper_claim(), "", f"**Here, on {what}** (paired differences of the average over "
             "methods, +- one standard error, in points):", ""]
    lines += [_pair_line(rows, v, b, normalised, aggregation) for v, b in pairs]
    lines += ["", "Higher insertion and lower deletion are better. The paper's text has deletion "
              "remove pixels in *increasing* order of importance, which contradicts its reading "
              "that lower is better; the decreasing order of the standard protocol is used here."]
    return "\n".join(lines)


def _paper_claim() -> str:
    """The paper's claim, with the averages of its Table J.18 and its text's gain (Markdown)."""
    paper = PAPER_J18.loc["Average"]
    return (f"**The paper** (ResNet-50, ImageNet, normalised areas): SPADE raises the average "
            f"insertion from {paper[('insertion', 'dense')]:.2f} (dense) to "
            f"{paper[('insertion', 'spade')]:.2f} (the text says +{PAPER_J18_GAIN:.2f}) and "
            f"lowers deletion from {paper[('deletion', 'dense')]:.2f} to "
            f"{paper[('deletion', 'spade')]:.2f}, for 9 of 10 methods; Sparse FC stays level "
            f"with dense ({paper[('insertion', SPARSE_FC)]:.2f} / "
            f"{paper[('deletion', SPARSE_FC)]:.2f}).")


def _pair_line(rows: pd.DataFrame, variant: str, baseline: str, normalised: bool,
               aggregation: str) -> str:
    """One bullet of :func:`claim_sentence`: ``variant`` against ``baseline`` on both games."""
    d = differences(rows, variant, baseline, normalised, aggregation).set_index(
        ["metric", "method"])
    n_methods = rows["method"].nunique()
    bits = [_game_verdict(d, metric, direction, variant, baseline, n_methods)
            for metric, direction in (("insertion", 1.0), ("deletion", -1.0))]
    n = int(d.loc[("insertion", "Average"), "n"])
    return (f"* {LABELS[variant]} against {LABELS[baseline]} ({n} "
            f"sample{'s' if n != 1 else ''}): " + "; ".join(bits) + ".")


def _game_verdict(d: pd.DataFrame, metric: str, direction: float, variant: str, baseline: str,
                  n_methods: int) -> str:
    """One game of :func:`_pair_line`: the ``Average`` row's paired difference ``d`` (indexed by
    metric and method), the paper's, the verdict, and the methods that do better."""
    avg = d.loc[(metric, "Average")]
    delta, se = float(avg["delta"]), float(avg["se"])
    verdict = claim_verdict(delta, se, direction)
    helped = int((direction * d.loc[metric].drop("Average")["delta"] > 0).sum())
    if verdict == "not comparable":
        return (f"{metric}: not comparable (no sample has a score from every method "
                "on both networks)")
    if variant == "spade":
        word = f"the claimed direction **{verdict}**"
    else:
        word = {"holds": "**better** than dense", "fails": "**worse** than dense",
                "inconclusive": "**level with dense** within one standard error"}[verdict]
    paper = PAPER_J18.loc["Average"]
    claimed = paper[(metric, variant)] - paper[(metric, baseline)]
    return (f"{metric} {delta:+.2f} +- {se:.2f} (paper {claimed:+.2f}): {word} "
            f"({helped} of {n_methods} methods better)")


# --------------------------------------------------------------------------------------------
# Curves
# --------------------------------------------------------------------------------------------

def mean_curves(rows: pd.DataFrame, method: str, metric: str = "insertion",
                aggregation: str = "best", normalised: bool = True) -> pd.DataFrame:
    """Mean curve per variant of one method: the probability (divided by the full image's, when
    ``normalised``) against the fraction of pixels inserted or deleted.

    Each variant's maps are taken on the aggregation :func:`summary` uses for them; constant maps
    are left out. Returns a frame indexed by ``fraction``, one column per variant.
    """
    _column(metric, normalised)
    part = rows[(rows["method"] == method) & ~rows["constant_map"]]
    if part.empty:
        raise ValueError(f"no scored rows of method {method!r}; the rows hold "
                         f"{sorted(set(rows['method']))}")
    chosen = _choose(part, metric, normalised, aggregation)
    picked = part.merge(chosen[["variant", "sample", "aggregation"]],
                        on=["variant", "sample", "aggregation"])
    out = {}
    for v, group in picked.groupby("variant", sort=False):
        curves = np.stack(group[f"{metric}_curve"].to_list())
        if normalised:
            curves = curves / group["full_probability"].to_numpy()[:, None]
        out[v] = curves.mean(0)
    steps = len(next(iter(out.values()))) - 1
    return pd.DataFrame(out, index=pd.Index(np.arange(steps + 1) / steps, name="fraction"))


def plot_curves(rows: pd.DataFrame, methods: Sequence[str], normalised: bool = True,
                aggregation: str = "best", title: str | None = None) -> Any:
    """Mean insertion and deletion curves per variant for each of ``methods``: a grid of
    matplotlib axes (rows: methods, columns: insertion, deletion), under ``title``. Returns the
    figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(methods), 2, figsize=(8, 2.6 * len(methods)), squeeze=False)
    for ax_row, method in zip(axes, methods, strict=True):
        for ax, metric in zip(ax_row, METRICS, strict=True):
            curves = mean_curves(rows, method, metric, aggregation, normalised)
            for v in curves.columns:
                ax.plot(curves.index, curves[v], label=LABELS.get(v, v))
            ax.set_title(f"{method}: {metric}")
            done = "inserted" if metric == "insertion" else "deleted"
            ax.set_xlabel(f"fraction of pixels {done}")
            ax.set_ylabel("p / p(full image)" if normalised else "probability")
    axes[0, 0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
