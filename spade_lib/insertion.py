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
of everything that determines them (:func:`run_key`). The samples are the Trojan evaluation
samples of chapter B (:func:`spade_lib.samples.evaluation_samples`; SPADE's traces are the same
ones, made by :func:`spade_lib.results.variant_network`) or, beyond the paper, clean test images
(:func:`clean_images`). The table's layouts, the paper's numbers, the verdicts and the curves
that read these rows live in :mod:`spade_lib.insertion_tables`.
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

from spade_lib import attribution, metrics, reproducibility, results
from spade_lib.checks import check_positive_int
from spade_lib.config import Config
from spade_lib.models import fingerprint, predict
from spade_lib.samples import (
    Samples,
    TableRows,
    TestSet,
    evaluation_samples,
    evaluation_sets,
    sample_seed,
)
from spade_lib.store import ResultStore, open_store, run_resumable
from spade_lib.trace import trace

__all__ = [
    "AREAS", "COLUMNS", "DEFAULT_SAMPLES", "KINDS", "SPARSE_FC", "VARIANTS", "CleanImages",
    "Protocol", "clean_images", "default_count", "evaluate", "run_key", "sample_rows",
    "typed_rows",
]

SPARSE_FC = "sparse_fc"
"""Variant name of the Sparse FC baseline (the dense model with a sparse GLM head)."""

VARIANTS = ("dense", SPARSE_FC, "spade")
"""The networks whose maps Table J.18 compares, in its column order."""

KINDS = ("trojan", "clean")
"""What is explained: the Trojan evaluation samples, or clean test images."""

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


# --------------------------------------------------------------------------------------------
# What is explained, and how it is measured
# --------------------------------------------------------------------------------------------

@dataclass(eq=False)
class CleanImages(TableRows):
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
    test: TestSet


def clean_images(cfg: Config, model: nn.Module, n: int) -> CleanImages:
    """``n`` clean test images (``rule == -1``) in a seeded random order, any class.

    The order depends on ``cfg.seed`` only, so a larger ``n`` takes a superset. The prediction
    is ``model``'s; it is what the protocol explains, right or wrong.
    """
    n = check_positive_int(n, "n (number of clean images)")
    test, _ = evaluation_sets(cfg)
    if test.clean_labels.ndim != 1:
        raise ValueError("the clean-image protocol explains the predicted class; a multi-label "
                         "preset (CelebA) has attributes, not one class per image")
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
    return min(DEFAULT_SAMPLES.get(cfg.defaults_name, cfg.samples), cfg.samples)


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
    chosen, networks = _variant_networks(cfg, model, variants, networks, progress)
    samples = _resolve_samples(cfg, model, samples, kind)
    kind = _kind_of(samples, chosen)
    height, width = samples.test.float_images([0]).shape[-2:]  # every image has this size
    resolved = (protocol or Protocol()).resolved(height, width)
    rules = [r.name for r in samples.poisoned.rules] if kind == "trojan" else []
    key = run_key(cfg, model, kind, methods, chosen, networks, method_options, resolved, rules)
    run = _Run(cfg, model, kind, methods, chosen, networks, method_options, protocol, resolved,
               key)
    table = _collect(run, samples, _open_run_store(cfg, store, run), progress)
    names = [v if isinstance(v, str) else v.name for v in chosen]
    return _ordered(table, samples.ids, methods, names)


def _variant_networks(cfg: Config, model: nn.Module, variants: Sequence[str | results.Variant],
                      networks: Mapping[str, nn.Module] | None, progress: bool,
                      ) -> tuple[list[str | results.Variant], dict[str, nn.Module]]:
    """The variants in order and the fixed networks, Sparse FC's trained if asked for, not given."""
    networks = dict(networks or {})
    chosen = _split_variants(cfg, model, variants, networks)
    if SPARSE_FC in chosen and SPARSE_FC not in networks:
        from spade_lib import baselines

        networks[SPARSE_FC] = baselines.sparse_fc(cfg, model, progress=progress).model
    return chosen, networks


def _resolve_samples(cfg: Config, model: nn.Module, samples: Samples | CleanImages | int | None,
                     kind: str) -> Samples | CleanImages:
    """``samples`` as given, or the first ``samples`` (a count; None: :func:`default_count`) of
    ``kind``."""
    if samples is None or isinstance(samples, int | np.integer):
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; allowed: {', '.join(KINDS)}")
        n = default_count(cfg, samples)
        samples = (evaluation_samples(cfg.replace(samples=n), model) if kind == "trojan"
                   else clean_images(cfg, model, n))
    if not isinstance(samples, Samples | CleanImages) or len(samples) == 0:
        raise ValueError(f"samples must be a non-empty Samples or CleanImages, a count or None, "
                         f"got {samples!r}")
    return samples


def _kind_of(samples: Samples | CleanImages, variants: Sequence[str | results.Variant]) -> str:
    """``"trojan"`` or ``"clean"``; refuses a variant that needs Trojan samples on clean ones."""
    kind = "trojan" if isinstance(samples, Samples) else "clean"
    for v in variants:
        if kind == "clean" and not isinstance(v, str) and v.other_image:
            raise ValueError(f"variant {v.name!r} (other_image) needs Trojan samples")
    return kind


@dataclass(frozen=True, eq=False)
class _Run:
    """What one :func:`evaluate` call fixes: the dense model, methods, variants and their fixed
    networks, the protocol (as given and resolved) and the store key."""

    cfg: Config
    model: nn.Module
    kind: str
    methods: list[str]
    variants: list[str | results.Variant]
    networks: dict[str, nn.Module]
    method_options: Mapping[str, Mapping[str, Any]] | None
    protocol: Protocol | None
    resolved: dict[str, Any]
    key: str

    def meta(self) -> dict[str, Any]:
        """The store's ``meta.json``: the run's description, numerics included."""
        return {"key": self.key, "config": self.cfg.to_dict(), "kind": self.kind,
                "methods": self.methods,
                "variants": [v if isinstance(v, str) else v.describe() for v in self.variants],
                "networks": {name: fingerprint(net) for name, net in self.networks.items()},
                "method_options": self.method_options or {}, "protocol": self.resolved,
                "model": fingerprint(self.model), "numerics": reproducibility.settings()}

    def sample(self, samples: Samples | CleanImages, position: int) -> pd.DataFrame:
        """One sample's typed rows: every method's map on every variant's network, scored."""
        about = _describe(samples, position)
        image = about.pop("image")
        explained = int(predict(self.model, image[None])[0])
        nets = _networks(self.cfg, self.model, samples, position, self.variants, self.networks)
        rows = sample_rows(self.model, image, explained, nets, self.methods, self.method_options,
                           self.protocol)
        for col, value in {**about, "explained": explained, "config_hash": self.key}.items():
            rows[col] = value
        return typed_rows(rows)


def _open_run_store(cfg: Config, store: bool | str | os.PathLike | ResultStore | None,
                    run: _Run) -> ResultStore | None:
    """The run's store (None: keep nothing), refused if it holds another run's rows."""
    target = open_store(cfg, store, run.key)
    if target is None:
        return None
    target = ResultStore(target.path, typed_rows, COLUMNS)
    results.check_store_meta(target, run.key, run.meta())
    return target


def _collect(run: _Run, samples: Samples | CleanImages, target: ResultStore | None,
             progress: bool) -> pd.DataFrame:
    """Every sample's rows, in ``samples`` order: read from ``target`` where it has them, else
    computed (and written to ``target``)."""
    return run_resumable(target, samples.ids, lambda position: run.sample(samples, position),
                         progress, desc=f"{run.kind} samples")


def _ordered(table: pd.DataFrame, ids: Sequence[int], methods: Sequence[str],
             variants: Sequence[str]) -> pd.DataFrame:
    """``table`` sorted in sample, method, variant and aggregation order, as given."""
    rank = {"sample": {s: i for i, s in enumerate(ids)},
            "method": {m: i for i, m in enumerate(methods)},
            "variant": {v: i for i, v in enumerate(variants)},
            "aggregation": {a: i for i, a in enumerate(metrics.AGGREGATIONS)}}
    order = np.lexsort([table[c].map(r).to_numpy() for c, r in reversed(rank.items())])
    return table.iloc[order].reset_index(drop=True)
