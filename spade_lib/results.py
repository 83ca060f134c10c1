"""The evaluation runner: SPADE variants of the network, one sample's rows, the cached table.

Each evaluation sample (:mod:`spade_lib.samples`) is explained under several *variants* of the
network (:class:`~spade_lib.variants.Variant`, in :mod:`spade_lib.variants`): the dense model,
SPADE traces with a sparsity schedule, and the controls of Table D.11 (the same pruning with
Hessians from other images). One trace is made per
sample and variant and shared by every saliency method; each map is scored against the patch mask
(:func:`spade_lib.metrics.trojan_scores`).

:func:`evaluate` produces the tidy table (one row per sample, method and variant) and keeps it in a
:class:`~spade_lib.store.ResultStore`: one file per finished sample, in a folder named by the hash
of everything that determines the rows (:func:`results_key`). A run that is killed loses only the
sample in progress; the next call computes just the missing samples. :func:`other_architecture`
runs the same comparison on another preset's model with the book's policy (skip a network that did
not learn, merge methods with equal scores). The table layouts live in :mod:`spade_lib.tables`.

The names that moved to :mod:`spade_lib.samples`, :mod:`spade_lib.store`, :mod:`spade_lib.tables`
and :mod:`spade_lib.variants` are re-exported here, so ``results.summary``, ``results.Variant``
and the like keep working.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from torch import Tensor, nn

from spade_lib import attribution, config, metrics, reproducibility, schedules
from spade_lib.config import Config
from spade_lib.models import fingerprint as model_fingerprint
from spade_lib.samples import (
    SAMPLE_COLUMNS,
    NoSampleError,
    Samples,
    decision,
    evaluation_samples,
    isd_donor,
    sample_seed,
    select_samples,
    tuning_samples,
)
from spade_lib.store import (
    COLUMNS,
    DamagedResultWarning,
    ResultStore,
    open_store,
    run_resumable,
    typed_rows,
)
from spade_lib.tables import (
    merge_methods,
    prediction_kept,
    score_gap,
    summary,
    variant_table,
    wins,
)
from spade_lib.variants import (
    BUILTIN_VARIANTS,
    TRACE_BATCH,
    Variant,
    main_variants,
    resolve_variants,
    variant_network,
)

if TYPE_CHECKING:
    from spade_lib.train import TrainResult

__all__ = [
    "BUILTIN_VARIANTS", "COLUMNS", "MERGED_METHODS", "MERGE_ATOL", "MIN_ACCURACY", "RESULT_KEYS",
    "SAMPLE_COLUMNS", "TRACE_BATCH", "ArchitectureRun", "DamagedResultWarning", "ResultStore",
    "Run", "Samples", "Variant", "check_methods", "check_store_meta", "evaluate",
    "evaluation_samples", "isd_donor", "main_variants", "merge_methods", "model_fingerprint",
    "other_architecture", "prediction_kept", "prepare_run",
    "resolve_variants", "results_key", "run_sample", "sample_maps", "sample_seed", "score_gap",
    "score_methods", "select_samples", "summary", "tuning_samples", "variant_network",
    "variant_table", "wins",
]

RESULT_KEYS = (
    "seed", "dataset", "scene", "image_size", "train_size", "test_size", "rules",
    "trojan_fraction", "patch_scale", "patch_alpha", "pruner", "n_augmentations", "augment",
)
"""Config keys that change a sample's rows (besides the model, methods and variants, which
:func:`results_key` hashes directly). ``samples`` is not among them: a larger run reuses the
samples a smaller one finished."""

MIN_ACCURACY = 0.2
"""Clean accuracy below which :func:`other_architecture` leaves a network unexplained: twice
chance for ten classes; a network under it did not learn the task, so its maps explain nothing."""

MERGED_METHODS = ("InputXGradient", "DeepLift")
"""Methods :func:`other_architecture` merges into one row when their scores agree: DeepLift has no
rule for ReLU6 or GELU and reduces to InputXGradient on those networks (as in the paper)."""

MERGE_ATOL = 1e-3
"""The largest score difference (AUC or Pointing Game, on any sample) at which
:data:`MERGED_METHODS` are merged: float noise in the batched backward pass can swap a few tied
pixel ranks."""


def check_methods(methods: Sequence[str],
                  method_options: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Check method names and their options (unknown ones name the valid values)."""
    if isinstance(methods, str) or not isinstance(methods, Sequence) or not methods:
        raise ValueError(f"methods must be a non-empty list of method names, got {methods!r}")
    for m in methods:
        attribution.get_method(m)
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods must be unique, got {list(methods)}")
    for m, opts in (method_options or {}).items():
        if m not in methods:
            raise ValueError(f"method_options names {m!r}, which is not among the methods "
                             f"{list(methods)}")
        attribution.get_method(m).resolve(opts)


# --------------------------------------------------------------------------------------------
# One sample
# --------------------------------------------------------------------------------------------

def score_methods(model: nn.Module, image: Tensor, mask: Tensor, target: int,
                  methods: Sequence[str],
                  method_options: Mapping[str, Mapping[str, Any]] | None = None) -> pd.DataFrame:
    """Explain ``target`` on one image with each method and score the maps against ``mask``.

    Returns one row per method: ``method``, :data:`spade_lib.metrics.SCORE_COLUMNS` and
    ``attribution_seconds``.
    """
    rows = []
    for m in methods:
        attr = attribution.attribute(model, image[None], int(target), m,
                                     **dict((method_options or {}).get(m, {})))
        scores = metrics.trojan_scores(attr, mask[None]).iloc[0].to_dict()
        rows.append({"method": m, **scores, "attribution_seconds": attr.seconds})
    return pd.DataFrame(rows, columns=["method", *metrics.SCORE_COLUMNS, "attribution_seconds"])


def sample_maps(cfg: Config, model: nn.Module, samples: Samples, position: int,
                methods: Sequence[str], variants: Sequence[str | Variant] | Mapping[str, Any],
                method_options: Mapping[str, Mapping[str, Any]] | None = None,
                ) -> dict[str, dict[str, attribution.Attribution]]:
    """The saliency maps behind one sample's rows: ``{variant: {method: Attribution}}``.

    The networks are those of :func:`run_sample` (same traces, same seeds), so a map's scores
    equal that sample's rows in the results table.
    """
    check_methods(methods, method_options)
    info = samples.table.iloc[position]
    image = samples.poisoned.float_images([int(info["sample"])])
    out: dict[str, dict[str, attribution.Attribution]] = {}
    for v in resolve_variants(cfg, model, variants):
        net = variant_network(cfg, model, samples, position, v)[0]
        out[v.name] = {m: attribution.attribute(net, image, int(info["target"]), m,
                                                **dict((method_options or {}).get(m, {})))
                       for m in methods}
    return out


def run_sample(cfg: Config, model: nn.Module, samples: Samples, position: int,
               methods: Sequence[str], variants: Sequence[Variant],
               method_options: Mapping[str, Mapping[str, Any]] | None = None,
               config_hash: str = "",
               shared: dict[Any, tuple[nn.Module, float]] | None = None) -> pd.DataFrame:
    """All rows of one sample (row ``position`` of ``samples.table``): every variant, every method.

    One trace per variant (seeded by :func:`sample_seed`) is shared by all methods; ``shared``
    keeps the many-image networks between samples (:func:`variant_network`). Columns
    :data:`COLUMNS`; rows ordered by variant, then method.
    """
    info = samples.table.iloc[position]
    sample, target = int(info["sample"]), int(info["target"])
    image = samples.poisoned.float_images([sample])[0]
    mask = samples.poisoned.masks[sample]
    parts = []
    for v in variants:
        net, seconds, donor = variant_network(cfg, model, samples, position, v, shared)
        prediction, keeps = decision(net, image, info, samples.multilabel)
        part = score_methods(net, image, mask, target, methods, method_options)
        part.insert(1, "variant", v.name)
        part["keeps_prediction"] = keeps
        part["prediction"] = prediction
        part["donor"] = donor
        part["trace_seconds"] = seconds
        parts.append(part)
    rows = pd.concat(parts, ignore_index=True)
    for col in SAMPLE_COLUMNS:
        rows[col] = info[col]
    rows["config_hash"] = config_hash
    return typed_rows(rows[list(COLUMNS)])




def results_key(cfg: Config, model: nn.Module, methods: Sequence[str],
                variants: Sequence[Variant],
                method_options: Mapping[str, Mapping[str, Any]] | None = None,
                rules: Sequence[str] = ()) -> str:
    """The hash that names a run's store and fills its ``config_hash`` column.

    It covers :data:`RESULT_KEYS` of the config, the model's weights, the methods with their
    options, the variants with their resolved sparsity, and the names of the Trojan rules of the
    poisoned set the sample ids point into.
    """
    blob = json.dumps({
        "config": cfg.digest(RESULT_KEYS), "model": model_fingerprint(model),
        "rules": list(rules),
        "methods": list(methods),
        "options": {m: dict(o) for m, o in (method_options or {}).items()},
        "variants": [v.describe() for v in variants],
    }, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------

def evaluate(
    cfg: Config,
    model: nn.Module | None = None,
    samples: Samples | None = None,
    methods: Sequence[str] | None = None,
    variants: Sequence[str | Variant] | Mapping[str, Any] = ("dense", "spade"),
    store: bool | str | os.PathLike | ResultStore | None = True,
    progress: bool = True,
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> pd.DataFrame:
    """Explain every sample with every method under every variant; a tidy, cached table.

    Parameters
    ----------
    cfg
        The experiment; gives the pruner, augmentations, seed and the defaults below.
    model
        The Trojaned classifier (default: ``trained_model(cfg).model`` on
        ``cfg.torch_device()``). Never changed.
    samples
        Default: :func:`evaluation_samples` (``cfg.samples`` of ``cfg.rules``).
    methods
        Saliency method names (default ``cfg.methods``).
    variants
        See :func:`resolve_variants`; default dense and SPADE with ``cfg.sparsity``.
    store
        ``True``: the folder ``cfg.cache_path("results", key)`` with ``key`` from
        :func:`results_key`; a directory: ``directory / key``; a :class:`ResultStore`: used as is;
        ``False``: keep nothing. Finished samples found there are not recomputed.
    progress
        Show a progress bar over samples.
    method_options
        Per method keyword options of :func:`spade_lib.attribution.attribute`, e.g.
        ``{"IntegratedGradients": {"n_steps": 16}}``.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`COLUMNS`, one row per (sample, method, variant), in sample order, then
        method, then variant order. ``keeps_prediction``: the variant's network still predicts the
        Trojan target on the sample; ``donor``: the test index of the other image a single-image
        source (IST, ISC, ISD) took its views from (-1 otherwise); ``trace_seconds`` (0 for
        dense) and ``attribution_seconds``: wall times; ``config_hash``: :func:`results_key`.
    """
    run = prepare_run(cfg, model, samples, methods, variants, store, progress, method_options)
    shared: dict[Any, tuple[nn.Module, float]] = {}
    table = run_resumable(run.store, run.samples.ids, lambda position: run_sample(
        cfg, run.model, run.samples, position, run.methods, run.variants, run.method_options,
        config_hash=run.key, shared=shared), progress)
    return run.ordered(table)


@dataclass
class Run:
    """One evaluation, resolved and checked (:func:`prepare_run`): what :func:`evaluate` and
    :func:`spade_lib.distributed.evaluate_distributed` compute, and where the rows go.

    Attributes
    ----------
    cfg, model, samples, methods, variants, method_options
        As :func:`evaluate` takes them, defaults filled in and variants resolved.
    key
        :func:`results_key`, the store's name and the rows' ``config_hash``.
    store
        The run's :class:`~spade_lib.store.ResultStore` (its ``meta.json`` checked), or ``None``.
    """

    cfg: Config
    model: nn.Module
    samples: Samples
    methods: list[str]
    variants: list[Variant]
    method_options: Mapping[str, Mapping[str, Any]] | None
    key: str
    store: ResultStore | None

    def ordered(self, table: pd.DataFrame) -> pd.DataFrame:
        """``table`` in sample order, then method, then variant (the order :func:`evaluate`
        returns)."""
        return _ordered(table, self.samples.ids, self.methods, [v.name for v in self.variants])


def prepare_run(cfg: Config, model: nn.Module | None = None, samples: Samples | None = None,
                methods: Sequence[str] | None = None,
                variants: Sequence[str | Variant] | Mapping[str, Any] = ("dense", "spade"),
                store: bool | str | os.PathLike | ResultStore | None = True,
                progress: bool = True,
                method_options: Mapping[str, Mapping[str, Any]] | None = None) -> Run:
    """Fill in :func:`evaluate`'s defaults, check every argument and open the store.

    Nothing is computed but the defaults themselves (the trained model, the evaluation samples).
    See :func:`evaluate` for the parameters.

    Raises
    ------
    ValueError
        Unknown methods or options, bad variants, empty samples, or a store that holds another
        run's rows.
    """
    if model is None:
        from spade_lib.train import trained_model

        model = trained_model(cfg, progress=progress).model.to(cfg.torch_device())
    methods = list(cfg.methods if methods is None else methods)
    check_methods(methods, method_options)
    chosen = resolve_variants(cfg, model, variants)
    if samples is None:
        samples = evaluation_samples(cfg, model)
    if not isinstance(samples, Samples) or len(samples) == 0:
        raise ValueError(f"samples must be a non-empty Samples object, got {samples!r}")
    key = results_key(cfg, model, methods, chosen, method_options,
                      [r.name for r in samples.poisoned.rules])
    target = open_store(cfg, store, key)
    if target is not None:
        check_store_meta(target, key, {
            "key": key, "config": cfg.to_dict(), "methods": methods,
            "variants": [v.describe() for v in chosen], "method_options": method_options or {},
            "model": model_fingerprint(model), "numerics": reproducibility.settings()})
    return Run(cfg, model, samples, methods, chosen, method_options, key, target)


def check_store_meta(target: ResultStore, key: str, meta: Mapping[str, Any]) -> None:
    """Make sure ``target`` holds (or will hold) the results of run ``key`` only.

    Parameters
    ----------
    target
        The run's store.
    key
        The run's hash (e.g. :func:`results_key`); ``meta["key"]`` should be the same.
    meta
        The run's description, written as ``meta.json`` into a store without one (or with a
        damaged one, which :meth:`~spade_lib.store.ResultStore.read_meta` reports); a store
        whose ``meta.json`` names ``key`` is left as it is.

    Raises
    ------
    ValueError
        If ``target``'s ``meta.json`` names another run's key.
    """
    saved = target.read_meta()
    if saved is not None and saved.get("key") != key:
        raise ValueError(f"store {str(target.path)!r} holds results of run "
                         f"{saved.get('key')!r}, not {key!r}")
    if saved is None:
        target.write_meta(meta)


def _ordered(table: pd.DataFrame, ids: Sequence[int], methods: Sequence[str],
             variants: Sequence[str]) -> pd.DataFrame:
    rank = {
        "sample": {s: i for i, s in enumerate(ids)},
        "method": {m: i for i, m in enumerate(methods)},
        "variant": {v: i for i, v in enumerate(variants)},
    }
    order = np.lexsort([table[c].map(r).to_numpy() for c, r in reversed(rank.items())])
    return table.iloc[order].reset_index(drop=True)



# --------------------------------------------------------------------------------------------
# Other architectures
# --------------------------------------------------------------------------------------------

@dataclass
class ArchitectureRun:
    """What :func:`other_architecture` found for one preset.

    Attributes
    ----------
    cfg
        The preset's config.
    trained
        Its trained model with clean accuracy, attack success and training time.
    table
        The results table (``dense``, ``spade`` and, for a schedule other than the linear one,
        ``spade-linear``; :data:`MERGED_METHODS` merged when they agree);
        ``None`` when the network did not learn the task (clean accuracy under
        :data:`MIN_ACCURACY`) or no Trojan took hold (no patched image passes the filter).
    reason
        Why ``table`` is ``None``, in words, for the chapter to print; ``None`` when it is not.
    gap
        The largest score difference between :data:`MERGED_METHODS` (:func:`score_gap`); NaN when
        the network was skipped or does not run both.
    """

    cfg: Config
    trained: TrainResult
    table: pd.DataFrame | None
    gap: float
    reason: str | None = None

    @property
    def merged(self) -> bool:
        """Whether :data:`MERGED_METHODS` share one row (their gap is within :data:`MERGE_ATOL`)."""
        return self.gap <= MERGE_ATOL


def other_architecture(preset: str, samples: int | None = None,
                       progress: bool = True, main: Config | None = None) -> ArchitectureRun:
    """Table B.2 for another architecture's preset, with the book's policy.

    Trains (or loads) the preset's model; a network whose clean accuracy is under
    :data:`MIN_ACCURACY` is not explained (``table`` is ``None``). Otherwise its evaluation
    samples are explained dense and through SPADE with the preset's ``sparsity`` (variant
    ``spade``) and, when that is not the linear schedule, also with the linear one
    (``spade-linear``, as chapter B's main table; :func:`evaluate`, cached), and
    :data:`MERGED_METHODS` are merged into one row ``"InputXGradient / DeepLift"`` when no score
    differs by more than :data:`MERGE_ATOL`.

    Parameters
    ----------
    preset
        A preset name or YAML path (:func:`spade_lib.config.load`).
    samples
        Overrides the preset's ``samples`` when given.
    progress
        Show progress bars.
    main
        The chapter's own config: the sibling then reads its data where ``main`` does
        (:func:`spade_lib.config.load_sibling`).
    """
    from spade_lib.train import trained_model

    overrides = {"samples": samples} if samples is not None else {}
    cfg = (config.load(preset, **overrides) if main is None
           else config.load_sibling(main, preset, **overrides))
    trained = trained_model(cfg, progress=progress)
    if trained.clean_accuracy < MIN_ACCURACY:
        return ArchitectureRun(cfg, trained, None, math.nan, (
            f"this network did not learn the task (its clean accuracy is under "
            f"{100 * MIN_ACCURACY:.0f}%, twice chance for ten classes), so a saliency map of "
            "it explains nothing"))
    model = trained.model.to(cfg.torch_device())
    try:
        chosen = evaluation_samples(cfg, model)
    except NoSampleError as e:
        return ArchitectureRun(cfg, trained, None, math.nan, (
            f"no Trojan took hold in this network: {e}; there is no decision to explain"))
    variants = {"dense": None, "spade": cfg.sparsity}
    spec = cfg.sparsity
    if isinstance(spec, str) and spec.startswith("linear"):
        spec = schedules.parse_spec(spec)
    if spec != schedules.linear():
        variants["spade-linear"] = "linear"
    table = evaluate(cfg, model, chosen, variants=variants,
                     progress=progress)
    pair = list(MERGED_METHODS)
    gap = score_gap(table, pair) if set(pair) <= set(cfg.methods) else math.nan
    if gap <= MERGE_ATOL:
        table = merge_methods(table, pair, " / ".join(pair), atol=MERGE_ATOL)
    return ArchitectureRun(cfg, trained, table, gap)
