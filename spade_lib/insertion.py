"""Insertion and deletion of every method's maps, scored on the dense model (Table J.18).

SPADE's maps are read as explanations of the DENSE model's decision. Appendix J checks that
reading with the insertion and deletion games of Petsiuk et al. (2018, RISE): a map that ranks
the pixels the dense model relies on first makes the dense model's confidence rise fast when they
are inserted into a blurred copy of the image, and fall fast when they are deleted. Each map is
made on its own network (the dense model, the Sparse FC baseline of
:func:`spade_lib.baselines.sparse_fc`, or SPADE's pruned copy), and every curve is measured on
the dense model (:func:`spade_lib.metrics.insertion_deletion_batch`).

:func:`evaluate` explains each sample with every method under every variant and keeps the tidy
rows (one per sample, method, variant and channel aggregation) in a resumable store named by a hash
of everything that determines them. The samples are the Trojan evaluation samples of chapter B
(:func:`spade_lib.samples.evaluation_samples`; SPADE's traces are the same ones, made by
:func:`spade_lib.results.variant_network`) or, beyond the paper, clean test images
(:func:`clean_images`). :func:`summary` and :func:`differences` are the tidy numbers behind
:func:`table_j18`, the paper's layout beside the paper's own numbers (:data:`PAPER_J18`), and
:func:`claim_sentence` gives the verdict on the paper's claim, computed at one standard error.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from spade_lib import attribution, data, metrics, reproducibility, results
from spade_lib.checks import check_positive_int
from spade_lib.config import Config
from spade_lib.models import fingerprint, predict
from spade_lib.samples import Samples, evaluation_samples, sample_seed
from spade_lib.store import ResultStore, open_store
from spade_lib.trace import trace

__all__ = [
    "AREAS", "COLUMNS", "DEFAULT_SAMPLES", "KINDS", "LABELS", "METRICS", "PAPER_J18",
    "PAPER_J18_GAIN", "SPARSE_FC", "VARIANTS", "CleanImages", "Protocol", "claim_sentence",
    "claim_verdict", "clean_images", "default_count", "differences", "endpoints",
    "endpoints_sentence", "evaluate", "mean_curves",
    "plot_curves", "run_key", "sample_rows", "summary", "table_j18", "timings", "typed_rows",
]

SPARSE_FC = "sparse_fc"
"""Variant name of the Sparse FC baseline (the dense model with a sparse GLM head)."""

VARIANTS = ("dense", SPARSE_FC, "spade")
"""The networks whose maps Table J.18 compares, in its column order."""

LABELS = {"dense": "Dense", SPARSE_FC: "Sparse FC", "spade": "SPADE"}
"""Printed names of the variants."""

KINDS = ("trojan", "clean")
"""What is explained: the Trojan evaluation samples, or clean test images."""

METRICS = ("insertion", "deletion")
"""The two games; higher insertion and lower deletion are better."""

AREAS = ("insertion", "deletion", "insertion_normalised", "deletion_normalised")
"""Area columns of the rows: unnormalised (probability x fraction, in [0, 1]) and divided by the
dense model's probability of the explained class on the full image (the paper's)."""

DEFAULT_SAMPLES = {"smoke": 1, "cpu": 6}
"""Samples of each kind the chapter explains by default, per preset (others: the preset's
``samples``): at ``cpu``, all ten methods x three variants fit in about five minutes on the
2-core machine; at ``smoke`` the chapter runs in seconds."""

COLUMNS = (
    "sample", "kind", "rule_name", "label", "explained", "method", "variant", "aggregation",
    "full_probability", *AREAS, "insertion_curve", "deletion_curve", "constant_map",
    "keeps_prediction", "trace_seconds", "attribution_seconds", "config_hash",
)
"""Columns of :func:`evaluate`'s table, in order. ``sample``: the sample id (position in the
poisoned set for Trojan samples, in the test set for clean images); ``label``: the Trojan target or
the true class; ``explained``: the dense model's prediction, the class that is explained and
scored; ``*_curve``: the unnormalised probabilities at the curve's points; ``constant_map``: the
map is constant (no ranking: its areas are NaN); ``keeps_prediction``: the variant's network
predicts ``explained`` too."""

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
# What is explained, and how it is measured
# --------------------------------------------------------------------------------------------

@dataclass(eq=False)
class CleanImages:
    """Clean test images to explain (no Trojan patch).

    Attributes
    ----------
    table
        One row per image: ``sample`` (position in ``test``), ``clean_label``, ``prediction``
        (the dense model's).
    test
        The clean test set.
    """

    table: pd.DataFrame
    test: data.SceneSet

    def __len__(self) -> int:
        return len(self.table)

    @property
    def ids(self) -> list[int]:
        """Test-set positions, in table order."""
        return [int(s) for s in self.table["sample"]]


def clean_images(cfg: Config, model: nn.Module, n: int) -> CleanImages:
    """``n`` clean test images (``rule == -1``) in a seeded random order, any class.

    The order depends on ``cfg.seed`` only, so a larger ``n`` takes a superset. The prediction
    is ``model``'s; it is what the protocol explains, right or wrong.
    """
    n = check_positive_int(n, "n (number of clean images)")
    _, test = data.load_scenes(cfg)
    pool = np.flatnonzero(test.rule.numpy() == -1)
    rng = np.random.default_rng(np.random.SeedSequence([int(cfg.seed), 0xC1EA2]))
    ids = np.sort(rng.permutation(pool)[:n])
    prediction = predict(model, test.float_images(ids))
    table = pd.DataFrame({"sample": ids.astype(np.int64),
                          "clean_label": test.clean_labels[torch.as_tensor(ids)].numpy(),
                          "prediction": prediction.numpy()})
    return CleanImages(table, test)


def default_count(cfg: Config, samples: int | None = None) -> int:
    """The chapter's number of samples of each kind: ``samples`` if given, else the preset's
    entry of :data:`DEFAULT_SAMPLES` (capped by its ``samples``), else its ``samples``."""
    if samples is not None:
        return check_positive_int(samples, "samples")
    return min(DEFAULT_SAMPLES.get(cfg.name, cfg.samples), cfg.samples)


@dataclass(frozen=True)
class Protocol:
    """Petsiuk et al.'s insertion/deletion settings (see
    :func:`spade_lib.metrics.insertion_deletion_batch`).

    Attributes
    ----------
    steps
        Intervals of each curve; ``None``: the image height (Petsiuk's one row per step).
    blur_size, blur_sigma
        The insertion canvas's blur; ``None``: Petsiuk's 11 px and sigma 5 at 224 px, scaled to
        the image (:func:`spade_lib.metrics.petsiuk_blur_parameters`).
    deletion_value
        The constant deleted pixels take (0: black; Petsiuk's zeros were of the normalised
        ImageNet input, the mean colour).
    batch_size
        Images per forward pass of the dense model (speed only).
    """

    steps: int | None = None
    blur_size: int | None = None
    blur_sigma: float | None = None
    deletion_value: float = 0.0
    batch_size: int = 264

    def resolved(self, height: int, width: int) -> dict[str, Any]:
        """The settings used on ``height x width`` images, defaults filled in (hashed)."""
        size, sigma = metrics.petsiuk_blur_parameters(height, width)
        return {"steps": height if self.steps is None else int(self.steps),
                "blur_size": size if self.blur_size is None else int(self.blur_size),
                "blur_sigma": sigma if self.blur_sigma is None else float(self.blur_sigma),
                "insertion_canvas": "blur", "deletion_canvas": float(self.deletion_value)}


# --------------------------------------------------------------------------------------------
# One sample
# --------------------------------------------------------------------------------------------

def sample_rows(model: nn.Module, image: Tensor, explained: int,
                networks: Mapping[str, tuple[nn.Module, float]], methods: Sequence[str],
                method_options: Mapping[str, Mapping[str, Any]] | None = None,
                protocol: Protocol | None = None) -> pd.DataFrame:
    """Every method's map on every network, scored by insertion and deletion on ``model``.

    Parameters
    ----------
    model
        The dense classifier: every curve is its probability of ``explained``.
    image
        ``[C, H, W]`` float in [0, 1].
    explained
        The class explained by every map and tracked by every curve (the dense prediction).
    networks
        ``{variant: (network, trace_seconds)}``: where each variant's maps are made.
    methods, method_options
        Saliency methods and their options (:func:`spade_lib.attribution.attribute`).
    protocol
        Default :class:`Protocol`.

    Returns
    -------
    pandas.DataFrame
        One row per variant, method and aggregation (``sum``, ``abs``), in that order: the
        :data:`COLUMNS` from ``method`` on, less ``config_hash``. A constant map has NaN areas.
    """
    protocol = protocol or Protocol()
    opts = protocol.resolved(*image.shape[-2:])
    info, maps = [], []
    for variant, (net, seconds) in networks.items():
        keeps = int(predict(net, image[None])[0]) == int(explained)
        for m in methods:
            attr = attribution.attribute(net, image[None], int(explained), m,
                                         **dict((method_options or {}).get(m, {})))
            for how in metrics.AGGREGATIONS:
                flat = attr.aggregate(how)[0].detach().to("cpu", torch.float64)
                maps.append(flat)
                info.append({"method": m, "variant": variant, "aggregation": how,
                             "constant_map": bool(flat.max() == flat.min()),
                             "keeps_prediction": keeps, "trace_seconds": seconds,
                             "attribution_seconds": attr.seconds})
    curves = metrics.insertion_deletion_batch(
        model, image, torch.stack(maps), int(explained), opts["steps"],
        insertion_canvas="blur", deletion_canvas=opts["deletion_canvas"], normalize=False,
        batch_size=protocol.batch_size, blur_size=opts["blur_size"],
        blur_sigma=opts["blur_sigma"])
    rows = []
    for row, c in zip(info, curves, strict=True):
        nan = row["constant_map"]
        values = (c.insertion_area, c.deletion_area, c.insertion_normalised,
                  c.deletion_normalised)
        rows.append({**row, "full_probability": c.full_probability,
                     **{a: math.nan if nan else v for a, v in zip(AREAS, values, strict=True)},
                     "insertion_curve": c.insertion.numpy(), "deletion_curve": c.deletion.numpy()})
    return pd.DataFrame(rows)


def typed_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` (columns :data:`COLUMNS`) with fixed dtypes, so rows read back from the store
    equal those computed: int64 ids and classes, float64 areas and times, bool flags, object
    strings and float64 arrays for the curves."""
    ints = ("sample", "label", "explained")
    floats = ("full_probability", *AREAS, "trace_seconds", "attribution_seconds")
    out = frame[list(COLUMNS)].astype({**dict.fromkeys(ints, "int64"),
                                       **dict.fromkeys(floats, "float64"),
                                       "constant_map": "bool", "keeps_prediction": "bool"})
    for col in ("kind", "rule_name", "method", "variant", "aggregation", "config_hash"):
        out[col] = out[col].astype(object)
    for col in ("insertion_curve", "deletion_curve"):
        out[col] = pd.Series([np.asarray(v, dtype=np.float64) for v in out[col]],
                             index=out.index, dtype=object)
    return out


# --------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------

def _split_variants(cfg: Config, model: nn.Module, variants: Sequence[str | results.Variant],
                    networks: Mapping[str, nn.Module]) -> list[str | results.Variant]:
    """Variants in order: names of fixed networks stay strings, the rest become Variants."""
    if isinstance(variants, (str, bytes, Mapping)) or not isinstance(variants, Sequence) \
            or not variants:
        raise ValueError(f"variants must be a non-empty sequence of names or Variant objects, "
                         f"got {variants!r}")
    out: list[str | results.Variant] = []
    for v in variants:
        if isinstance(v, str) and (v in networks or v == SPARSE_FC):
            out.append(v)
        else:
            out.extend(results.resolve_variants(cfg, model, [v]))
    names = [v if isinstance(v, str) else v.name for v in out]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must be unique, got {names}")
    unused = sorted(set(networks) - set(names))
    if unused:
        raise ValueError(f"networks names {unused}, which are not among the variants {names}")
    return out


def run_key(cfg: Config, model: nn.Module, kind: str, methods: Sequence[str],
            variants: Sequence[str | results.Variant], networks: Mapping[str, nn.Module],
            method_options: Mapping[str, Mapping[str, Any]] | None, protocol: dict[str, Any],
            rules: Sequence[str] = ()) -> str:
    """The hash naming a run's store: the config keys of :data:`spade_lib.results.RESULT_KEYS`,
    the dense model's weights, the kind of samples, the Trojan rules, the methods and options,
    the variants (fixed networks by their weights) and the resolved protocol."""
    described = [{"name": v, "network": fingerprint(networks[v])} if isinstance(v, str)
                 else v.describe() for v in variants]
    blob = json.dumps({
        "table": "insertion-deletion/1", "config": cfg.digest(results.RESULT_KEYS),
        "model": fingerprint(model), "kind": kind, "rules": list(rules), "methods": list(methods),
        "options": {m: dict(o) for m, o in (method_options or {}).items()},
        "variants": described, "protocol": protocol,
    }, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _networks(cfg: Config, model: nn.Module, chosen: Samples | CleanImages, position: int,
              variants: Sequence[str | results.Variant],
              fixed: Mapping[str, nn.Module]) -> dict[str, tuple[nn.Module, float]]:
    """Each variant's network for one sample: fixed ones as given, dense as is, SPADE traced
    on the sample (Trojan samples: by :func:`spade_lib.results.variant_network`, as chapter B)."""
    out: dict[str, tuple[nn.Module, float]] = {}
    for v in variants:
        if isinstance(v, str):
            out[v] = (fixed[v], 0.0)
        elif isinstance(chosen, Samples):
            net, seconds, _ = results.variant_network(cfg, model, chosen, position, v)
            out[v.name] = (net, seconds)
        elif v.sparsity is None:
            out[v.name] = (model, 0.0)
        else:
            sample = chosen.ids[position]
            result = trace(model, chosen.test.float_images([sample])[0], sparsity=v.sparsity,
                           pruner=cfg.pruner, n_augmentations=cfg.n_augmentations,
                           recipe=cfg.augment, batch_size=results.TRACE_BATCH,
                           seed=sample_seed(cfg.seed, sample))
            out[v.name] = (result.model, result.timings["total"])
    return out


def _describe(chosen: Samples | CleanImages, position: int) -> dict[str, Any]:
    """Sample columns of one sample: id, kind, rule name, label, explained class, and image."""
    row = chosen.table.iloc[position]
    sample = int(row["sample"])
    if isinstance(chosen, Samples):
        image = chosen.poisoned.float_images([sample])[0]
        return {"sample": sample, "kind": "trojan", "rule_name": row["rule_name"],
                "label": int(row["target"]), "image": image}
    return {"sample": sample, "kind": "clean", "rule_name": "clean",
            "label": int(row["clean_label"]), "image": chosen.test.float_images([sample])[0]}


def evaluate(
    cfg: Config,
    model: nn.Module | None = None,
    samples: Samples | CleanImages | int | None = None,
    kind: str = "trojan",
    methods: Sequence[str] | None = None,
    variants: Sequence[str | results.Variant] = VARIANTS,
    networks: Mapping[str, nn.Module] | None = None,
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
    protocol: Protocol | None = None,
    store: bool | str | os.PathLike | ResultStore | None = True,
    progress: bool = True,
) -> pd.DataFrame:
    """Insertion and deletion of every method's map under every variant, on the dense model.

    Parameters
    ----------
    cfg
        The experiment (pruner, augmentations, seed, sparsity of ``"spade"``).
    model
        The dense Trojaned classifier (default: ``trained_model(cfg).model`` on
        ``cfg.torch_device()``). Never changed. Every curve is measured on it.
    samples
        What to explain: a :class:`~spade_lib.samples.Samples` (Trojan samples), a
        :class:`CleanImages`, or a count of ``kind`` (default :func:`default_count`): the first
        of :func:`spade_lib.samples.evaluation_samples` or of :func:`clean_images`.
    kind
        ``"trojan"`` or ``"clean"``, for a count.
    methods
        Saliency methods (default all ten, :func:`spade_lib.attribution.available`).
    variants
        Names and :class:`spade_lib.results.Variant` objects: ``"dense"``, ``"spade"`` (the
        preset's sparsity), ``"sparse_fc"`` (the Sparse FC baseline,
        :func:`spade_lib.baselines.sparse_fc`, unless given in ``networks``), or any name given in
        ``networks``. Default :data:`VARIANTS`.
    networks
        Fixed networks by variant name (the same for every sample), e.g. ``{"sparse_fc": net}``.
    method_options
        Per method options of :func:`spade_lib.attribution.attribute`.
    protocol
        The insertion/deletion settings (default :class:`Protocol`: Petsiuk's, scaled).
    store
        As :func:`spade_lib.results.evaluate`: ``True`` caches under
        ``cfg.cache_path("results", key)`` (key: :func:`run_key`); ``False`` keeps nothing.
    progress
        Show a progress bar over samples.

    Returns
    -------
    pandas.DataFrame
        :data:`COLUMNS`, one row per sample, method, variant and aggregation, in sample, method,
        variant, aggregation order.
    """
    if model is None:
        from spade_lib.train import trained_model

        model = trained_model(cfg, progress=progress).model.to(cfg.torch_device())
    methods = list(attribution.available() if methods is None else methods)
    results.check_methods(methods, method_options)
    networks = dict(networks or {})
    chosen_variants = _split_variants(cfg, model, variants, networks)
    if SPARSE_FC in chosen_variants and SPARSE_FC not in networks:
        from spade_lib import baselines

        networks[SPARSE_FC] = baselines.sparse_fc(cfg, model, progress=progress).model
    if samples is None or isinstance(samples, int | np.integer):
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; allowed: {', '.join(KINDS)}")
        n = default_count(cfg, samples)
        samples = (evaluation_samples(cfg.replace(samples=n), model) if kind == "trojan"
                   else clean_images(cfg, model, n))
    if not isinstance(samples, Samples | CleanImages) or len(samples) == 0:
        raise ValueError(f"samples must be a non-empty Samples or CleanImages, a count or None, "
                         f"got {samples!r}")
    kind = "trojan" if isinstance(samples, Samples) else "clean"
    for v in chosen_variants:
        if kind == "clean" and not isinstance(v, str) and v.other_image:
            raise ValueError(f"variant {v.name!r} (other_image) needs Trojan samples")
    image_size = samples.poisoned.images.shape[-2:] if kind == "trojan" else \
        samples.test.images.shape[-2:]
    resolved = (protocol or Protocol()).resolved(*image_size)
    rules = [r.name for r in samples.poisoned.rules] if kind == "trojan" else []
    key = run_key(cfg, model, kind, methods, chosen_variants, networks, method_options,
                  resolved, rules)
    target = open_store(cfg, store, key)
    if target is not None:
        target = ResultStore(target.path, typed_rows, COLUMNS)
        results.check_store_meta(target, key, {
            "key": key, "config": cfg.to_dict(), "kind": kind, "methods": methods,
            "variants": [v if isinstance(v, str) else v.describe() for v in chosen_variants],
            "networks": {name: fingerprint(net) for name, net in networks.items()},
            "method_options": method_options or {}, "protocol": resolved,
            "model": fingerprint(model), "numerics": reproducibility.settings()})
    done = target.done() if target is not None else set()
    ids = samples.ids
    fresh: dict[int, pd.DataFrame] = {}
    todo = [i for i, s in enumerate(ids) if s not in done]
    bar = tqdm(total=len(ids), initial=len(ids) - len(todo), desc=f"{kind} samples",
               disable=not progress)
    with bar:
        for position in todo:
            about = _describe(samples, position)
            image = about.pop("image")
            explained = int(predict(model, image[None])[0])
            nets = _networks(cfg, model, samples, position, chosen_variants, networks)
            rows = sample_rows(model, image, explained, nets, methods, method_options, protocol)
            for col, value in {**about, "explained": explained, "config_hash": key}.items():
                rows[col] = value
            rows = typed_rows(rows)
            if target is not None:
                target.write(ids[position], rows)
            else:
                fresh[ids[position]] = rows
            bar.update(1)
    table = target.read(ids) if target is not None else \
        pd.concat([fresh[s] for s in ids], ignore_index=True)
    names = [v if isinstance(v, str) else v.name for v in chosen_variants]
    return _ordered(table, ids, methods, names)


def _ordered(table: pd.DataFrame, ids: Sequence[int], methods: Sequence[str],
             variants: Sequence[str]) -> pd.DataFrame:
    rank = {"sample": {s: i for i, s in enumerate(ids)},
            "method": {m: i for i, m in enumerate(methods)},
            "variant": {v: i for i, v in enumerate(variants)},
            "aggregation": {a: i for i, a in enumerate(metrics.AGGREGATIONS)}}
    order = np.lexsort([table[c].map(r).to_numpy() for c, r in reversed(rank.items())])
    return table.iloc[order].reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

def _column(metric: str, normalised: bool) -> str:
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


def _se(values: pd.Series) -> float:
    v = values.dropna()
    return float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan


def summary(rows: pd.DataFrame, normalised: bool = True, aggregation: str = "best",
            percent: bool = True) -> pd.DataFrame:
    """Mean insertion and deletion per method and variant, with standard errors (tidy).

    Parameters
    ----------
    rows
        The table from :func:`evaluate`.
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
                            "value": scale * wide[m].mean(), "se": scale * _se(wide[m]),
                            "n": int(wide[m].notna().sum()),
                            "aggregation": label.iloc[0] if len(label) else None})
            every = wide.dropna()
            means = [r["value"] for r in out[-len(methods):]]
            out.append({"metric": metric, "method": "Average", "variant": v,
                        "value": float(np.mean(means)) if methods else math.nan,
                        "se": scale * _se(every.mean(axis=1)), "n": len(every),
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
                        else math.nan, "se": _se(d), "n": len(d),
                        "better": int((sign * d > 0).sum()), "worse": int((sign * d < 0).sum())})
    return pd.DataFrame(out)


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
    if math.isnan(value):
        return "n/a"
    return f"{value:.2f} +- {se:.2f}" if not math.isnan(se) else f"{value:.2f}"


def claim_verdict(delta: float, se: float, direction: float) -> str:
    """``"holds"`` when ``delta`` lies more than one standard error on the claimed side of 0
    (``direction`` +1: above, -1: below), ``"fails"`` when more than one standard error on the
    other side, ``"inconclusive"`` in between (or with a NaN ``se``), ``"not comparable"`` for a
    NaN ``delta``."""
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
    n_methods = rows["method"].nunique()
    paper = PAPER_J18.loc["Average"]
    lines = [
        f"**The paper** (ResNet-50, ImageNet, normalised areas): SPADE raises the average "
        f"insertion from {paper[('insertion', 'dense')]:.2f} (dense) to "
        f"{paper[('insertion', 'spade')]:.2f} (the text says +{PAPER_J18_GAIN:.2f}) and lowers "
        f"deletion from {paper[('deletion', 'dense')]:.2f} to {paper[('deletion', 'spade')]:.2f}, "
        f"for 9 of 10 methods; Sparse FC stays level with dense "
        f"({paper[('insertion', SPARSE_FC)]:.2f} / {paper[('deletion', SPARSE_FC)]:.2f}).",
        "", f"**Here, on {what}** (paired differences of the average over methods, +- one "
        "standard error, in points):", ""]
    variants = set(rows["variant"])
    pairs = [(v, b) for v, b in (("spade", "dense"), ("spade", SPARSE_FC), (SPARSE_FC, "dense"))
             if {v, b} <= variants]
    for variant, baseline in pairs:
        d = differences(rows, variant, baseline, normalised, aggregation).set_index(
            ["metric", "method"])
        bits = []
        for metric, direction in (("insertion", 1.0), ("deletion", -1.0)):
            avg = d.loc[(metric, "Average")]
            delta, se = float(avg["delta"]), float(avg["se"])
            verdict = claim_verdict(delta, se, direction)
            helped = int((direction * d.loc[metric].drop("Average")["delta"] > 0).sum())
            if verdict == "not comparable":
                bits.append(f"{metric}: not comparable (no sample has a score from every method "
                            "on both networks)")
                continue
            if variant == "spade":
                word = f"the claimed direction **{verdict}**"
            else:
                word = {"holds": "**better** than dense", "fails": "**worse** than dense",
                        "inconclusive": "**level with dense** within one standard error"}[verdict]
            claimed = paper[(metric, variant)] - paper[(metric, baseline)]
            bits.append(f"{metric} {delta:+.2f} +- {se:.2f} (paper {claimed:+.2f}): {word} "
                        f"({helped} of {n_methods} methods better)")
        n = int(d.loc[("insertion", "Average"), "n"])
        lines.append(f"* {LABELS[variant]} against {LABELS[baseline]} ({n} "
                     f"sample{'s' if n != 1 else ''}): " + "; ".join(bits) + ".")
    lines += ["", "Higher insertion and lower deletion are better. The paper's text has deletion "
              "remove pixels in *increasing* order of importance, which contradicts its reading "
              "that lower is better; the decreasing order of the standard protocol is used here."]
    return "\n".join(lines)


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
