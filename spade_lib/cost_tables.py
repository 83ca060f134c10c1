"""Table F.15's layout and verdict, the slope fits and the plots, from :mod:`spade_lib.cost`'s runs.

The measurements (:mod:`spade_lib.cost`: :func:`~spade_lib.cost.spade_timings`,
:func:`~spade_lib.cost.sparse_fc_timing`, :func:`~spade_lib.cost.sweep`, the benchmark's results
file) are read here:

* :data:`PAPER_F15` / :func:`paper_table`: Table F.15 of the paper as printed and as data (ratios,
  break-even counts). Sparse FC is fitted once for all samples, SPADE once per sample, so the
  ratio of the two is also the number of samples SPADE explains in the time Sparse FC needs to
  explain its first (the *break-even* count).
* :func:`table_f15` / :func:`f15_view` / :func:`f15_sentence`: Table F.15's layout for our models
  with the ratios and the verdict on the paper's claim, computed from the numbers
  (:func:`spade_lib.tables.range_verdict`); :func:`phase_means` and :func:`layer_comparison`
  break the time down.
* :func:`fit_slope` / :func:`slopes` (log-log) and :func:`fit_line` / :func:`extrapolate`
  (straight line): how the trace time grows with the augmentations, the sparsity and the model
  size (:func:`size_table`), with standard errors; :func:`plot_loglog` draws a fit.
* :func:`solver_bench_table` / :func:`solver_bench_sentence`: the batched FastOBC solver against
  the column-by-column one (``benchmarks/bench_solver.py``'s results file).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from spade_lib import tables
from spade_lib.cost import PHASES, SOLVERS, BenchResults, CostRun

__all__ = [
    "F15_COLUMNS", "PAPER_ARCHITECTURE", "PAPER_F15", "Line", "Slope", "extrapolate",
    "f15_sentence", "f15_view", "fit_line", "fit_slope", "layer_comparison", "paper_table",
    "phase_means", "plot_loglog", "size_table", "slopes", "solver_bench_sentence",
    "solver_bench_table", "table_f15",
]

# --------------------------------------------------------------------------------------------
# The paper's table
# --------------------------------------------------------------------------------------------

PAPER_F15: tuple[dict[str, Any], ...] = (
    {"architecture": "ResNet50", "gpu": "NVIDIA GeForce RTX 2080 Ti (12 G)",
     "spade_minutes": 41.0, "sparse_fc_hours": 40.0},
    {"architecture": "MobileNetV2", "gpu": "NVIDIA GeForce RTX 2080 Ti (12 G)",
     "spade_minutes": 12.0, "sparse_fc_hours": 53.0},
    {"architecture": "ConvNeXt-T", "gpu": "NVIDIA GeForce RTX 3090 (24 G)",
     "spade_minutes": 46.0, "sparse_fc_hours": 21.0},
)
"""Table F.15 of the paper as printed: the time to prepare the first interpretation with SPADE
(minutes) and with Sparse FC (hours), and the GPU it was measured on."""

PAPER_ARCHITECTURE = {
    "resnet18": "ResNet50", "resnet20": "ResNet50", "tv_resnet50": "ResNet50",
    "mobilenetv2": "MobileNetV2", "tv_mobilenetv2": "MobileNetV2",
    "convnext": "ConvNeXt-T", "tv_convnext_t": "ConvNeXt-T",
}
"""Our architecture -> the row of Table F.15 it stands in for."""


def paper_table() -> pd.DataFrame:
    """Table F.15 as data: per architecture the GPU, SPADE's and Sparse FC's seconds, their
    ratio (SPADE / Sparse FC) and the break-even count (Sparse FC / SPADE: samples SPADE explains
    in the time Sparse FC takes to its first)."""
    rows = [{"architecture": r["architecture"], "gpu": r["gpu"],
             "spade_seconds": 60 * r["spade_minutes"],
             "sparse_fc_seconds": 3600 * r["sparse_fc_hours"]} for r in PAPER_F15]
    out = pd.DataFrame(rows).set_index("architecture")
    out["ratio"] = out["spade_seconds"] / out["sparse_fc_seconds"]
    out["break_even"] = out["sparse_fc_seconds"] / out["spade_seconds"]
    return out


# --------------------------------------------------------------------------------------------
# Table F.15 and the verdict
# --------------------------------------------------------------------------------------------

F15_COLUMNS = ("paper_architecture", "solver", "n", "seconds", "se", "sparse_fc_seconds",
               "sparse_fc_loaded", "ratio", "ratio_se", "break_even", "paper_ratio")
"""Columns of :func:`table_f15`."""


def table_f15(runs: Mapping[str, tuple[CostRun, Mapping[str, Any]]]) -> pd.DataFrame:
    """Table F.15 for our models: per model and solver, SPADE's mean time to the first
    interpretation against the Sparse FC baseline's.

    Parameters
    ----------
    runs
        Model label -> ``(spade_timings result, sparse_fc_timing result)``.

    Returns
    -------
    pandas.DataFrame
        Indexed by ``(model, solver label)``; columns :data:`F15_COLUMNS`: the Table F.15 row it
        stands in for, samples ``n``, mean seconds and its standard error over samples, Sparse
        FC's seconds (one fit; ``sparse_fc_loaded``: recorded when a cached fit was made),
        ``ratio`` = SPADE / Sparse FC with ``ratio_se`` (SPADE's error
        only: the fit is measured once), ``break_even`` = 1 / ratio and the paper's ratio for
        that architecture (its SPADE is OBC).
    """
    paper = paper_table()
    rows = []
    for label, (run, sparse) in runs.items():
        arch = str(run.samples["arch"].iloc[0])
        for solver in SOLVERS:
            first = run.samples.loc[run.samples["solver"] == solver, "first"]
            mean, se = float(first.mean()), tables.standard_error(first)
            fc = float(sparse["prepare"])
            ratio = mean / fc if fc > 0 else math.nan
            rows.append({"model": label, "solver_label": {"obc": "SPADE (OBC)",
                                                          "fastobc": "SPADE (FastOBC)"}[solver],
                         "paper_architecture": PAPER_ARCHITECTURE.get(arch), "solver": solver,
                         "n": len(first), "seconds": mean, "se": se, "sparse_fc_seconds": fc,
                         "sparse_fc_loaded": bool(sparse.get("loaded", False)),
                         "ratio": ratio, "ratio_se": se / fc if fc > 0 else math.nan,
                         "break_even": 1 / ratio if ratio > 0 else math.nan,
                         "paper_ratio": paper["ratio"].get(PAPER_ARCHITECTURE.get(arch),
                                                           math.nan)})
    out = pd.DataFrame(rows).set_index(["model", "solver_label"])
    out.index.names = ["model", "SPADE"]
    return out[list(F15_COLUMNS)]


def _percent(x: float) -> str:
    """``x`` in percent with three significant digits, without an exponent."""
    if math.isnan(x):
        return "nan%"
    p = 100 * x
    digits = 0 if p == 0 else max(0, 2 - math.floor(math.log10(abs(p))))
    return f"{p:.{digits}f}%"


def f15_sentence(table: pd.DataFrame) -> str:
    """The paper's claim from Table F.15 and the verdicts on it, computed from ``table``
    (:func:`table_f15`).

    Two questions per row, each by :func:`spade_lib.tables.range_verdict` at one standard error:
    is SPADE's first interpretation ready before Sparse FC's (ratio in ``[0, 1]``), and is the
    ratio within the paper's range of ratios (smallest to largest over its three rows)?
    """
    paper = paper_table()
    low, high = float(paper["ratio"].min()), float(paper["ratio"].max())
    start = (f"The paper (Table F.15, on GPUs) prepares SPADE's first interpretation in "
             f"{paper['spade_seconds'].min() / 60:g}-{paper['spade_seconds'].max() / 60:g} "
             f"minutes against {paper['sparse_fc_seconds'].min() / 3600:g}-"
             f"{paper['sparse_fc_seconds'].max() / 3600:g} hours for Sparse FC: SPADE takes "
             f"{100 * low:.2g}% to {100 * high:.2g}% of Sparse FC's time.")
    parts, sooner, within = [], {}, {}
    for (model, label), row in table.iterrows():
        ratio, se = float(row["ratio"]), float(row["ratio_se"])
        sooner.setdefault(label, []).append(tables.range_verdict(ratio, se, 0.0, 1.0))
        within.setdefault(label, []).append(tables.range_verdict(ratio, se, low, high))
        parts.append(f"{model}, {label}: {_percent(ratio)} +- {_percent(se)}")
    lines = [start, "Here: " + "; ".join(parts) + "."]
    for label in sooner:
        n = len(sooner[label])
        count = {v: sooner[label].count(v) for v in ("holds", "fails", "inconclusive")}
        inside = {v: within[label].count(v) for v in ("holds", "fails", "inconclusive")}
        lines.append(
            f"**{label}**: ready before Sparse FC **holds** on {count['holds']} of {n} models, "
            f"fails on {count['fails']}, inconclusive on {count['inconclusive']}; the ratio lies "
            f"in the paper's range on {inside['holds']}, outside on {inside['fails']}, "
            f"inconclusive on {inside['inconclusive']} (one standard error).")
    return " ".join(lines)


def f15_view(table: pd.DataFrame) -> pd.io.formats.style.Styler:
    """:func:`table_f15` as the book prints it, the paper's row beside each of ours: seconds with
    standard error and ``n``, Sparse FC's seconds, the ratio in % and the break-even count."""
    paper = paper_table()
    arch = table["paper_architecture"]
    out = pd.DataFrame({
        ("ours", "SPADE (s)"): table["seconds"], ("ours", "+- se"): table["se"],
        ("ours", "n"): table["n"], ("ours", "Sparse FC (s)"): table["sparse_fc_seconds"],
        ("ours", "SPADE / Sparse FC (%)"): 100 * table["ratio"],
        ("ours", "+- se (%)"): 100 * table["ratio_se"],
        ("ours", "break-even samples"): table["break_even"],
        ("paper", "row"): arch,
        ("paper", "SPADE (min)"): arch.map(paper["spade_seconds"] / 60).to_numpy(),
        ("paper", "Sparse FC (h)"): arch.map(paper["sparse_fc_seconds"] / 3600).to_numpy(),
        ("paper", "SPADE / Sparse FC (%)"): 100 * table["paper_ratio"],
        ("paper", "break-even samples"): 1 / table["paper_ratio"],
    })
    numbers = [c for c in out.columns if c not in (("paper", "row"), ("ours", "n"))]
    return out.style.format("{:.3g}", subset=numbers).format(
        "{:.0f}", subset=[("ours", "n")]).set_caption(
        "Time to the first interpretation: SPADE (mean over samples +- standard error) and the "
        "Sparse FC fit (one fit); break-even = how many samples SPADE explains in Sparse FC's "
        "time. The paper's SPADE is OBC, on a GPU (Table F.15).")


def phase_means(runs: Mapping[str, CostRun]) -> pd.DataFrame:
    """Mean seconds of each of :data:`PHASES` per model and solver (label -> run)."""
    frames = [run.samples.assign(model=label) for label, run in runs.items()]
    out = pd.concat(frames).groupby(["model", "solver"], sort=False)[list(PHASES)].mean()
    out["n"] = pd.concat(frames).groupby(["model", "solver"], sort=False).size()
    return out


def layer_comparison(run: CostRun) -> pd.DataFrame:
    """Per pruned layer: shape, inputs per row, FastOBC's and OBC's seconds, the rows OBC was
    timed on, and OBC / FastOBC."""
    layers = run.layers.set_index(["solver", "layer"])
    fast, obc = layers.loc["fastobc"], layers.loc["obc"]
    out = pd.DataFrame({"shape": obc["shape"].map(str), "inputs per row": obc["columns"],
                        "FastOBC (s)": fast["seconds"], "OBC (s)": obc["seconds"],
                        "OBC rows timed": obc["rows_timed"].astype(str) + " of "
                        + obc["rows"].astype(str), "timed as": obc["timed_as"]})
    out["OBC / FastOBC"] = out["OBC (s)"] / out["FastOBC (s)"]
    return out


def size_table(bench: BenchResults, at: int = 1024) -> pd.DataFrame:
    """Per model of a benchmark run: parameters, prunable weights, layers, FastOBC's solver
    seconds (median over the augmentation counts; it does not depend on them), the Hessian and
    augmentation seconds as a line in the count (:func:`fit_line`: ``fixed`` + ``per view``),
    and the trace carried to ``at`` augmentations along that line (``measured up to`` says how
    far it was measured)."""
    t = bench.traces.assign(views=bench.traces["augment"] + bench.traces["hessians"])
    about = t.groupby("model", sort=False)[["arch", "image_size", "parameters", "weights",
                                            "layers"]].first()
    about["solve (s)"] = t.groupby("model", sort=False)["solve"].median()
    line = extrapolate(t, "n_augmentations", "views", at, "model")
    about["measured up to"] = line["measured up to"].astype(int)
    about["views fixed (s)"] = line["fixed"]
    about["per view (s)"] = line["per unit"]
    about[f"trace at {at} (s)"] = line[f"at {at:g}"] + about["solve (s)"]
    return about


# --------------------------------------------------------------------------------------------
# Slopes and lines
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slope:
    """A least-squares line through ``(log x, log y)``: ``y ~ exp(intercept) * x**slope``.

    ``se`` is the slope's standard error (residual variance over ``n - 2`` degrees of freedom;
    NaN for fewer than three points), ``n`` the points used."""

    slope: float
    se: float
    intercept: float
    n: int

    def predict(self, x: float) -> float:
        """``exp(intercept) * x**slope``."""
        return float(math.exp(self.intercept) * x**self.slope)


def fit_slope(x: Sequence[float], y: Sequence[float]) -> Slope:
    """Log-log least squares: the exponent ``b`` of ``y ~ a * x**b`` with its standard error.

    Points with a non-positive or non-finite ``x`` or ``y`` are left out (they have no
    logarithm); fewer than two distinct ``x`` left give NaN.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of the same length, got {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    lx, ly = np.log(x[keep]), np.log(y[keep])
    n = int(keep.sum())
    if n < 2 or np.ptp(lx) == 0:
        return Slope(math.nan, math.nan, math.nan, n)
    dx = lx - lx.mean()
    slope = float((dx * (ly - ly.mean())).sum() / (dx**2).sum())
    intercept = float(ly.mean() - slope * lx.mean())
    if n < 3:
        return Slope(slope, math.nan, intercept, n)
    resid = ly - (intercept + slope * lx)
    se = float(math.sqrt((resid**2).sum() / (n - 2) / (dx**2).sum()))
    return Slope(slope, se, intercept, n)


def slopes(frame: pd.DataFrame, x: str, ys: Sequence[str], by: str | None = None) -> pd.DataFrame:
    """:func:`fit_slope` of each column of ``ys`` against ``x`` (per group of ``by``).

    Returns one row per (group and) column: ``slope``, ``se``, ``n``.
    """
    groups = [(None, frame)] if by is None else list(frame.groupby(by, sort=False))
    rows = []
    for key, part in groups:
        for y in ys:
            s = fit_slope(part[x], part[y])
            rows.append({**({by: key} if by else {}), "seconds of": y, "slope": s.slope,
                         "se": s.se, "n": s.n})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Line:
    """A least-squares line ``y ~ intercept + slope * x``; ``se`` is the slope's standard error
    (NaN for fewer than three points), ``n`` the points used."""

    intercept: float
    slope: float
    se: float
    n: int

    def predict(self, x: float) -> float:
        """``intercept + slope * x``."""
        return self.intercept + self.slope * x


def fit_line(x: Sequence[float], y: Sequence[float]) -> Line:
    """Ordinary least squares of ``y`` on ``x`` (non-finite points left out): a time with a
    fixed part and a part per unit, e.g. Hessian seconds against the augmentation count."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of the same length, got {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y, n = x[keep], y[keep], int(keep.sum())
    if n < 2 or np.ptp(x) == 0:
        return Line(math.nan, math.nan, math.nan, n)
    dx = x - x.mean()
    slope = float((dx * (y - y.mean())).sum() / (dx**2).sum())
    intercept = float(y.mean() - slope * x.mean())
    if n < 3:
        return Line(intercept, slope, math.nan, n)
    resid = y - (intercept + slope * x)
    return Line(intercept, slope, float(math.sqrt((resid**2).sum() / (n - 2) / (dx**2).sum())), n)


def extrapolate(frame: pd.DataFrame, x: str, y: str, at: float, by: str) -> pd.DataFrame:
    """Per group of ``by``: the straight line (:func:`fit_line`) of ``y`` on ``x`` carried to
    ``x = at``, beside the largest ``x`` measured so the reader sees how far it is carried.

    Returns one row per group: ``measured up to``, ``fixed`` (the intercept), ``per unit``
    (the slope) with its ``se``, and ``at {at}`` (the prediction).
    """
    rows = []
    for key, part in frame.groupby(by, sort=False):
        line = fit_line(part[x], part[y])
        rows.append({by: key, "measured up to": float(part[x].max()), "fixed": line.intercept,
                     "per unit": line.slope, "se": line.se, f"at {at:g}": line.predict(at)})
    return pd.DataFrame(rows).set_index(by)


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def plot_loglog(ax: Any, x: Sequence[float], y: Sequence[float], label: str,
                **style: Any) -> Slope:
    """Points ``(x, y)`` on log-log axes with their fitted line (:func:`fit_slope`), labelled
    with the slope and its standard error; returns the fit."""
    s = fit_slope(x, y)
    points = ax.loglog(x, y, "o", label=f"{label}: slope {s.slope:.2f} +- {s.se:.2f}", **style)
    if s.n >= 2:
        grid = np.geomspace(min(x), max(x), 20)
        ax.loglog(grid, [s.predict(g) for g in grid], "-", color=points[0].get_color(), lw=1)
    return s


# --------------------------------------------------------------------------------------------
# The batched FastOBC solver (benchmarks/bench_solver.py)
# --------------------------------------------------------------------------------------------

SOLVER_BENCH_COLUMNS = {
    "samples": "samples", "solver": "solver", "ops_per_sample": "operations per sample",
    "views_per_sample": "views per sample", "seconds_per_sample": "seconds per sample",
    "mask_differs_%": "masks differ (% of weights)", "max_weight_diff": "largest weight difference",
    "ops_ratio": "fewer operations (x)", "speedup": "speed-up (x)",
}
"""The columns of :func:`solver_bench_table`, renamed from the results file's keys."""


def solver_bench_table(record: Mapping[str, Any]) -> pd.DataFrame:
    """The benchmark's rows: per sample, operations dispatched (views apart) and seconds of the
    column-by-column and the batched FastOBC on ResNet-50's 53 layers, and how far apart their
    results are; the ratios set the batched solver against the column one of the same run."""
    frame = pd.DataFrame(record["rows"])
    return frame.reindex(columns=list(SOLVER_BENCH_COLUMNS)).rename(
        columns=SOLVER_BENCH_COLUMNS)


def solver_bench_sentence(record: Mapping[str, Any]) -> str:
    """One sentence per batch size: how many times fewer operations the batched solver
    dispatches than the column one and how its time compares, from the numbers."""
    frame = pd.DataFrame(record["rows"])
    parts = []
    for samples, rows in frame.groupby("samples", sort=True):
        by = rows.set_index("solver")
        if not {"columns", "batched"} <= set(by.index):
            continue
        old, new = by.loc["columns"], by.loc["batched"]
        speed = old["seconds_per_sample"] / new["seconds_per_sample"]
        pace = (f"{speed:.2f}x as fast" if speed >= 1.05 else
                f"{1 / speed:.2f}x slower" if speed <= 1 / 1.05 else "about as fast")
        what = "one sample" if samples == 1 else f"a batch of {samples}"
        parts.append(f"For {what}, the batched solver dispatches "
                     f"{old['ops_per_sample'] / new['ops_per_sample']:.1f}x fewer operations "
                     f"({new['ops_per_sample']:,.0f} instead of {old['ops_per_sample']:,.0f} per "
                     f"sample) and is {pace} ({new['seconds_per_sample']:.2f} s instead of "
                     f"{old['seconds_per_sample']:.2f} s per sample); the two masks differ in "
                     f"{new['mask_differs_%']:.4f}% of the weights.")
    return " ".join(parts) if parts else "The results file has no pair of solvers to compare."
