"""Computational cost (Appendix F): the time to the first interpretation, and how SPADE's grows.

Table F.15 of the paper gives, per architecture, the time to "preprocess the dense model to
interpret the first sample": SPADE's trace for one sample against the Sparse FC baseline's refit
of the final layer (Wong et al. 2021), on GPUs (:data:`PAPER_F15`). Sparse FC is fitted once for
all samples, SPADE once per sample, so the ratio of the two is also the number of samples SPADE
explains in the time Sparse FC needs to explain its first (the *break-even* count).

Here:

* :func:`spade_timings`: SPADE's time to the first interpretation on a preset's model, for both
  solvers: augmentations + Hessians + solver (:attr:`spade_lib.trace.Trace.timings`) plus one
  saliency map (:func:`spade_lib.attribution.attribute`). FastOBC is timed whole; exact OBC,
  whose greedy pass costs about ``rows * n^3`` per layer (``n`` inputs per row), is timed on a
  subset of each layer's rows where the whole layer would exceed a work budget, and scaled by
  the row count (:func:`solver_seconds`; the table says how much was timed).
* :func:`sparse_fc_timing`: the Sparse FC baseline's features and fit
  (:func:`spade_lib.baselines.sparse_fc`).
* :func:`table_f15` / :func:`f15_sentence`: Table F.15's layout with the ratios and the verdict on
  the paper's claim, computed from the numbers (:func:`spade_lib.tables.range_verdict`).
* :func:`sweep` and :func:`fit_slope`: how the trace time grows with the number of augmentations
  and the sparsity, with log-log slopes and their standard errors.
* :func:`write_results` / :func:`read_results`: the results file of ``benchmarks/bench_cost.py``
  (model size: the small networks and torchvision's at 224 px, on a CPU or a GPU).

Every measurement is cached under ``cfg.cache_path("cost", ...)`` by a hash of what determines it
*and of the machine* (:func:`machine`): a rebuild on the same machine reads the numbers back, and
another machine (or another thread count or torch version) measures again.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import math
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from spade_lib import attribution, hessians, pruning, tables
from spade_lib.augment import augmented_batches
from spade_lib.checks import check_choice, check_positive_int
from spade_lib.config import Config
from spade_lib.files import atomic_write
from spade_lib.models import device_of, fingerprint
from spade_lib.schedules import check_sparsity
from spade_lib.trace import Trace, trace

__all__ = [
    "F15_COLUMNS", "LAYER_COLUMNS", "PAPER_ARCHITECTURE", "PAPER_F15", "PHASES", "RESULTS_DIR",
    "ROW_BUDGET", "SOLVERS", "SWEEPS", "SWEEP_COLUMNS", "SWEEP_SPARSITIES", "BenchResults",
    "CostRun", "Line", "Slope", "bench_note", "extrapolate", "f15_sentence", "f15_view", "fit_line",
    "fit_slope", "layer_comparison", "machine", "machine_sentence", "paper_table", "phase_means",
    "plot_loglog", "read_results", "results_file", "size_table", "slopes", "solver_seconds",
    "sparse_fc_timing", "spade_timings", "sweep", "sweep_values", "table_f15", "write_results",
]

COST_FORMAT = 1
"""Version of the cached records; part of every cache key."""

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

SOLVERS = ("obc", "fastobc")
"""The solvers timed by :func:`spade_timings`: exact OBC (the paper's SPADE) and FastOBC."""

PHASES = ("augment", "hessians", "solve", "trace", "attribution", "first")
"""Columns (seconds) of :attr:`CostRun.samples`: the trace's phases, the trace in all, one
saliency map, and their sum, the time to the first interpretation."""

ROW_BUDGET = 5e7
"""Default work budget of :func:`solver_seconds` for OBC: at most this many ``rows * n^3`` units
(a fraction of a second on one core of this project's machine) are timed per layer shape, and
at least one row."""

SWEEP_SPARSITIES = (0.5, 0.8, 0.95, 0.99)
"""The uniform sparsities of :func:`sweep` over ``"sparsity"``."""

RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
"""Where ``benchmarks/bench_cost.py`` writes its results files (``cost-cpu.json``,
``cost-gpu.json``) for the book to read."""


# --------------------------------------------------------------------------------------------
# The paper's table
# --------------------------------------------------------------------------------------------

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
# The machine and the cache
# --------------------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine(device: str | torch.device = "cpu") -> dict[str, Any]:
    """What decides a timing besides the work: the CPU model (``/proc/cpuinfo``, else
    ``platform.processor()``), logical CPUs, torch's thread count, version and CPU kernel
    capability, and the GPU's name when ``device`` is a CUDA device (else ``None``)."""
    device = torch.device(device)
    return {
        "cpu": _cpu_model(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": str(torch.__version__), "capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def machine_sentence(record: Mapping[str, Any]) -> str:
    """``"AMD EPYC, 2 logical CPUs, 2 torch threads, torch 2.x (AVX2)"``, plus the GPU if any."""
    text = (f"{record['cpu']}, {record['cpus']} logical CPUs, {record['threads']} torch threads, "
            f"torch {record['torch']} ({record['capability']})")
    return f"{record['gpu']} GPU; host {text}" if record.get("gpu") else text


def _digest(spec: Mapping[str, Any]) -> str:
    blob = json.dumps(spec, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _cached(cfg: Config, kind: str, spec: Mapping[str, Any], compute: Callable[[], dict],
            cache: bool) -> tuple[dict, bool]:
    """``compute()`` (a JSON-able dict), kept in ``cost/{kind}-{key}.json`` where ``key`` hashes
    ``spec``, :data:`COST_FORMAT` and :func:`machine`. Returns ``(record, loaded)``."""
    here = machine(cfg.torch_device())
    key = _digest({"kind": kind, "spec": spec, "machine": here, "format": COST_FORMAT})
    path = cfg.cache_path("cost", f"{kind}-{key}.json")
    if cache and path.is_file():
        try:
            return json.loads(path.read_text()), True
        except (OSError, ValueError):  # a damaged file is measured again and replaced
            pass
    record = {**compute(), "machine": here, "spec": dict(spec), "key": key,
              "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "load_average": os.getloadavg()[0]}
    if cache:
        blob = json.dumps(record, indent=1, sort_keys=True, default=str).encode()
        atomic_write(path, lambda fh: fh.write(blob))
    return record, False


# --------------------------------------------------------------------------------------------
# Solver time per layer
# --------------------------------------------------------------------------------------------

LAYER_COLUMNS = ("layer", "shape", "rows", "columns", "solver", "rows_timed", "timed_seconds",
                 "seconds", "timed_as")
"""Columns of :func:`solver_seconds`."""


def solver_seconds(model: nn.Module, layer_hessians: Mapping[str, Tensor],
                   targets: Mapping[str, float], solver: str = "obc",
                   row_budget: float | None = ROW_BUDGET, progress: bool = False) -> pd.DataFrame:
    """Seconds the solver takes on each layer, timing each weight shape once.

    The solvers' work depends on the layer's shape, not on its values (OBC's greedy pass always
    runs every row to the end), so layers of equal shape share one timing (``timed_as`` names the
    layer timed). For OBC, where ``rows * n^3`` (its work; ``n`` = inputs per row) exceeds
    ``row_budget``, only the first ``k = max(1, row_budget // n^3)`` rows are pruned and the time
    is scaled by ``rows / k``. That scaling is exact for OBC run in batches of ``k`` rows (each
    row is solved on its own, and batches run one after another), so such a layer is timed with
    ``batch_bytes`` set to ``k`` rows' inverse Hessians: the time is that of OBC in batches of
    ``k`` rows, not of its default batches (``batch_bytes``, 256 MiB on a CPU), whose time per
    row differs with the cache (``benchmarks/bench_cost.py`` compares the two). Other solvers are
    always timed on every row (FastOBC factors one Hessian for the whole layer).

    Parameters
    ----------
    model
        The network whose layers' weights are pruned (not changed).
    layer_hessians
        Layer name -> ``[n, n]`` Hessian (e.g. :func:`spade_lib.hessians.layer_hessians`).
    targets
        Layer name -> sparsity in ``(0, 1)``.
    solver
        A name of :data:`spade_lib.pruning.SOLVERS`.
    row_budget
        OBC work units timed per shape at most; ``None`` times every row of every shape.
    progress
        Show a progress bar over layers.

    Returns
    -------
    pandas.DataFrame
        One row per layer, columns :data:`LAYER_COLUMNS`: ``timed_seconds`` on ``rows_timed``
        rows, ``seconds`` scaled to the whole layer.
    """
    check_choice(solver, tuple(pruning.SOLVERS), "solver")
    if row_budget is not None and not (isinstance(row_budget, int | float) and row_budget > 0):
        raise ValueError(f"row_budget must be a positive number or None, got {row_budget!r}")
    missing = [name for name in targets if name not in layer_hessians]
    if missing:
        raise ValueError(f"no Hessian for layers {missing}")
    modules = dict(model.named_modules())
    timed: dict[tuple[int, ...], dict[str, Any]] = {}
    rows = []
    for name in tqdm(targets, desc=f"{solver} per layer", disable=not progress):
        weight = modules[name].weight.detach()
        shape = tuple(weight.shape)
        n_rows, n = shape[0], math.prod(shape[1:])
        if shape not in timed:
            k = n_rows if row_budget is None or solver != "obc" else min(
                n_rows, max(1, int(row_budget // n**3)))
            h = layer_hessians[name]
            options = {} if k == n_rows else {"batch_bytes": k * n * n * max(4, h.element_size())}
            _, info = pruning.prune_layer(weight[:k], h, targets[name], solver, **options)
            timed[shape] = {"rows_timed": k, "timed_seconds": info.seconds,
                            "seconds": info.seconds * n_rows / k, "timed_as": name}
        rows.append({"layer": name, "shape": shape, "rows": n_rows, "columns": n,
                     "solver": solver, **timed[shape]})
    return pd.DataFrame(rows, columns=list(LAYER_COLUMNS))


# --------------------------------------------------------------------------------------------
# SPADE: time to the first interpretation
# --------------------------------------------------------------------------------------------

@dataclass
class CostRun:
    """SPADE's time to the first interpretation on one preset's model (:func:`spade_timings`).

    Attributes
    ----------
    samples
        One row per sample and solver: ``preset``, ``arch``, ``solver``, ``sample``, the seconds
        of :data:`PHASES`, ``solve_timed`` (share of the solver time measured rather than scaled
        from a subset of rows) and ``weights`` (prunable weights of the pruned layers).
    layers
        Per pruned layer of the first sample, both solvers' seconds (:func:`solver_seconds`
        layout; FastOBC's from the trace's report, every row timed).
    record
        The cached record: ``machine``, ``measured_at`` (UTC), ``load_average`` (1 min, when the
        measurement started), ``spec``.
    loaded
        Read back from the cache rather than measured now.
    """

    samples: pd.DataFrame
    layers: pd.DataFrame
    record: dict
    loaded: bool


def _trace_for_timing(cfg: Config, model: nn.Module, image: Tensor, seed: int,
                      sparsity: Any = None, n_augmentations: int | None = None) -> Trace:
    """A FastOBC trace as the evaluation runner makes it (``cfg``'s schedule, augmentations and
    batch size unless given)."""
    from spade_lib.results import TRACE_BATCH

    return trace(model, image, sparsity=cfg.sparsity if sparsity is None else sparsity,
                 pruner="fastobc", recipe=cfg.augment, batch_size=TRACE_BATCH, seed=seed,
                 n_augmentations=cfg.n_augmentations if n_augmentations is None
                 else n_augmentations)


def _sample_hessians(cfg: Config, model: nn.Module, image: Tensor, seed: int,
                     layers: Sequence[str]) -> dict[str, Tensor]:
    """The Hessians a trace of ``image`` with ``seed`` collects (same views, same layers)."""
    from spade_lib.results import TRACE_BATCH

    dense = copy.deepcopy(model).eval()
    image = image.to(device_of(model))
    views = augmented_batches(image, cfg.n_augmentations, cfg.augment, seed, TRACE_BATCH)
    return hessians.layer_hessians(dense, views, list(layers))


def _warm_up(cfg: Config, model: nn.Module, chosen: Any, method: str | None) -> None:
    """One untimed trace (and map) of the first sample: the first call of a process pays for
    lazy initialisation (kernel choice, allocations) that no later call does."""
    from spade_lib.samples import sample_seed

    sample = int(chosen.table["sample"].iloc[0])
    image = chosen.poisoned.float_images([sample])[0]
    tr = _trace_for_timing(cfg, model, image, sample_seed(cfg.seed, sample))
    if method is not None:
        attribution.attribute(tr.model, image[None], int(chosen.table["target"].iloc[0]), method)


def spade_timings(cfg: Config, model: nn.Module, samples: int = 3, method: str | None = None,
                  row_budget: float | None = ROW_BUDGET, cache: bool = True,
                  progress: bool = True) -> CostRun:
    """SPADE's time to the first interpretation on ``samples`` evaluation samples, OBC and FastOBC.

    For each of the first ``samples`` evaluation samples
    (:func:`spade_lib.samples.evaluation_samples`), a FastOBC trace with the preset's schedule,
    augmentations and the sample's seed is timed (augment, Hessians, solver:
    :attr:`spade_lib.trace.Trace.timings`), then one saliency map of the Trojan target with
    ``method`` on the pruned copy. The OBC rows reuse each sample's augmentation, Hessian and map
    times (they do not depend on the solver: the pruned copy is stored dense) with OBC's solver
    time on the first sample's Hessians (:func:`solver_seconds`, ``row_budget``) in place of
    FastOBC's. One untimed trace and map of the first sample come first: the first call of a
    process pays for set-up (kernel choice, allocations) that later calls do not.

    Parameters
    ----------
    cfg
        The preset: ``sparsity``, ``n_augmentations``, ``augment``, ``seed``, cache folder.
    model
        Its trained model (not changed).
    samples
        Samples timed (>= 1); fewer if the preset has fewer evaluation samples.
    method
        The saliency method of the first interpretation (default ``cfg.methods[0]``).
    row_budget, cache, progress
        See :func:`solver_seconds`; keep the measurement under ``cfg.cache_path("cost")`` keyed
        by the machine (:func:`machine`); progress bars.

    Returns
    -------
    CostRun
    """
    from spade_lib.results import RESULT_KEYS
    from spade_lib.samples import evaluation_samples, sample_seed

    samples = check_positive_int(samples, "samples")
    method = cfg.methods[0] if method is None else method
    check_choice(method, attribution.available(), "attribution method")
    spec = {"config": cfg.digest((*RESULT_KEYS, "sparsity", "arch", "width")),
            "model": fingerprint(model), "samples": samples, "method": method,
            "row_budget": row_budget, "device": cfg.torch_device()}

    def compute() -> dict:
        chosen = evaluation_samples(cfg, model)
        _warm_up(cfg, model, chosen, method)
        rows, layers = [], []
        for position in tqdm(range(min(samples, len(chosen))), desc=f"{cfg.name}: samples",
                             disable=not progress):
            info = chosen.table.iloc[position]
            sample, target = int(info["sample"]), int(info["target"])
            image = chosen.poisoned.float_images([sample])[0]
            seed = sample_seed(cfg.seed, sample)
            tr = _trace_for_timing(cfg, model, image, seed)
            attr = attribution.attribute(tr.model, image[None], target, method)
            t = tr.timings
            base = {"preset": cfg.name, "arch": cfg.arch, "sample": sample,
                    "augment": t["augment"], "hessians": t["hessians"],
                    "attribution": attr.seconds,
                    "weights": int(tr.report["shape"].map(math.prod).sum())}
            if position == 0:
                targets = dict(zip(tr.report["layer"], tr.report["target"], strict=True))
                stats = _sample_hessians(cfg, model, image, seed, list(targets))
                obc = solver_seconds(model, stats, targets, "obc", row_budget, progress)
                fast = obc.assign(solver="fastobc", rows_timed=obc["rows"],
                                  timed_seconds=tr.report["seconds"].to_numpy(),
                                  seconds=tr.report["seconds"].to_numpy(), timed_as=obc["layer"])
                layers = [*fast.to_dict("records"), *obc.to_dict("records")]
                obc_solve = float(obc["seconds"].sum())
                obc_timed = float(obc.drop_duplicates("timed_as")["timed_seconds"].sum()
                                  / obc.drop_duplicates("timed_as")["seconds"].sum())
            for solver, solve, timed in (("obc", obc_solve, obc_timed),
                                         ("fastobc", t["solve"], 1.0)):
                trace_s = t["total"] - t["solve"] + solve
                rows.append({**base, "solver": solver, "solve": solve, "trace": trace_s,
                             "first": trace_s + attr.seconds, "solve_timed": timed})
        return {"samples": rows, "layers": layers}

    record, loaded = _cached(cfg, "spade", spec, compute, cache)
    columns = ["preset", "arch", "solver", "sample", *PHASES, "solve_timed", "weights"]
    table = pd.DataFrame(record["samples"])[columns]
    layers = pd.DataFrame(record["layers"], columns=list(LAYER_COLUMNS))
    layers["shape"] = layers["shape"].map(tuple)
    return CostRun(table, layers, {k: v for k, v in record.items()
                                   if k not in ("samples", "layers")}, loaded)


def sparse_fc_timing(cfg: Config, model: nn.Module, refit: bool = False,
                     progress: bool = False) -> dict[str, Any]:
    """The Sparse FC baseline's time to its first interpretation: features + fit.

    Calls :func:`spade_lib.baselines.sparse_fc` (its own cache: a fit made earlier on this cache
    is read back with the times measured when it was fitted; ``refit`` fits again without
    reading or writing that cache). Scoring the fitted head on the test sets (its
    ``"evaluate"`` time) is not part of preparing an interpretation and is left out.

    Returns
    -------
    dict
        ``features``, ``fit`` and ``prepare`` (their sum) in seconds, and ``loaded`` (the times
        are those recorded when a cached fit was made).
    """
    from spade_lib import baselines

    fit = baselines.sparse_fc(cfg, model, progress=progress, cache=not refit)
    s = fit.seconds
    return {"features": float(s["features"]), "fit": float(s["fit"]),
            "prepare": float(s["features"]) + float(s["fit"]),
            "loaded": bool(s.get("loaded", False))}


# --------------------------------------------------------------------------------------------
# Table F.15 and the verdict
# --------------------------------------------------------------------------------------------

F15_COLUMNS = ("paper_architecture", "solver", "n", "seconds", "se", "sparse_fc_seconds",
               "sparse_fc_loaded", "ratio", "ratio_se", "break_even", "paper_ratio")
"""Columns of :func:`table_f15`."""


def _se(values: pd.Series) -> float:
    v = values.dropna()
    return float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan


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
            mean, se = float(first.mean()), _se(first)
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
# Scaling: sweeps and slopes
# --------------------------------------------------------------------------------------------

SWEEPS = ("n_augmentations", "sparsity")
"""Parameters :func:`sweep` varies."""

SWEEP_COLUMNS = ("parameter", "value", "repeat", "augment", "hessians", "solve", "total")
"""Columns of :func:`sweep`."""


def sweep_values(cfg: Config, parameter: str) -> tuple:
    """Default values of a sweep: ``n_augmentations`` from ``cfg.n_augmentations / 4`` to
    ``2 * cfg.n_augmentations`` in factors of 2 (at least 2); ``sparsity``
    :data:`SWEEP_SPARSITIES`."""
    check_choice(parameter, SWEEPS, "sweep parameter")
    if parameter == "sparsity":
        return SWEEP_SPARSITIES
    return tuple(sorted({max(2, int(cfg.n_augmentations * 2.0**k)) for k in range(-2, 2)}))


def sweep(cfg: Config, model: nn.Module, parameter: str, values: Sequence | None = None,
          repeats: int = 1, cache: bool = True, progress: bool = True) -> pd.DataFrame:
    """FastOBC trace times on the first evaluation sample as one parameter varies.

    ``"n_augmentations"`` keeps the preset's schedule; ``"sparsity"`` prunes every default layer
    to each value (uniform) with the preset's augmentations. Cached like :func:`spade_timings`.

    Returns
    -------
    pandas.DataFrame
        One row per value and repeat: ``parameter``, ``value``, ``repeat``, and seconds
        ``augment``, ``hessians``, ``solve``, ``total``.
    """
    from spade_lib.results import RESULT_KEYS
    from spade_lib.samples import evaluation_samples, sample_seed

    check_choice(parameter, SWEEPS, "sweep parameter")
    values = tuple(sweep_values(cfg, parameter) if values is None else values)
    repeats = check_positive_int(repeats, "repeats")
    if not values:
        raise ValueError("values must not be empty")
    for v in values:
        if parameter == "n_augmentations":
            check_positive_int(v, "n_augmentations value")
        else:
            check_sparsity(v, "sparsity value")
    spec = {"config": cfg.digest((*RESULT_KEYS, "sparsity", "arch", "width")),
            "model": fingerprint(model), "parameter": parameter, "values": list(values),
            "repeats": repeats, "device": cfg.torch_device()}

    def compute() -> dict:
        chosen = evaluation_samples(cfg, model)
        sample = int(chosen.table["sample"].iloc[0])
        image = chosen.poisoned.float_images([sample])[0]
        seed = sample_seed(cfg.seed, sample)
        _warm_up(cfg, model, chosen, None)
        rows = []
        for v in tqdm([(v, r) for v in values for r in range(repeats)],
                      desc=f"{parameter} sweep", disable=not progress):
            value, r = v
            kw = {parameter: value}
            t = _trace_for_timing(cfg, model, image, seed, **kw).timings
            rows.append({"parameter": parameter, "value": value, "repeat": r,
                         **{k: t[k] for k in ("augment", "hessians", "solve", "total")}})
        return {"rows": rows}

    record, _ = _cached(cfg, "sweep", spec, compute, cache)
    out = pd.DataFrame(record["rows"])[list(SWEEP_COLUMNS)]
    out.attrs["record"] = {k: v for k, v in record.items() if k != "rows"}
    return out


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
# The benchmark's results file
# --------------------------------------------------------------------------------------------

@dataclass
class BenchResults:
    """A results file of ``benchmarks/bench_cost.py``.

    Attributes
    ----------
    path
        Where it was read from.
    device
        ``"cpu"`` or the GPU's name.
    date
        When it was measured (UTC, ISO 8601).
    machine
        :func:`machine` of the run.
    traces
        One row per model and augmentation count: ``model``, ``arch``, ``image_size``,
        ``parameters``, ``weights`` (prunable), ``layers``, ``n_augmentations``, seconds
        ``augment``, ``hessians``, ``solve``, ``total``, and ``load`` (the load average when the
        trace started).
    solvers
        The baseline comparison: per model, FastOBC's and OBC's solver seconds (OBC scaled from
        the timed rows, :func:`solver_seconds`) and the share timed.
    checks
        OBC layers timed whole and scaled from a subset of rows (``whole_seconds``,
        ``scaled_seconds``): how far the scaling is off.
    command
        The command line of the run.
    """

    path: Path
    device: str
    date: str
    machine: dict
    traces: pd.DataFrame
    solvers: pd.DataFrame
    checks: pd.DataFrame
    command: str


def results_file(kind: str) -> Path:
    """``benchmarks/results/cost-{kind}.json`` (``kind``: ``"cpu"`` or ``"gpu"``)."""
    check_choice(kind, ("cpu", "gpu"), "results kind")
    return RESULTS_DIR / f"cost-{kind}.json"


def write_results(path: str | os.PathLike, traces: pd.DataFrame, solvers: pd.DataFrame,
                  device: str | torch.device, command: str,
                  checks: Sequence[Mapping[str, Any]] = ()) -> Path:
    """Write a :class:`BenchResults` file (JSON, atomically) with this machine and the date."""
    device = torch.device(device)
    blob = json.dumps({
        "format": COST_FORMAT, "machine": machine(device),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command, "traces": traces.to_dict("records"),
        "solvers": solvers.to_dict("records"), "checks": [dict(c) for c in checks],
    }, indent=1, default=str).encode()
    return atomic_write(path, lambda fh: fh.write(blob))


def bench_note(kind: str) -> tuple[BenchResults | None, str]:
    """The ``kind`` (``"cpu"`` or ``"gpu"``) results file of the benchmark and the sentence that
    introduces it: device, date, machine and command; or, when there is no file, ``None`` and a
    sentence that says so plainly."""
    path = results_file(kind)
    bench = read_results(path)
    name = kind.upper()
    if bench is None:
        return None, (f"**No {name} results file exists** (`benchmarks/results/{path.name}`): "
                      f"no {name} run of `benchmarks/bench_cost.py` has been recorded, so no "
                      f"{name} figures are shown.")
    return bench, (f"{name} results (`benchmarks/results/{path.name}`): device "
                   f"**{bench.device}**, measured {bench.date} on "
                   f"{machine_sentence(bench.machine)}; command `{bench.command}`.")


def read_results(path: str | os.PathLike) -> BenchResults | None:
    """The results file at ``path``, or ``None`` when there is none.

    Raises
    ------
    ValueError
        If the file exists but is not a results file of this format (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format") != COST_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {COST_FORMAT}")
        return BenchResults(path, data["device"], data["date"], data["machine"],
                            pd.DataFrame(data["traces"]), pd.DataFrame(data["solvers"]),
                            pd.DataFrame(data["checks"]), data["command"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{str(path)!r} is not a bench_cost.py results file: {e}") from None
