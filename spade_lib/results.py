"""The evaluation runner: Trojan samples, SPADE variants, a resumable results store, tables.

A sample is a test image with one rule's Trojan patch on which the model is correct without the
patch and predicts the rule's target with it (:func:`select_samples`, the paper's filter). Each
sample is explained under several *variants* of the network (:class:`Variant`): the dense model,
SPADE traces with a sparsity schedule, and the control "ISD" of Table D.11 (the same pruning with
Hessians from a different image). One trace is made per sample and variant and shared by every
saliency method; each map is scored against the patch mask
(:func:`spade_lib.metrics.trojan_scores`).

:func:`evaluate` produces the tidy table (one row per sample, method and variant) and keeps it in a
:class:`ResultStore`: one file per finished sample, written atomically, in a folder named by the
hash of everything that determines the rows (:func:`results_key`). A run that is killed loses only
the sample in progress; the next call computes just the missing samples. :func:`summary` gives
the Table B.2 layout (Dense / SPADE / delta per method, with an average row) and
:func:`variant_table` compares several variants side by side (Table D.14).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from spade_lib import attribution, data, metrics, pruning, reproducibility
from spade_lib.config import Config
from spade_lib.files import atomic_write
from spade_lib.models import fingerprint as model_fingerprint
from spade_lib.trace import trace

__all__ = [
    "BUILTIN_VARIANTS", "COLUMNS", "RESULT_KEYS", "SAMPLE_COLUMNS", "TRACE_BATCH", "ResultStore",
    "Samples", "Variant", "check_methods", "evaluate", "evaluation_samples", "isd_donor",
    "merge_methods", "score_gap",
    "model_fingerprint", "prediction_kept", "resolve_variants", "results_key", "run_sample",
    "sample_maps", "sample_seed", "score_methods", "select_samples", "summary", "tuning_samples",
    "variant_network", "variant_table", "wins",
]

SAMPLE_COLUMNS = ("sample", "rule", "rule_name", "clean_label", "target", "test_index")
"""Columns of :attr:`Samples.table`: ``sample`` is the position in the poisoned set, ``rule`` the
rule's index and ``rule_name`` its name, ``test_index`` the clean image's position in the test
set."""

COLUMNS = (
    *SAMPLE_COLUMNS, "method", "variant", *metrics.SCORE_COLUMNS, "keeps_prediction",
    "prediction", "donor", "trace_seconds", "attribution_seconds", "config_hash",
)
"""Columns of the results table (:func:`evaluate`), in order."""

RESULT_KEYS = (
    "seed", "dataset", "scene", "image_size", "train_size", "test_size", "rules",
    "trojan_fraction", "patch_scale", "patch_alpha", "pruner", "n_augmentations", "augment",
)
"""Config keys that change a sample's rows (besides the model, methods and variants, which
:func:`results_key` hashes directly). ``samples`` is not among them: a larger run reuses the
samples a smaller one finished."""

TRACE_BATCH = 256
"""Forward batch size of the augmented views in every trace (a fixed value, so that the search's
Hessians are bit-identical to the runner's)."""

BUILTIN_VARIANTS = ("dense", "spade", "isd")


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------

def sample_seed(seed: int, sample: int) -> int:
    """The seed of everything random about one sample (its augmentations, its ISD donor).

    Derived from the config seed and the sample id alone, so a sample gives the same rows whatever
    else is in the run and in whatever order samples are processed.
    """
    return int(np.random.SeedSequence([int(seed), int(sample), 0x5EAD]).generate_state(1)[0])


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def _predict(model: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """Argmax labels of float images ``[N, 3, H, W]`` (eval mode, flags restored), on the CPU."""
    device = _model_device(model)
    out = []
    with pruning.eval_mode(model):
        for i in range(0, images.shape[0], batch_size):
            out.append(model(images[i:i + batch_size].to(device)).argmax(1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


@dataclass(eq=False)
class Samples:
    """Evaluation samples: a table of Trojan test images plus the sets they come from.

    Attributes
    ----------
    table
        One row per sample, columns :data:`SAMPLE_COLUMNS`; ``table.attrs`` holds the selection
        record (``seed``, ``requested``, and per rule how many candidates were ``checked`` and how
        many ``passed`` the filter) when made by :func:`select_samples`.
    poisoned
        The patched test images (``sample`` indexes into it).
    test
        The clean test set (``test_index`` indexes into it; ISD donors come from it).
    """

    table: pd.DataFrame
    poisoned: data.PoisonedSet
    test: data.SceneSet

    def __len__(self) -> int:
        return len(self.table)

    @property
    def ids(self) -> list[int]:
        """Sample ids (positions in :attr:`poisoned`), in table order."""
        return [int(s) for s in self.table["sample"]]

    def images(self) -> Tensor:
        """The patched images as float ``[n, 3, H, W]`` in [0, 1]."""
        return self.poisoned.float_images(self.ids)

    def masks(self) -> Tensor:
        """The patch masks, bool ``[n, H, W]``."""
        return self.poisoned.masks[torch.as_tensor(self.ids, dtype=torch.long)]

    def targets(self) -> Tensor:
        """The Trojan targets, int64 ``[n]``."""
        return torch.tensor(self.table["target"].tolist(), dtype=torch.long)

    @classmethod
    def from_ids(cls, poisoned: data.PoisonedSet, test: data.SceneSet,
                 ids: Sequence[int]) -> Samples:
        """Samples for given positions in ``poisoned`` (no filter applied)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < len(poisoned)]
        if bad:
            raise ValueError(f"sample ids {bad} are outside the poisoned set [0, {len(poisoned)})")
        if len(set(ids)) != len(ids):
            raise ValueError(f"sample ids must be unique, got {ids}")
        idx = torch.as_tensor(ids, dtype=torch.long)
        rules = poisoned.rule[idx].tolist()
        table = pd.DataFrame({
            "sample": pd.Series(ids, dtype="int64"),
            "rule": pd.Series(rules, dtype="int64"),
            "rule_name": pd.Series([poisoned.rules[k].name for k in rules], dtype="object"),
            "clean_label": pd.Series(poisoned.clean_labels[idx].tolist(), dtype="int64"),
            "target": pd.Series(poisoned.labels[idx].tolist(), dtype="int64"),
            "test_index": pd.Series(poisoned.index[idx].tolist(), dtype="int64"),
        })
        return cls(table, poisoned, test)


def _check_count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    return int(value)


def select_samples(model: nn.Module, test: data.SceneSet, poisoned: data.PoisonedSet, n: int,
                   seed: int = 0, batch_size: int = 256) -> Samples:
    """Pick ``n`` Trojan samples the paper's way, balanced over rules, seeded.

    A candidate ``i`` of ``poisoned`` passes when ``model`` predicts the true class on the clean
    test image ``poisoned.index[i]`` and the rule's target on the patched image. Each rule's
    candidates are visited in a seeded random order; rules take turns (in a seeded order) adding
    their next passing candidate, so every rule gets ``n // n_rules`` where it has that many, the
    rest is filled from the rules that have more, and a larger ``n`` selects a superset. Only
    the candidates needed are run through the model.

    Parameters
    ----------
    model
        The Trojaned classifier (not changed; run in eval mode).
    test
        The clean test set that ``poisoned`` was made from.
    poisoned
        Patched test images, e.g. :func:`spade_lib.data.poisoned_test`.
    n
        How many samples to select.
    seed
        Same seed, same selection.
    batch_size
        Candidates checked per forward pass.

    Returns
    -------
    Samples
        Sorted by sample id. Fewer than ``n`` (with a warning) when fewer candidates pass.

    Raises
    ------
    ValueError
        Bad ``n``, a ``poisoned`` set that does not fit ``test``, or no candidate passing.
    """
    n = _check_count(n, "n (number of samples)")
    batch_size = _check_count(batch_size, "batch_size")
    if len(poisoned) and int(poisoned.index.max()) >= len(test):
        raise ValueError(f"poisoned set refers to test image {int(poisoned.index.max())}, but the "
                         f"test set has {len(test)} images; pass the set it was made from")
    n_rules = len(poisoned.rules)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5E1EC7]))
    orders = [rng.permutation(np.flatnonzero(poisoned.rule.numpy() == k)) for k in range(n_rules)]
    turn = rng.permutation(n_rules)
    checked = [0] * n_rules
    passed: list[list[int]] = [[] for _ in range(n_rules)]
    taken = [0] * n_rules

    def refill(k: int) -> None:
        idx = orders[k][checked[k]:checked[k] + batch_size]
        checked[k] += len(idx)
        t = torch.as_tensor(idx, dtype=torch.long)
        clean = _predict(model, test.float_images(poisoned.index[t]), batch_size)
        patched = _predict(model, poisoned.float_images(t), batch_size)
        ok = (clean == poisoned.clean_labels[t]) & (patched == poisoned.labels[t])
        passed[k].extend(int(i) for i in idx[ok.numpy()])

    chosen: list[int] = []
    active = True
    while len(chosen) < n and active:
        active = False
        for k in turn:
            if len(chosen) == n:
                break
            while taken[k] == len(passed[k]) and checked[k] < len(orders[k]):
                refill(k)
            if taken[k] < len(passed[k]):
                chosen.append(passed[k][taken[k]])
                taken[k] += 1
                active = True
    if not chosen:
        raise ValueError(f"no candidate passes the filter (correct on the clean image, Trojan "
                         f"target on the patched one) among {len(poisoned)} patched images; is "
                         "this the model trained with these Trojan rules?")
    if len(chosen) < n:
        warnings.warn(f"only {len(chosen)} of the {len(poisoned)} patched images pass the filter; "
                      f"selected {len(chosen)} instead of {n}", UserWarning, stacklevel=2)
    samples = Samples.from_ids(poisoned, test, sorted(chosen))
    samples.table.attrs.update(
        seed=int(seed), requested=n,
        checked={r.name: checked[k] for k, r in enumerate(poisoned.rules)},
        passed={r.name: len(passed[k]) for k, r in enumerate(poisoned.rules)})
    return samples


def evaluation_samples(cfg: Config, model: nn.Module) -> Samples:
    """``cfg.samples`` samples of the evaluation rules (``cfg.rules``) for ``model``."""
    _, test = data.load_scenes(cfg)
    poisoned = data.poisoned_test(test, cfg.rules, seed=cfg.seed)
    return select_samples(model, test, poisoned, cfg.samples, cfg.seed)


def tuning_samples(cfg: Config, model: nn.Module) -> Samples:
    """``cfg.tuning_samples`` samples of the held-out rules (``cfg.tuning_rules``) for ``model``,
    the held-out model ``trained_model(cfg.replace(rules=cfg.tuning_rules))``."""
    held_out = cfg.replace(rules=cfg.tuning_rules)
    _, test = data.load_scenes(held_out)
    poisoned = data.poisoned_test(test, held_out.rules, seed=cfg.seed)
    return select_samples(model, test, poisoned, cfg.tuning_samples, cfg.seed)


def isd_donor(test: data.SceneSet, clean_label: int, target: int, seed: int) -> int:
    """The ISD control's donor: a random clean test image of another class, seeded.

    The donor's class differs from both the sample's true class and its Trojan target, so neither
    the sample's content nor the backdoor's class is represented in the Hessians.
    """
    labels = test.clean_labels.numpy()
    pool = np.flatnonzero((labels != clean_label) & (labels != target) & (test.rule.numpy() == -1))
    if len(pool) == 0:
        raise ValueError(f"the test set has no clean image outside classes {clean_label} and "
                         f"{target} to serve as an ISD donor")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x15D]))
    return int(rng.choice(pool))


# --------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """One way of obtaining the network that is explained.

    Attributes
    ----------
    name
        Label in the results table.
    sparsity
        ``None`` for the dense model, else a SPADE schedule (anything
        :func:`spade_lib.pruning.resolve_sparsity` takes: a float, ``"linear"``,
        ``"linear:A:B"``, ``"only:P[,P]:S"``, a dict of layer names, ...).
    other_image
        The ISD control: the Hessians come from a random clean test image of another class
        (:func:`isd_donor`) instead of the sample, with the same augmentation seed.
    """

    name: str
    sparsity: pruning.SparsitySpec | None = None
    other_image: bool = False

    def describe(self) -> dict[str, Any]:
        """A JSON-able description (for hashing and the store's metadata)."""
        spec = self.sparsity
        if dataclasses.is_dataclass(spec):
            spec = {"type": type(spec).__name__, **dataclasses.asdict(spec)}
        elif isinstance(spec, Mapping):
            spec = {str(k): float(v) for k, v in spec.items()}
        return {"name": self.name, "sparsity": spec, "other_image": self.other_image}


def resolve_variants(cfg: Config, model: nn.Module,
                     variants: Sequence[str | Variant] | Mapping[str, Any]) -> list[Variant]:
    """Turn variant names and specs into :class:`Variant` objects, checking them first.

    Parameters
    ----------
    cfg
        Gives ``cfg.sparsity`` for the built-in names.
    model
        Sparsity specs are resolved against its layers (unknown layer names are errors).
    variants
        A sequence of built-in names (``"dense"``, ``"spade"``: ``cfg.sparsity``, ``"isd"``:
        ``cfg.sparsity`` with Hessians from another image) and :class:`Variant` objects, or a
        mapping of names to sparsity specs (``None`` is dense), e.g.
        ``{"dense": None, "spade": 0.9, "spade-linear": "linear:0:0.99"}``.
    """
    builtin = {"dense": Variant("dense"), "spade": Variant("spade", cfg.sparsity),
               "isd": Variant("isd", cfg.sparsity, other_image=True)}
    out: list[Variant] = []
    if isinstance(variants, Mapping):
        for name, spec in variants.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"variant names must be non-empty strings, got {name!r}")
            if isinstance(spec, Variant):
                out.append(dataclasses.replace(spec, name=name))
            else:
                out.append(Variant(name, spec))
    elif isinstance(variants, (str, bytes)) or not isinstance(variants, Sequence):
        raise ValueError(f"variants must be a sequence of names/Variant objects or a mapping of "
                         f"names to sparsity specs, got {variants!r}")
    else:
        for v in variants:
            if isinstance(v, Variant):
                out.append(v)
            elif v in builtin:
                out.append(builtin[v])
            else:
                raise ValueError(f"unknown variant {v!r}; allowed names: "
                                 f"{', '.join(BUILTIN_VARIANTS)}, a Variant, or a mapping of "
                                 "names to sparsity specs such as {'spade-linear': 'linear'}")
    if not out:
        raise ValueError("at least one variant is needed")
    names = [v.name for v in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate variant names {dupes}; names must be unique")
    for v in out:
        if v.sparsity is None:
            if v.other_image:
                raise ValueError(f"variant {v.name!r}: other_image needs a sparsity to prune with")
            continue
        try:
            targets = pruning.resolve_sparsity(model, v.sparsity)
        except (ValueError, TypeError) as e:
            raise ValueError(f"variant {v.name!r}: {e}") from None
        if not any(s > 0 for s in targets.values()):
            raise ValueError(f"variant {v.name!r}: sparsity {v.sparsity!r} prunes no layer; use "
                             "None for the dense model")
    return out


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


def variant_network(cfg: Config, model: nn.Module, samples: Samples, position: int,
                    variant: Variant) -> tuple[nn.Module, float, int]:
    """The network that explains sample ``position`` under ``variant``.

    Returns ``(network, trace_seconds, donor)``: ``model`` itself for the dense variant, else a
    pruned copy traced on the sample (or, for ISD, on its donor image, see :func:`isd_donor`) with
    the sample's seed; ``donor`` is the donor's test index, -1 otherwise.
    """
    if variant.sparsity is None:
        return model, 0.0, -1
    info = samples.table.iloc[position]
    sample, target = int(info["sample"]), int(info["target"])
    seed = sample_seed(cfg.seed, sample)
    source, donor = samples.poisoned.float_images([sample])[0], -1
    if variant.other_image:
        donor = isd_donor(samples.test, int(info["clean_label"]), target, seed)
        source = samples.test.float_images([donor])[0]
    result = trace(model, source, sparsity=variant.sparsity, pruner=cfg.pruner,
                   n_augmentations=cfg.n_augmentations, recipe=cfg.augment,
                   batch_size=TRACE_BATCH, seed=seed)
    return result.model, result.timings["total"], donor


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
               config_hash: str = "") -> pd.DataFrame:
    """All rows of one sample (row ``position`` of ``samples.table``): every variant, every method.

    One trace per variant (seeded by :func:`sample_seed`) is shared by all methods. Columns
    :data:`COLUMNS`; rows ordered by variant, then method.
    """
    info = samples.table.iloc[position]
    sample, target = int(info["sample"]), int(info["target"])
    image = samples.poisoned.float_images([sample])[0]
    mask = samples.poisoned.masks[sample]
    parts = []
    for v in variants:
        net, seconds, donor = variant_network(cfg, model, samples, position, v)
        prediction = int(_predict(net, image[None])[0])
        part = score_methods(net, image, mask, target, methods, method_options)
        part.insert(1, "variant", v.name)
        part["keeps_prediction"] = prediction == target
        part["prediction"] = prediction
        part["donor"] = donor
        part["trace_seconds"] = seconds
        parts.append(part)
    rows = pd.concat(parts, ignore_index=True)
    for col in SAMPLE_COLUMNS:
        rows[col] = info[col]
    rows["config_hash"] = config_hash
    return _typed(rows[list(COLUMNS)])


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    """Fixed dtypes, so a table read back from the store equals the one computed."""
    ints = ("sample", "rule", "clean_label", "target", "test_index", "prediction", "donor")
    floats = (*metrics.SCORE_COLUMNS, "trace_seconds", "attribution_seconds")
    out = frame.astype({**dict.fromkeys(ints, "int64"), **dict.fromkeys(floats, "float64"),
                        "keeps_prediction": "bool"})
    for col in ("rule_name", "method", "variant", "config_hash"):
        out[col] = out[col].astype(object)
    return out


# --------------------------------------------------------------------------------------------
# Store
# --------------------------------------------------------------------------------------------

class DamagedResultWarning(UserWarning):
    """A file of a result store could not be read; it is set aside and its sample recomputed."""


class ResultStore:
    """A folder of per-sample result files, each written atomically.

    ``sample-NNNNNNN.parquet`` holds every row of one finished sample; it is written to a temporary
    file in the same folder, flushed to disk and renamed into place (``os.replace``), so a file
    that exists is complete and a killed writer leaves at most an ignored ``.tmp`` file. Writers
    of different samples never touch the same file, so several processes may share a store.
    ``meta.json`` records what produced the rows.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"ResultStore({str(self.path)!r})"

    def file(self, sample: int) -> Path:
        """The file of one sample."""
        return self.path / f"sample-{int(sample):07d}.parquet"

    def done(self) -> set[int]:
        """Ids of the samples whose file exists and is a whole Parquet file.

        A damaged file (truncated, say, by a disk that filled up or a copy that broke off) is
        not counted: a :class:`DamagedResultWarning` names it, and it is moved aside to a hidden
        ``.damaged`` file so that the sample is computed again and no half row is ever read.
        """
        if not self.path.is_dir():
            return set()
        ids = set()
        for path in sorted(self.path.glob("sample-*.parquet")):
            try:
                pq.read_metadata(path)
            except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
                aside = path.with_name(f".{path.name}.damaged")
                os.replace(path, aside)
                warnings.warn(f"result file {str(path)!r} is damaged ({e}); moved to "
                              f"{aside.name!r}, the sample will be computed again",
                              DamagedResultWarning, stacklevel=2)
                continue
            ids.add(int(path.stem.split("-")[1]))
        return ids

    def write(self, sample: int, rows: pd.DataFrame) -> None:
        """Save the rows of one sample (atomically replacing any earlier file)."""
        atomic_write(self.file(sample), lambda fh: rows.to_parquet(fh, index=False))

    def read(self, samples: Sequence[int] | None = None) -> pd.DataFrame:
        """Rows of the given samples (all finished ones if ``None``), in that order."""
        ids = sorted(self.done()) if samples is None else [int(s) for s in samples]
        missing = [s for s in ids if not self.file(s).exists()]
        if missing:
            raise ValueError(f"store {str(self.path)!r} has no results for samples {missing}")
        if not ids:
            return _typed(pd.DataFrame({c: [] for c in COLUMNS}))
        frames = [pd.read_parquet(self.file(s)) for s in ids]
        return _typed(pd.concat(frames, ignore_index=True))

    def write_meta(self, meta: Mapping[str, Any]) -> None:
        """Save ``meta.json`` (atomically)."""
        blob = json.dumps(meta, indent=1, sort_keys=True, default=str).encode()
        atomic_write(self.path / "meta.json", lambda fh: fh.write(blob))

    def read_meta(self) -> dict[str, Any] | None:
        """The saved ``meta.json``, or ``None`` if there is none or it is damaged (then a
        :class:`DamagedResultWarning` says so, and the runner writes it anew)."""
        path = self.path / "meta.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            warnings.warn(f"{str(path)!r} is damaged ({e}); it will be written again",
                          DamagedResultWarning, stacklevel=2)
            return None


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

def _open_store(cfg: Config, store: bool | str | os.PathLike | ResultStore | None,
                key: str) -> ResultStore | None:
    if store is None or store is False:
        return None
    if store is True:
        return ResultStore(cfg.cache_path("results", key, "meta.json").parent)
    if isinstance(store, ResultStore):
        return store
    if isinstance(store, (str, os.PathLike)):
        return ResultStore(Path(store) / key)
    raise ValueError(f"store must be True, False, a directory or a ResultStore, got {store!r}")


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
        Trojan target on the sample; ``donor``: the ISD donor's test index (-1 otherwise);
        ``trace_seconds`` (0 for dense) and ``attribution_seconds``: wall times; ``config_hash``:
        :func:`results_key`.
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
    target = _open_store(cfg, store, key)
    if target is not None:
        meta = target.read_meta()
        if meta is not None and meta.get("key") != key:
            raise ValueError(f"store {str(target.path)!r} holds results of run "
                             f"{meta.get('key')!r}, not {key!r}")
        if meta is None:
            target.write_meta({"key": key, "config": cfg.to_dict(), "methods": methods,
                               "variants": [v.describe() for v in chosen],
                               "method_options": method_options or {},
                               "model": model_fingerprint(model),
                               "numerics": reproducibility.settings()})
    done = target.done() if target is not None else set()
    ids = samples.ids
    fresh: dict[int, pd.DataFrame] = {}
    todo = [i for i, s in enumerate(ids) if s not in done]
    bar = tqdm(total=len(ids), initial=len(ids) - len(todo), desc="samples", disable=not progress)
    with bar:
        for position in todo:
            rows = run_sample(cfg, model, samples, position, methods, chosen, method_options,
                              config_hash=key)
            if target is not None:
                target.write(ids[position], rows)
            else:
                fresh[ids[position]] = rows
            bar.update(1)
    if target is not None:
        table = target.read(ids)
    else:
        table = pd.concat([fresh[s] for s in ids], ignore_index=True)
    return _ordered(table, ids, methods, [v.name for v in chosen])


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
# Tables
# --------------------------------------------------------------------------------------------

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


def _metric_columns(results: pd.DataFrame, metric: str, variant: str, baseline: str,
                    methods: Sequence[str], scale: float) -> pd.DataFrame:
    """One metric's columns of :func:`summary` (rows: ``methods`` then ``Average``)."""
    table = pd.DataFrame(index=pd.Index([*methods, "Average"], name="method"))
    sides = {name: (results[results["variant"] == name],
                    _best_per_method(results[results["variant"] == name], metric, methods))
             for name in (baseline, variant)}
    values: dict[str, dict[str, pd.Series]] = {baseline: {}, variant: {}}
    for name, (rows, best) in sides.items():
        for m in methods:
            values[name][m] = _sample_values(rows[rows["method"] == m], metric,
                                             best.loc[m, "aggregation"])
        table[f"{metric}_{name}"] = scale * pd.concat([best["best"], pd.Series(
            {"Average": best["best"].mean(skipna=False)})])
        every = pd.concat(values[name], axis=1).notna().all(axis=1).sum() if methods else 0
        table[f"{metric}_n_{name}"] = [*best["n_scored"].tolist(), int(every)]
    diffs = {m: values[variant][m] - values[baseline][m] for m in methods}
    per_sample = pd.concat(diffs, axis=1).mean(axis=1, skipna=True)
    table[f"{metric}_delta"] = table[f"{metric}_{variant}"] - table[f"{metric}_{baseline}"]
    table[f"{metric}_se"] = [scale * _se(diffs[m]) for m in methods] + [scale * _se(per_sample)]
    chosen = [sides[name][1]["aggregation"] for name in (baseline, variant)]
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
    base = _best_per_method(results[results["variant"] == baseline], metric, methods)
    other = _best_per_method(results[results["variant"] == variant], metric, methods)
    rows = []
    for m in methods:
        pick = results["method"] == m
        b = _sample_values(results[pick & (results["variant"] == baseline)], metric,
                           base.loc[m, "aggregation"])
        v = _sample_values(results[pick & (results["variant"] == variant)], metric,
                           other.loc[m, "aggregation"])
        d = (v - b).dropna()
        total = results.loc[pick & results["variant"].isin([baseline, variant]), "sample"]
        rows.append({"method": m, "better": int((d > 0).sum()), "equal": int((d == 0).sum()),
                     "worse": int((d < 0).sum()), "n": len(d), "total": total.nunique()})
    return pd.DataFrame(rows).set_index("method")


def _se(values: pd.Series) -> float:
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

