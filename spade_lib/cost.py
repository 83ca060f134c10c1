"""Computational cost (Appendix F): measuring the time to the first interpretation and its growth.

Table F.15 of the paper gives, per architecture, the time to "preprocess the dense model to
interpret the first sample": SPADE's trace for one sample against the Sparse FC baseline's refit
of the final layer (Wong et al. 2021), on GPUs. This module measures; the table's layout, the
verdict, the slope fits and the plots are in :mod:`spade_lib.cost_tables`.

* :func:`spade_timings`: SPADE's time to the first interpretation on a preset's model, for both
  solvers: augmentations + Hessians + solver (:attr:`spade_lib.trace.Trace.timings`) plus one
  saliency map (:func:`spade_lib.attribution.attribute`). FastOBC is timed whole; exact OBC,
  whose greedy pass costs about ``rows * n^3`` per layer (``n`` inputs per row), is timed on a
  subset of each layer's rows where the whole layer would exceed a work budget, and scaled by
  the row count (:func:`solver_seconds`; the table says how much was timed).
* :func:`sparse_fc_timing`: the Sparse FC baseline's features and fit
  (:func:`spade_lib.baselines.sparse_fc`).
* :func:`sweep`: how the trace time grows with the number of augmentations and the sparsity.
* :func:`write_results` / :func:`read_results` / :func:`bench_note`: the results file of
  ``benchmarks/bench_cost.py`` (model size: the small networks and torchvision's at 224 px, on a
  CPU or a GPU).

Every measurement is cached under ``cfg.cache_path("cost", ...)`` by a hash of what determines it
*and of the machine* (:func:`machine`): a rebuild on the same machine reads the numbers back, and
another machine (or another thread count or torch version) measures again.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from spade_lib import attribution, hessians, pruning
from spade_lib.augment import augmented_batches
from spade_lib.checks import check_choice, check_positive_int
from spade_lib.config import Config
from spade_lib.files import atomic_write
from spade_lib.models import device_of, fingerprint
from spade_lib.schedules import check_sparsity
from spade_lib.store import key_hash
from spade_lib.trace import Trace, trace

__all__ = [
    "LAYER_COLUMNS", "PHASES", "RESULTS_DIR", "ROW_BUDGET", "SOLVERS", "SWEEPS", "SWEEP_COLUMNS",
    "SWEEP_SPARSITIES", "TIMED_PATCHED", "TIMED_SAMPLES", "BenchResults", "CostRun",
    "bench_note", "machine", "machine_sentence",
    "read_results", "results_file", "solver_note", "solver_seconds", "sparse_fc_timing",
    "spade_timings", "sweep", "sweep_values", "write_results",
]

COST_FORMAT = 1
"""Version of the cached records; part of every cache key."""

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


def _cached(cfg: Config, kind: str, spec: Mapping[str, Any], compute: Callable[[], dict],
            cache: bool) -> tuple[dict, bool]:
    """``compute()`` (a JSON-able dict), kept in ``cost/{kind}-{key}.json`` where ``key`` hashes
    ``spec``, :data:`COST_FORMAT` and :func:`machine`. Returns ``(record, loaded)``."""
    here = machine(cfg.torch_device())
    # the first 12 of key_hash's digits: the names of the caches made before it was shared
    key = key_hash({"kind": kind, "spec": spec, "machine": here, "format": COST_FORMAT})[:12]
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
        if shape not in timed:
            timed[shape] = _time_shape(name, weight, layer_hessians[name], targets[name], solver,
                                       row_budget)
        rows.append({"layer": name, "shape": shape, "rows": shape[0],
                     "columns": math.prod(shape[1:]), "solver": solver, **timed[shape]})
    return pd.DataFrame(rows, columns=list(LAYER_COLUMNS))


def _time_shape(name: str, weight: Tensor, h: Tensor, sparsity: float, solver: str,
                row_budget: float | None) -> dict[str, Any]:
    """One layer pruned (its first ``k`` rows for OBC over ``row_budget``), seconds scaled."""
    n_rows, n = weight.shape[0], math.prod(weight.shape[1:])
    k = n_rows if row_budget is None or solver != "obc" else min(
        n_rows, max(1, int(row_budget // n**3)))
    options = {} if k == n_rows else {"batch_bytes": k * n * n * max(4, h.element_size())}
    _, info = pruning.prune_layer(weight[:k], h, sparsity, solver, **options)
    return {"rows_timed": k, "timed_seconds": info.seconds,
            "seconds": info.seconds * n_rows / k, "timed_as": name}


# --------------------------------------------------------------------------------------------
# SPADE: time to the first interpretation
# --------------------------------------------------------------------------------------------

TIMED_SAMPLES = "evaluation samples"
TIMED_PATCHED = ("the first patched test images: no Trojan took hold in this model, so no image "
                 "passes the paper's filter (the timing does not depend on it)")


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
        measurement started), ``spec`` and ``images`` (what was timed: :data:`TIMED_SAMPLES`,
        or :data:`TIMED_PATCHED` when no sample of the model passes the paper's filter).
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

    samples = check_positive_int(samples, "samples")
    method = cfg.methods[0] if method is None else method
    check_choice(method, attribution.available(), "attribution method")
    spec = {"config": cfg.digest((*RESULT_KEYS, "sparsity", "arch", "width")),
            "model": fingerprint(model), "samples": samples, "method": method,
            "row_budget": row_budget, "device": cfg.torch_device()}

    def compute() -> dict:
        return _measure_spade(cfg, model, samples, method, row_budget, progress)

    record, loaded = _cached(cfg, "spade", spec, compute, cache)
    columns = ["preset", "arch", "solver", "sample", *PHASES, "solve_timed", "weights"]
    table = pd.DataFrame(record["samples"])[columns]
    layers = pd.DataFrame(record["layers"], columns=list(LAYER_COLUMNS))
    layers["shape"] = layers["shape"].map(tuple)
    return CostRun(table, layers, {k: v for k, v in record.items()
                                   if k not in ("samples", "layers")}, loaded)


def _measure_spade(cfg: Config, model: nn.Module, samples: int, method: str,
                   row_budget: float | None, progress: bool) -> dict:
    """The record of :func:`spade_timings`: one untimed warm-up, then each sample timed."""
    from spade_lib.samples import (
        NoSampleError,
        Samples,
        evaluation_samples,
        evaluation_sets,
        sample_seed,
    )

    try:
        chosen, timed = evaluation_samples(cfg, model), TIMED_SAMPLES
    except NoSampleError:
        test, poisoned = evaluation_sets(cfg)
        ids = list(range(min(samples, len(poisoned))))
        # a multi-label image explains the first attribute its rule overrides
        attributes = ([int(torch.nonzero(poisoned.labels[j] != poisoned.clean_labels[j])[0])
                       for j in ids] if poisoned.labels.ndim == 2 else None)
        chosen, timed = Samples.from_ids(poisoned, test, ids, attributes), TIMED_PATCHED
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
        if position == 0:
            layers, obc_solve, obc_timed = _obc_layers(cfg, model, tr, image, seed, row_budget,
                                                       progress)
        rows += _sample_rows(cfg, tr, attr.seconds, sample, obc_solve, obc_timed)
    return {"samples": rows, "layers": layers, "images": timed}


def _obc_layers(cfg: Config, model: nn.Module, tr: Trace, image: Tensor, seed: int,
                row_budget: float | None, progress: bool) -> tuple[list[dict], float, float]:
    """Both solvers' per-layer rows on one sample, OBC's solver seconds and the share timed."""
    targets = dict(zip(tr.report["layer"], tr.report["target"], strict=True))
    stats = _sample_hessians(cfg, model, image, seed, list(targets))
    obc = solver_seconds(model, stats, targets, "obc", row_budget, progress)
    fast = obc.assign(solver="fastobc", rows_timed=obc["rows"],
                      timed_seconds=tr.report["seconds"].to_numpy(),
                      seconds=tr.report["seconds"].to_numpy(), timed_as=obc["layer"])
    shapes = obc.drop_duplicates("timed_as")
    return ([*fast.to_dict("records"), *obc.to_dict("records")], float(obc["seconds"].sum()),
            float(shapes["timed_seconds"].sum() / shapes["seconds"].sum()))


def _sample_rows(cfg: Config, tr: Trace, map_seconds: float, sample: int, obc_solve: float,
                 obc_timed: float) -> list[dict]:
    """One sample's OBC and FastOBC rows: its phases with each solver's time."""
    t = tr.timings
    base = {"preset": cfg.name, "arch": cfg.arch, "sample": sample,
            "augment": t["augment"], "hessians": t["hessians"], "attribution": map_seconds,
            "weights": int(tr.report["shape"].map(math.prod).sum())}
    rows = []
    for solver, solve, timed in (("obc", obc_solve, obc_timed), ("fastobc", t["solve"], 1.0)):
        trace_s = t["total"] - t["solve"] + solve
        rows.append({**base, "solver": solver, "solve": solve, "trace": trace_s,
                     "first": trace_s + map_seconds, "solve_timed": timed})
    return rows


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


def solver_note(kind: str) -> tuple[dict | None, str]:
    """The results file of ``benchmarks/bench_solver.py`` for ``kind`` (``"cpu"`` or ``"cuda"``:
    ``benchmarks/results/solver-{kind}.json``) and the sentence that introduces it; or ``None``
    and a sentence that says plainly that there is none.

    Raises
    ------
    ValueError
        If the file exists but is not a results file of that benchmark (the message names it).
    """
    check_choice(kind, ("cpu", "cuda"), "solver results kind")
    path = RESULTS_DIR / f"solver-{kind}.json"
    name = {"cpu": "CPU", "cuda": "GPU"}[kind]
    if not path.is_file():
        return None, (f"**No {name} results file of the solver benchmark exists** "
                      f"(`benchmarks/results/{path.name}`): no {name} figures are shown.")
    try:
        record = json.loads(path.read_text())
        if record.get("format") != 1 or not isinstance(record.get("rows"), list):
            raise ValueError(f"format {record.get('format')!r}, expected 1 with rows")
        text = (f"{name} results (`benchmarks/results/{path.name}`): device "
                f"**{record['device']}**, measured {record['date']} on "
                f"{machine_sentence(record['machine'])}; command `{record['command']}`.")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{str(path)!r} is not a bench_solver.py results file: {e}") from None
    return record, text
