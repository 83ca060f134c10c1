"""Chapter K's evaluation: the agreement of SPADE's masks between pairs of images (Figure K.11).

SPADE prunes every layer to 0.99 (:data:`PAPER_MASK_SPARSITY`) for two inputs, and the agreement
of the two masks is measured per layer (:func:`spade_lib.fidelity.mask_agreement`).
:func:`select_pairs` and :func:`agreement_pairs` draw the three kinds of pairs of the paper
(:data:`AGREEMENT_KINDS`), :func:`image_masks` traces one image and caches its masks,
:func:`mask_agreement_rows` compares every pair (each image traced once), and
:func:`agreement_summary`, :func:`agreement_table` and :func:`agreement_verdicts` read the table.
The paper's claim is data here (:data:`PAPER_MASK_AGREEMENT`), and the verdicts are computed from
the numbers at one standard error (:func:`spade_lib.tables.range_verdict`,
:func:`spade_lib.tables.claim_verdict`).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from spade_lib import pruning, reproducibility, results, schedules
from spade_lib.checks import check_columns, check_positive_int, check_seed
from spade_lib.config import Config
from spade_lib.fidelity import MASK_AGREEMENT_COLUMNS, mask_agreement, trace_masks, weight_masks
from spade_lib.files import atomic_write
from spade_lib.models import fingerprint as model_fingerprint
from spade_lib.samples import Samples, evaluation_samples, evaluation_sets, sample_seed
from spade_lib.schedules import pruned_layers
from spade_lib.store import ResultStore, key_hash
from spade_lib.tables import ALL_LAYERS, claim_verdict, layer_means, range_verdict, spread
from spade_lib.trace import trace

__all__ = [
    "AGREEMENT_COLUMNS", "AGREEMENT_KINDS", "MIN_PAIRS", "PAIR_COLUMNS", "PAPER_MASK_AGREEMENT",
    "PAPER_MASK_SPARSITY", "agreement_pairs", "agreement_summary", "agreement_table",
    "agreement_verdicts", "default_pairs", "image_masks", "mask_agreement_rows", "select_pairs",
]

PAPER_MASK_AGREEMENT = (0.20, 0.60)
"""Appendix K: "masks between two samples agree between 20 and 60% of the time" (ResNet-50,
ImageNet, 0.99 sparsity), highest in earlier layers and for the most similar images."""

PAPER_MASK_SPARSITY = 0.99
"""Figure K.11: the sparsity of every layer in the traces whose masks are compared."""

MIN_PAIRS = 40
"""Pairs per kind for Figure K.11 when the preset affords it (:func:`default_pairs`)."""

_VERSION = 1
"""Part of every cache key here: bump it when a computation below changes its numbers."""

# --------------------------------------------------------------------------------------------
# Pairs of images
# --------------------------------------------------------------------------------------------

AGREEMENT_KINDS = ("random", "same Trojan", "same Trojan and class")
"""The paper's three kinds of pairs, from least to most alike: (a) two clean test images of
different classes, (b) two Trojan samples of the same rule and different true classes, (c) two
Trojan samples of the same rule and the same true class."""

PAIR_COLUMNS = ("kind", "pair", "source_a", "index_a", "label_a", "source_b", "index_b",
                "label_b", "rule_name")
"""Columns of :func:`select_pairs`. ``source`` is ``"test"`` (``index``: a clean test image) or
``"poisoned"`` (``index``: a sample id in the poisoned set); ``label`` the true class;
``rule_name`` the shared Trojan ("" for random pairs)."""


def _match(items: Sequence[int], labels: Mapping[int, int], rng: np.random.Generator,
           same: bool) -> list[tuple[int, int]]:
    """Disjoint pairs from ``items`` in a random order: equal labels (``same``) or different."""
    order = [items[i] for i in rng.permutation(len(items))]
    if same:
        groups: dict[int, list[int]] = {}
        for i in order:
            groups.setdefault(labels[i], []).append(i)
        return [(g[j], g[j + 1]) for g in groups.values() for j in range(0, len(g) - 1, 2)]
    pairs, waiting = [], []
    for i in order:
        partner = next((w for w in waiting if labels[w] != labels[i]), None)
        if partner is None:
            waiting.append(i)
        else:
            waiting.remove(partner)
            pairs.append((partner, i))
    return pairs


def _take(pairs: list[tuple[int, int]], n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """``n`` of ``pairs`` drawn at random (all if fewer), in their order."""
    return [pairs[i] for i in sorted(rng.permutation(len(pairs))[:n])]


def _turns(per_rule: Sequence[list[tuple[int, int]]], n: int,
           rng: np.random.Generator) -> list[tuple[int, tuple[int, int]]]:
    """Up to ``n`` ``(rule, pair)``: the rules take turns giving a random one of their pairs, so
    every rule gives ``n // rules`` where it can and the rest come from those that have more."""
    queues = [[pairs[i] for i in rng.permutation(len(pairs))] for pairs in per_rule]
    out: list[tuple[int, tuple[int, int]]] = []
    while len(out) < n and any(queues):
        for k, queue in enumerate(queues):
            if queue and len(out) < n:
                out.append((k, queue.pop(0)))
    return out


def select_pairs(samples: Samples, n_pairs: int, seed: int = 0) -> pd.DataFrame:
    """Draw ``n_pairs`` pairs of each kind of :data:`AGREEMENT_KINDS`, seeded.

    The Trojan kinds come from ``samples`` (the Trojan pool), the random kind from the clean test
    images of ``samples.test``. Within a kind the pairs are disjoint, and no image (nor the clean
    original of a Trojan sample) is in two pairs of any kinds, so every pair's agreement is
    independent of the others and a standard error over pairs is honest.

    Random pairs and "same Trojan" pairs have different true classes: the paper draws ImageNet
    images, which share a class 1 time in 1000, while here 1 in 10 would. So each kind adds one
    likeness to the one before it (the Trojan, then the class). Both Trojan kinds come from the
    same rules, those whose samples have several classes (a source-conditional rule's samples
    all share its source class, so it cannot give a "same Trojan" pair), and the rules take
    turns giving pairs (first "same Trojan", then "same Trojan and class" from the images left):
    the two kinds then have the same mix of Trojans and differ only in the class.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`PAIR_COLUMNS`, ordered by kind and pair. Fewer than ``n_pairs`` of a kind
        (with a warning) when the pool does not hold enough.
    """
    if not isinstance(samples, Samples) or len(samples) == 0:
        raise ValueError(f"samples must be a non-empty Samples object, got {samples!r}")
    n_pairs = check_positive_int(n_pairs, "n_pairs")
    rng = np.random.default_rng(np.random.SeedSequence([check_seed(seed), 0xA9EE]))
    table = samples.table
    labels = dict(zip(table["sample"].astype(int), table["clean_label"].astype(int), strict=True))
    by_rule = {r: [int(s) for s in part["sample"]] for r, part in table.groupby("rule_name")}
    mixed = [r for r in sorted(by_rule) if len({labels[s] for s in by_rule[r]}) > 1]
    used: set[int] = set()
    rows = []
    for kind, same in ((AGREEMENT_KINDS[1], False), (AGREEMENT_KINDS[2], True)):
        found = [_match([s for s in by_rule[r] if s not in used], labels, rng, same)
                 for r in mixed]
        for i, (k, (a, b)) in enumerate(_turns(found, n_pairs, rng)):
            used.update((a, b))
            rows.append((kind, i, "poisoned", a, labels[a], "poisoned", b, labels[b], mixed[k]))
    test = samples.test
    originals = set(table["test_index"].astype(int))
    clean = [int(i) for i in np.flatnonzero(test.rule.numpy() == -1) if int(i) not in originals]
    test_labels = dict(zip(clean, test.clean_labels[clean].tolist(), strict=True))
    for i, (a, b) in enumerate(_take(_match(clean, test_labels, rng, False), n_pairs, rng)):
        rows.append((AGREEMENT_KINDS[0], i, "test", a, test_labels[a], "test", b,
                     test_labels[b], ""))
    pairs = pd.DataFrame(rows, columns=list(PAIR_COLUMNS))
    pairs["kind"] = pd.Categorical(pairs["kind"], categories=AGREEMENT_KINDS, ordered=True)
    pairs = pairs.sort_values(["kind", "pair"], kind="stable").reset_index(drop=True)
    pairs["kind"] = pairs["kind"].astype(object)
    short = {k: int((pairs["kind"] == k).sum()) for k in AGREEMENT_KINDS}
    short = {k: c for k, c in short.items() if c < n_pairs}
    if short:
        warnings.warn(f"the pool of {len(samples)} samples gives fewer than {n_pairs} pairs of "
                      f"kind(s) {short}", UserWarning, stacklevel=2)
    return pairs


def _grown_pool(cfg: Config, model: nn.Module, n_pairs: int, seed: int) -> Samples:
    """The evaluation samples, doubled from ``max(cfg.samples, 4 * n_pairs)`` until
    :func:`select_pairs` finds ``n_pairs`` of every kind or the filter passes no more."""
    size = max(cfg.samples, 4 * n_pairs)
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            pool = evaluation_samples(cfg.replace(samples=size), model)
            counts = select_pairs(pool, n_pairs, seed)["kind"].value_counts()
        if all(counts.get(k, 0) >= n_pairs for k in AGREEMENT_KINDS) or len(pool) < size:
            return pool
        size *= 2


def agreement_pairs(cfg: Config, model: nn.Module, n_pairs: int, seed: int | None = None,
                    store: bool = True) -> tuple[pd.DataFrame, Samples]:
    """Pairs for Figure K.11 from the preset's Trojan evaluation samples and test scenes.

    The Trojan pool is :func:`spade_lib.samples.evaluation_samples` of ``cfg`` with ``samples``
    raised until :func:`select_pairs` finds ``n_pairs`` of each kind (it starts at
    ``max(cfg.samples, 4 * n_pairs)`` and doubles; a larger request selects a superset, so the
    evaluation samples are part of the pool) or the filter passes no more candidates. The pool is
    balanced over all rules, but only the rules whose samples have several classes give pairs
    (:func:`select_pairs`), so it is larger than the pairs need.

    Parameters
    ----------
    seed
        Seeds :func:`select_pairs` (default ``cfg.seed``).
    store
        Keep the pool's sample ids in ``cfg.cache_path("fidelity", "pairs", KEY + ".json")``
        (keyed by the data and trace settings, ``samples``, the model's weights, ``n_pairs`` and
        ``seed``), so that a rebuild does not run the filter again.

    Returns
    -------
    (pandas.DataFrame, Samples)
        The pairs (:func:`select_pairs`) and the pool their ``poisoned`` indices refer to.
    """
    n_pairs = check_positive_int(n_pairs, "n_pairs")
    seed = check_seed(cfg.seed if seed is None else seed)
    path = cfg.cache_path("fidelity", "pairs", key_hash({
        "what": "pairs", "version": _VERSION,
        "config": cfg.digest((*results.RESULT_KEYS, "samples")),
        "model": model_fingerprint(model), "n_pairs": n_pairs, "seed": seed}) + ".json")
    if store and path.exists():
        test, poisoned = evaluation_sets(cfg)
        kept = json.loads(path.read_text())
        pool = Samples.from_ids(poisoned, test, kept["pool"], kept.get("attributes"))
        return select_pairs(pool, n_pairs, seed), pool
    pool = _grown_pool(cfg, model, n_pairs, seed)
    if store:
        attributes = {"attributes": pool.targets().tolist()} if pool.multilabel else {}
        blob = json.dumps({"pool": pool.ids, **attributes}).encode()
        atomic_write(path, lambda fh: fh.write(blob))
    return select_pairs(pool, n_pairs, seed), pool


# --------------------------------------------------------------------------------------------
# Mask agreement: the pairs
# --------------------------------------------------------------------------------------------

AGREEMENT_COLUMNS = ("kind", "pair", "rule_name", "label_a", "label_b",
                     *MASK_AGREEMENT_COLUMNS, "flagged", "dense_zeros")
"""Columns of :func:`mask_agreement_rows` (one row per pair and layer). ``flagged``: the layer is
off its target in either trace (kept weights by rounding, above target or empty; see
:attr:`spade_lib.trace.Trace.report`), which ``kept_a``/``kept_b`` and ``chance`` show.
``dense_zeros``: the layer's weights that are exactly zero in the dense model (see
:func:`spade_lib.fidelity.trace_masks`)."""


def _image_seed(seed: int, source: str, index: int) -> int:
    """A Trojan sample's seed is the runner's (:func:`spade_lib.samples.sample_seed`); a clean
    test image gets its own stream."""
    if source == "poisoned":
        return sample_seed(seed, index)
    return int(np.random.SeedSequence([int(seed), int(index), 0xC1EA]).generate_state(1)[0])


def _masks_key(cfg: Config, model: nn.Module, sparsity: schedules.SparsitySpec,
               rules: Sequence[str]) -> str:
    return key_hash({"what": "masks", "version": _VERSION,
                     "config": cfg.digest(results.RESULT_KEYS),
                     "model": model_fingerprint(model), "rules": list(rules),
                     "sparsity": schedules.resolve_sparsity(model, sparsity)})


def _save_masks(path: Any, masks: Mapping[str, Tensor], flagged: Mapping[str, bool]) -> None:
    arrays = {}
    for i, m in enumerate(masks.values()):
        arrays[f"bits{i}"] = np.packbits(m.numpy().ravel())
        arrays[f"shape{i}"] = np.asarray(m.shape, dtype=np.int64)
    arrays["names"] = np.asarray(list(masks), dtype=str)
    arrays["flagged"] = np.asarray([flagged[n] for n in masks], dtype=bool)
    atomic_write(path, lambda fh: np.savez(fh, **arrays))


def _load_masks(path: Any) -> tuple[dict[str, Tensor], dict[str, bool]]:
    with np.load(path) as f:
        names = [str(n) for n in f["names"]]
        masks, flagged = {}, {}
        for i, name in enumerate(names):
            shape = tuple(int(s) for s in f[f"shape{i}"])
            bits = np.unpackbits(f[f"bits{i}"], count=int(np.prod(shape))).astype(bool)
            masks[name] = torch.from_numpy(bits.reshape(shape))
            flagged[name] = bool(f["flagged"][i])
    return masks, flagged


def image_masks(cfg: Config, model: nn.Module, samples: Samples, source: str, index: int,
                sparsity: schedules.SparsitySpec = PAPER_MASK_SPARSITY,
                store: bool = True) -> tuple[dict[str, Tensor], dict[str, bool]]:
    """The SPADE masks (:func:`spade_lib.fidelity.trace_masks`) of one image of a pair, cached.

    The image is traced with ``sparsity`` (default 0.99 on every layer of
    :func:`spade_lib.schedules.default_layers`), ``cfg.pruner``, ``cfg.n_augmentations``,
    ``cfg.augment`` and the image's own seed (a Trojan sample's is the runner's,
    :func:`spade_lib.samples.sample_seed`).

    Parameters
    ----------
    source, index
        ``"poisoned"`` and a sample id of ``samples.poisoned``, or ``"test"`` and an index of
        ``samples.test``.
    store
        Keep the masks (bit-packed) in ``cfg.cache_path("fidelity", "masks", KEY)``, keyed by the
        trace settings, the model's weights, the rules and the sparsity.

    Returns
    -------
    (dict, dict)
        ``{layer: bool mask}`` and ``{layer: flagged}`` (off its target, see
        :data:`AGREEMENT_COLUMNS`).
    """
    if source not in ("poisoned", "test"):
        raise ValueError(f"unknown source {source!r}; allowed: poisoned, test")
    images = samples.poisoned if source == "poisoned" else samples.test
    if not 0 <= int(index) < len(images):
        raise ValueError(f"{source} index {index} is outside [0, {len(images)})")
    path = None
    if store:
        key = _masks_key(cfg, model, sparsity, [r.name for r in samples.poisoned.rules])
        path = cfg.cache_path("fidelity", "masks", key, f"{source}-{int(index):07d}.npz")
        if path.exists():
            try:
                return _load_masks(path)
            except (OSError, ValueError, KeyError) as e:
                warnings.warn(f"mask file {str(path)!r} is damaged ({e}); tracing again",
                              UserWarning, stacklevel=2)
    with warnings.catch_warnings():
        # reported per layer in the rows (``flagged``, the kept counts and the chance line)
        warnings.simplefilter("ignore", pruning.SparsityTargetWarning)
        result = trace(model, images.float_images([int(index)])[0], sparsity=sparsity,
                       pruner=cfg.pruner, n_augmentations=cfg.n_augmentations,
                       recipe=cfg.augment, batch_size=results.TRACE_BATCH,
                       seed=_image_seed(cfg.seed, source, int(index)))
    masks = trace_masks(result)
    report = result.report.set_index("layer")
    flagged = {n: bool(report.loc[n, "empty"] or report.loc[n, "excess"] > 0
                       or report.loc[n, "spared"] > 0) for n in masks}
    if path is not None:
        _save_masks(path, masks, flagged)
    return masks, flagged


def mask_agreement_rows(cfg: Config, model: nn.Module, samples: Samples, pairs: pd.DataFrame,
                        sparsity: schedules.SparsitySpec = PAPER_MASK_SPARSITY, store: bool = True,
                        progress: bool = True) -> pd.DataFrame:
    """Figure K.11's numbers: :func:`spade_lib.fidelity.mask_agreement` of every pair (each image
    traced once, :func:`image_masks`), with the dense model's zero weights per layer beside them.

    Parameters
    ----------
    samples, pairs
        The pool and its pairs (:func:`agreement_pairs`).
    sparsity
        The trace's sparsity (default 0.99 on every default layer, as in the paper).
    store, progress
        Cache each image's masks; show a progress bar over pairs.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`AGREEMENT_COLUMNS`, ordered as ``pairs``, then by layer.
    """
    check_columns(pairs, PAIR_COLUMNS, "select_pairs() or agreement_pairs()")
    dense = weight_masks(model, pruned_layers(model, sparsity))
    zeros = {name: int((~m).sum()) for name, m in dense.items()}
    if store:
        key = _masks_key(cfg, model, sparsity, [r.name for r in samples.poisoned.rules])
        meta = ResultStore(cfg.cache_path("fidelity", "masks", key, "meta.json").parent)
        if meta.read_meta() is None:
            meta.write_meta({"key": key, "config": cfg.to_dict(), "model": model_fingerprint(model),
                             "sparsity": schedules.resolve_sparsity(model, sparsity),
                             "numerics": reproducibility.settings()})
    parts = []
    for pair in tqdm(pairs.itertuples(index=False), total=len(pairs), desc="pairs",
                     disable=not progress):
        ma, fa = image_masks(cfg, model, samples, pair.source_a, pair.index_a, sparsity, store)
        mb, fb = image_masks(cfg, model, samples, pair.source_b, pair.index_b, sparsity, store)
        part = mask_agreement(ma, mb)
        part["flagged"] = [fa[n] or fb[n] for n in part["layer"]]
        part["dense_zeros"] = [zeros[n] for n in part["layer"]]
        for col in ("kind", "pair", "rule_name", "label_a", "label_b"):
            part.insert(0, col, getattr(pair, col))
        parts.append(part)
    return pd.concat(parts, ignore_index=True)[list(AGREEMENT_COLUMNS)]


def agreement_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Figure K.11's bars: per kind and layer, the mean agreement over pairs with its standard
    deviation, standard error and counts, and the mean chance line and kept share.

    The last rows per kind (layer :data:`ALL_LAYERS`) average each pair's layers first. Columns:
    ``kind``, ``layer``, ``position``, ``mean``, ``std``, ``se``, ``n``, ``n_nan``, ``chance``,
    ``kept`` (mean of ``(kept_a + kept_b) / (2 weights)``), ``flagged`` (pairs with the layer off
    its target).
    """
    check_columns(rows, AGREEMENT_COLUMNS, "mask_agreement_rows()")
    rows = rows.assign(kept=(rows["kept_a"] + rows["kept_b"]) / (2 * rows["weights"]))
    out = []
    for (kind, layer, position), part in rows.groupby(["kind", "layer", "position"], sort=False):
        out.append({"kind": kind, "layer": layer, "position": position,
                    **spread(part["agreement"]), "chance": float(part["chance"].mean()),
                    "kept": float(part["kept"].mean()), "flagged": int(part["flagged"].sum())})
    last = int(rows["position"].max()) + 1
    means = {c: layer_means(rows, ["pair"], "kind", c) for c in ("agreement", "chance", "kept")}
    for kind, part in means["agreement"].groupby("kind", sort=False):
        pick = {c: m.loc[m["kind"] == kind, c] for c, m in means.items()}
        out.append({"kind": kind, "layer": ALL_LAYERS, "position": last,
                    **spread(part["agreement"]), "chance": float(pick["chance"].mean()),
                    "kept": float(pick["kept"].mean()),
                    "flagged": int(rows.loc[rows["kind"] == kind].groupby("pair")["flagged"]
                                   .any().sum())})
    order = {k: i for i, k in enumerate(AGREEMENT_KINDS)}
    out = pd.DataFrame(out)
    rank = out["kind"].map(order).fillna(len(order))
    return out.assign(_rank=rank).sort_values(["_rank", "position"], kind="stable").drop(
        columns="_rank").reset_index(drop=True)


def agreement_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Figure K.11 as a table: per layer (in order, then :data:`ALL_LAYERS`), the mean agreement
    and its standard error for each kind, the chance line, the kept share and the pairs with the
    layer off its target, all from :func:`agreement_summary`.

    Columns are two-level: ``("mean", kind)`` and ``("se", kind)`` for each kind of
    :data:`AGREEMENT_KINDS` present, then ``("chance", "")``, ``("kept", "")``, ``("flagged", "")``
    (the chance line and kept share averaged over every pair, the flags summed).
    """
    summary = agreement_summary(rows)
    kinds = [k for k in AGREEMENT_KINDS if k in set(summary["kind"])]
    layers = list(dict.fromkeys(summary.sort_values("position", kind="stable")["layer"]))
    wide = summary.pivot(index="layer", columns="kind").reindex(layers)
    out = pd.concat({"mean": wide["mean"][kinds], "se": wide["se"][kinds]}, axis=1)
    n = summary.pivot(index="layer", columns="kind", values="n").reindex(layers)[kinds]
    for stat in ("chance", "kept"):
        out[(stat, "")] = (wide[stat][kinds] * n).sum(axis=1) / n.sum(axis=1)
    out[("flagged", "")] = wide["flagged"][kinds].sum(axis=1).astype(int)
    out.index.name = "layer"
    return out


def default_pairs(cfg: Config) -> int:
    """Pairs per kind for the preset: :data:`MIN_PAIRS`, or half the preset's ``samples`` where
    that is fewer (the ``smoke`` preset: 2), at least 2."""
    return max(2, min(MIN_PAIRS, cfg.samples // 2))


def agreement_verdicts(rows: pd.DataFrame,
                       paper: tuple[float, float] = PAPER_MASK_AGREEMENT) -> pd.DataFrame:
    """The paper's claims on mask agreement, each with a verdict at one standard error.

    * per kind: the agreement averaged over layers lies in ``paper`` (20-60%):
      :func:`spade_lib.tables.range_verdict` of the mean over pairs;
    * "highest for the most similar images": each kind above the one before it in
      :data:`AGREEMENT_KINDS`, and the most alike above the least (difference of the means;
      standard error ``sqrt(se_1^2 + se_2^2)``, the pairs being independent);
    * "highest in earlier layers": per pair, the mean over the first third of the layers minus
      the mean over the last third, averaged over every pair of every kind; it holds when that
      difference is positive beyond one standard error.

    Returns
    -------
    pandas.DataFrame
        ``claim``, ``value``, ``se``, ``n``, ``verdict``; ``attrs["sentence"]`` says it in one
        Markdown paragraph.
    """
    check_columns(rows, AGREEMENT_COLUMNS, "mask_agreement_rows()")
    low, high = paper
    means = layer_means(rows, ["pair"], "kind", "agreement")
    kinds = [k for k in AGREEMENT_KINDS if k in set(means["kind"])]
    spreads = {k: spread(means.loc[means["kind"] == k, "agreement"]) for k in kinds}
    out = []
    for k in kinds:
        s = spreads[k]
        out.append({"claim": f"{k}: agreement in [{low:.0%}, {high:.0%}]", "value": s["mean"],
                    "se": s["se"], "n": s["n"],
                    "verdict": range_verdict(s["mean"], s["se"], low, high)})
    steps = list(zip(kinds, kinds[1:], strict=False))
    if len(kinds) > 2:
        steps.append((kinds[0], kinds[-1]))
    for lo, hi in steps:
        a, b = spreads[lo], spreads[hi]
        delta, se = b["mean"] - a["mean"], math.sqrt(a["se"] ** 2 + b["se"] ** 2)
        out.append({"claim": f"{hi} above {lo}", "value": delta, "se": se,
                    "n": min(a["n"], b["n"]), "verdict": claim_verdict(delta, se, 1.0)})
    positions = sorted(set(rows["position"]))
    third = max(1, len(positions) // 3)
    first, last = positions[:third], positions[-third:]

    def part_mean(pos: Sequence[int]) -> pd.Series:
        pick = rows[rows["position"].isin(pos)]
        return pick.groupby(["kind", "pair"])["agreement"].agg(lambda v: v.mean(skipna=False))

    s = spread(part_mean(first) - part_mean(last))
    out.append({"claim": f"first {third} layers above last {third}", "value": s["mean"],
                "se": s["se"], "n": s["n"], "verdict": claim_verdict(s["mean"], s["se"], 1.0)})
    table = pd.DataFrame(out, columns=["claim", "value", "se", "n", "verdict"])
    table.attrs["sentence"] = _agreement_sentence(table, paper)
    return table


def _agreement_sentence(table: pd.DataFrame, paper: tuple[float, float]) -> str:
    held = int((table["verdict"] == "holds").sum())
    failed = [c for c, v in zip(table["claim"], table["verdict"], strict=True) if v == "fails"]
    open_ = [c for c, v in zip(table["claim"], table["verdict"], strict=True)
             if v not in ("holds", "fails")]
    text = (f"The paper: masks of two inputs agree between {paper[0]:.0%} and {paper[1]:.0%}, "
            f"most in earlier layers and for the most similar images. Here **{held} of "
            f"{len(table)}** of these claims hold at one standard error")
    if failed:
        text += f"; **fails**: {'; '.join(failed)}"
    if open_:
        text += f"; inconclusive: {'; '.join(open_)}"
    return text + "."
