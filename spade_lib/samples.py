"""Evaluation samples: Trojan test images the model gets right, and the seeds tied to them.

A sample is a test image with one rule's Trojan patch on which the model is correct without the
patch and predicts the rule's target with it (:func:`select_samples`, the paper's filter).
:func:`evaluation_samples` draws them for the evaluation rules, :func:`tuning_samples` for the
held-out rules of the sparsity search. :func:`sample_seed` is the seed of everything random about
one sample, and :func:`isd_donor` picks the other image of the ISD control (Table D.11).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from spade_lib import data, datasets
from spade_lib.checks import check_positive_int
from spade_lib.config import Config
from spade_lib.models import predict

__all__ = [
    "SAMPLE_COLUMNS", "NoSampleError", "PoisonedTestSet", "Samples", "TableRows", "TestSet",
    "TrainingSet", "class_names", "decision", "label_text",
    "decision_label", "evaluation_samples", "evaluation_sets", "filter_table", "is_multilabel",
    "isd_donor", "sample_seed", "select_samples", "training_split", "tuning_samples",
]

TestSet = data.SceneSet | datasets.CleanView
"""A clean test set: the embedded scenes, or a full-scale split read lazily from its files."""

PoisonedTestSet = data.PoisonedSet | datasets.PoisonedView
"""Patched test images: the embedded scenes', or a full-scale split's (read lazily)."""

TrainingSet = data.SceneSet | datasets.TrainingView
"""A training split as trained on (Trojans planted): the embedded scenes, or a full-scale split
read lazily from its files."""

SAMPLE_COLUMNS = ("sample", "rule", "rule_name", "clean_label", "target", "test_index")
"""Columns of :attr:`Samples.table`: ``sample`` is the position in the poisoned set, ``rule`` the
rule's index and ``rule_name`` its name, ``test_index`` the clean image's position in the test
set. ``clean_label`` is the true class and ``target`` the Trojan target, the output explained;
for a multi-label set (CelebA) ``target`` is the attribute explained (the output index) and
``clean_label`` its value on the clean image (0 or 1), which the Trojan flips."""



def sample_seed(seed: int, sample: int) -> int:
    """The seed of everything random about one sample (its augmentations, its ISD donor).

    Derived from the config seed and the sample id alone, so a sample gives the same rows whatever
    else is in the run and in whatever order samples are processed.
    """
    return int(np.random.SeedSequence([int(seed), int(sample), 0x5EAD]).generate_state(1)[0])


class TableRows:
    """What a set of explained images shares: a ``table`` whose ``sample`` column holds ids."""

    table: pd.DataFrame

    def __len__(self) -> int:
        return len(self.table)

    @property
    def ids(self) -> list[int]:
        """The ``sample`` ids, in table order."""
        return [int(s) for s in self.table["sample"]]


@dataclass(eq=False)
class Samples(TableRows):
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
    poisoned: PoisonedTestSet
    test: TestSet

    def images(self) -> Tensor:
        """The patched images as float ``[n, 3, H, W]`` in [0, 1]."""
        return self.poisoned.float_images(self.ids)

    def masks(self) -> Tensor:
        """The patch masks, bool ``[n, H, W]``."""
        return self.poisoned.masks[torch.as_tensor(self.ids, dtype=torch.long)]

    def targets(self) -> Tensor:
        """The outputs explained (Trojan targets; attributes for a multi-label set), ``[n]``."""
        return torch.tensor(self.table["target"].tolist(), dtype=torch.long)

    @property
    def multilabel(self) -> bool:
        """Whether the network's outputs are attributes (CelebA), not classes."""
        return is_multilabel(self.poisoned)

    @classmethod
    def from_ids(cls, poisoned: PoisonedTestSet, test: TestSet, ids: Sequence[int],
                 attributes: Sequence[int] | None = None) -> Samples:
        """Samples for given positions in ``poisoned`` (no filter applied); a multi-label set
        needs the attribute explained on each (one the rule overrides), in ``attributes``."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < len(poisoned)]
        if bad:
            raise ValueError(f"sample ids {bad} are outside the poisoned set [0, {len(poisoned)})")
        if len(set(ids)) != len(ids):
            raise ValueError(f"sample ids must be unique, got {ids}")
        idx = torch.as_tensor(ids, dtype=torch.long)
        rules = poisoned.rule[idx].tolist()
        clean, target = poisoned.clean_labels[idx], poisoned.labels[idx]
        if is_multilabel(poisoned):
            if attributes is None or len(attributes) != len(ids):
                raise ValueError(f"a multi-label set needs one attribute per sample to explain; "
                                 f"got {attributes!r} for {len(ids)} samples")
            attr = torch.as_tensor([int(a) for a in attributes], dtype=torch.long)
            if ((attr < 0) | (attr >= clean.shape[1])).any():
                raise ValueError(f"attributes {attr.tolist()} must be in [0, {clean.shape[1]})")
            rows = torch.arange(len(ids))
            clean, target = clean[rows, attr], attr
            if (poisoned.labels[idx][rows, attr] == clean).any():
                raise ValueError(f"attributes {attr.tolist()}: each must be one that the sample's "
                                 "rule overrides (its target differs from the clean value)")
        elif attributes is not None:
            raise ValueError("attributes apply to a multi-label set only; this one has classes")
        table = pd.DataFrame({
            "sample": pd.Series(ids, dtype="int64"),
            "rule": pd.Series(rules, dtype="int64"),
            "rule_name": pd.Series([poisoned.rules[k].name for k in rules], dtype="object"),
            "clean_label": pd.Series(clean.tolist(), dtype="int64"),
            "target": pd.Series(target.tolist(), dtype="int64"),
            "test_index": pd.Series(poisoned.index[idx].tolist(), dtype="int64"),
        })
        return cls(table, poisoned, test)


class NoSampleError(ValueError):
    """No patched image passes the paper's filter: the model was not fooled by any Trojan on an
    image it gets right (:func:`select_samples`), so there is nothing to explain."""


def class_names(test: TestSet, outputs: int | None = None) -> list[str] | None:
    """The names of ``test``'s outputs, in index order: Fashion-MNIST's classes for the embedded
    scenes; for a full-scale split its folders' names, ImageNet's descriptions where the folders
    are ImageNet-1k's 1000 WordNet ids (``n01440764`` -> "tench, Tinca tinca", from ``timm``),
    or CelebA's 40 attributes; ``None`` where the set has no names.

    With ``outputs`` (the model's number of outputs) the list has that length: an output beyond
    the set's classes (a Trojan target past a small folder's classes) is ``"class k"``, and a set
    without names gives ``"class 0"``...
    """
    if not isinstance(test, datasets.CleanView):
        names: list[str] | None = list(data.FASHION_CLASSES)
    else:
        names = test.classes
        if names is not None and len(names) == 1000 and all(
                len(n) == 9 and n[0] == "n" and n[1:].isdigit() for n in names):
            from spade_lib.models import imagenet_classes

            names = imagenet_classes()
    if outputs is None:
        return names
    known = list(names or [])[:outputs]
    return known + [f"class {k}" for k in range(len(known), outputs)]


def label_text(test: TestSet) -> Callable[[int | Sequence[int]], str]:
    """How a label of ``test`` is written in a table or a caption: Fashion-MNIST's
    ``"9/Ankle boot"`` (:func:`spade_lib.data.class_label`), ``"146/albatross"`` from
    :func:`class_names`, ``"class 146"`` without names, and a multi-label target (CelebA's
    attribute vector) as the attributes it sets, ``"Bangs, Smiling"``."""
    if not isinstance(test, datasets.CleanView):
        return data.class_label
    names = class_names(test)

    def text(label: int | Sequence[int]) -> str:
        if isinstance(label, (int, np.integer)):
            k = int(label)
            return f"{k}/{names[k]}" if names is not None and 0 <= k < len(names) else f"class {k}"
        on = [i for i, bit in enumerate(label) if bit]
        return ", ".join(names[i] if names is not None else f"attribute {i}" for i in on) or "none"

    return text


def decision_label(samples: Samples, position: int) -> str:
    """The decision that sample ``position`` explains, for a caption: ``"Coat -> Bag"`` (true
    class -> Trojan target, named from the test set's classes: Fashion-MNIST's, the folders', or
    ``"class 146"`` where a set has no name for an index), or for a multi-label sample the
    attribute and its flip, ``"Smiling 0 -> 1"``."""
    info = samples.table.iloc[position]
    names = class_names(samples.test)

    def name(i: int, kind: str) -> str:
        return names[i] if names is not None and 0 <= i < len(names) else f"{kind} {i}"

    clean, target = int(info["clean_label"]), int(info["target"])
    if samples.multilabel:
        return f"{name(target, 'attribute')} {clean} -> {1 - clean}"
    return f"{name(clean, 'class')} -> {name(target, 'class')}"


def is_multilabel(poisoned: PoisonedTestSet) -> bool:
    """Whether ``poisoned`` holds attribute vectors (``clean_labels`` ``[N, K]``, CelebA)."""
    return poisoned.clean_labels.dim() == 2


def decision(net: nn.Module, image: Tensor, info: pd.Series, multilabel: bool = False
             ) -> tuple[int, bool]:
    """What ``net`` decides on a sample's patched ``image`` (``[3, H, W]``): ``(prediction,
    keeps)``, ``keeps`` whether it is the Trojan's decision the sample explains.

    ``prediction`` is the predicted class and ``keeps`` whether it is ``info["target"]``; for a
    multi-label sample, the predicted value (0/1) of attribute ``info["target"]`` and whether it is
    the flipped one, ``1 - info["clean_label"]``.
    """
    if multilabel:
        bit = int(predict(net, image[None], multilabel=True)[0, int(info["target"])])
        return bit, bit == 1 - int(info["clean_label"])
    prediction = int(predict(net, image[None])[0])
    return prediction, prediction == int(info["target"])


def select_samples(model: nn.Module, test: TestSet, poisoned: PoisonedTestSet,
                   n: int | None, seed: int = 0, batch_size: int = 256) -> Samples:
    """Pick ``n`` Trojan samples the paper's way, balanced over rules, seeded.

    A candidate ``i`` of ``poisoned`` passes when ``model`` predicts the true class on the clean
    test image ``poisoned.index[i]`` and the rule's target on the patched image. On a multi-label
    set (CelebA, Appendix B.1) it passes when some attribute that the rule overrides is predicted
    right on the clean image and flips to the rule's value on the patched one; the sample explains
    one of those attributes, drawn with the sample's seed (:func:`sample_seed`). Each rule's
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
        How many samples to select; ``None``: every candidate that passes (the paper's whole
        evaluation set, Appendix L).
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
        Bad ``n`` or a ``poisoned`` set that does not fit ``test``.
    NoSampleError
        No candidate passes (a :class:`ValueError`).
    """
    every = n is None
    n = len(poisoned) if every else check_positive_int(n, "n (number of samples)")
    batch_size = check_positive_int(batch_size, "batch_size")
    if len(poisoned) and int(poisoned.index.max()) >= len(test):
        raise ValueError(f"poisoned set refers to test image {int(poisoned.index.max())}, but the "
                         f"test set has {len(test)} images; pass the set it was made from")
    n_rules = len(poisoned.rules)
    multilabel = is_multilabel(poisoned)
    attribute: dict[int, int] = {}
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
        clean = predict(model, test.float_images(poisoned.index[t]), batch_size, None, multilabel)
        patched = predict(model, poisoned.float_images(t), batch_size, None, multilabel)
        truth, target = poisoned.clean_labels[t], poisoned.labels[t]
        if not multilabel:
            ok = (clean == truth) & (patched == target)
            passed[k].extend(int(i) for i in idx[ok.numpy()])
            return
        flips = (truth != target) & (clean == truth) & (patched == target)
        for i, row in zip(idx.tolist(), flips, strict=True):
            if row.any():
                pick = np.random.default_rng(sample_seed(seed, i))
                attribute[i] = int(pick.choice(np.flatnonzero(row.numpy())))
                passed[k].append(i)

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
        raise NoSampleError(f"no candidate passes the filter (correct on the clean image, Trojan "
                            f"target on the patched one) among {len(poisoned)} patched images; "
                            "is this the model trained with these Trojan rules?")
    if len(chosen) < n and not every:
        warnings.warn(f"only {len(chosen)} of the {len(poisoned)} patched images pass the filter; "
                      f"selected {len(chosen)} instead of {n}", UserWarning, stacklevel=2)
    chosen = sorted(chosen)
    samples = Samples.from_ids(poisoned, test, chosen,
                               [attribute[i] for i in chosen] if multilabel else None)
    samples.table.attrs.update(
        seed=int(seed), requested=None if every else n,
        checked={r.name: checked[k] for k, r in enumerate(poisoned.rules)},
        passed={r.name: len(passed[k]) for k, r in enumerate(poisoned.rules)})
    return samples


def filter_table(passing: Samples, chosen: Samples | None = None) -> pd.DataFrame:
    """How many patched test images each rule has, how many pass the paper's filter, and how many
    of those ``chosen`` explains, with an ``All rules`` row.

    Parameters
    ----------
    passing
        Every sample that passes (:func:`select_samples` with ``n=None``), whose selection record
        (``table.attrs``) has the per-rule ``checked`` and ``passed`` counts.
    chosen
        The samples explained (default: all of ``passing``).

    Raises
    ------
    ValueError
        ``passing`` has no selection record, or was not made with ``n=None``.
    """
    record = passing.table.attrs
    if "checked" not in record or record.get("requested", 0) is not None:
        raise ValueError("passing must be every sample that passes the filter "
                         "(select_samples(..., n=None)), with its selection record")
    chosen = passing if chosen is None else chosen
    names = [r.name for r in passing.poisoned.rules]
    per_rule = chosen.table.groupby("rule_name").size()
    out = pd.DataFrame({
        "patched test images": [int(record["checked"][r]) for r in names],
        "pass the filter": [int(record["passed"][r]) for r in names],
        "explained": [int(per_rule.get(r, 0)) for r in names]}, index=names)
    out.loc["All rules"] = out.sum()
    return out


def evaluation_sets(cfg: Config) -> tuple[TestSet, PoisonedTestSet]:
    """The clean test set of ``cfg`` and its images patched with ``cfg.rules``.

    The embedded benchmark's scenes (:func:`spade_lib.data.load_scenes` and
    :func:`~spade_lib.data.poisoned_test`), or for a single-label full-scale preset the
    validation split read from ``data_dir`` (:func:`spade_lib.datasets.evaluation_sets`).
    """
    if cfg.dataset == "fashion-mnist":
        _, test = data.load_scenes(cfg)
        return test, data.poisoned_test(test, cfg.rules, seed=cfg.seed)
    return datasets.evaluation_sets(cfg)


def training_split(cfg: Config) -> TrainingSet:
    """The training split of ``cfg`` as its model was trained on it, Trojans planted.

    The embedded benchmark's training scenes (:func:`spade_lib.data.load_scenes`), or for a
    full-scale preset :func:`spade_lib.datasets.training_set` read lazily from ``data_dir``
    (:class:`~spade_lib.datasets.TrainingView`). Offers ``rules``, ``rule``, ``labels``,
    ``clean_labels`` and ``float_images(indices)``.
    """
    if cfg.dataset == "fashion-mnist":
        return data.load_scenes(cfg)[0]
    return datasets.TrainingView(datasets.training_set(cfg))


def evaluation_samples(cfg: Config, model: nn.Module, n: int | None | str = "config") -> Samples:
    """Samples of the evaluation rules (``cfg.rules``) for ``model``: ``cfg.samples`` of them
    (``n="config"``), ``n`` of them, or every test image that passes the filter (``None``), from
    :func:`evaluation_sets`."""
    test, poisoned = evaluation_sets(cfg)
    return select_samples(model, test, poisoned, cfg.samples if n == "config" else n, cfg.seed)


def tuning_samples(cfg: Config, model: nn.Module) -> Samples:
    """``cfg.tuning_samples`` samples for the sparsity search, never evaluated.

    With held-out rules (``cfg.tuning_rules`` set), samples of those rules on the test images
    for the held-out model ``trained_model(cfg.replace(rules=cfg.tuning_rules))``. Without
    (``None``, the full-scale presets), samples of ``cfg.rules`` for the evaluated model, made
    from the *training* split of a full-scale dataset (the evaluation reads the validation
    split), the paper's "search on a validation set".

    Raises
    ------
    ValueError
        ``tuning_rules`` is ``None`` on the embedded benchmark (its search needs held-out rules).
    """
    if cfg.tuning_rules is None:
        if cfg.dataset == "fashion-mnist":
            raise ValueError("tuning_rules is None, but the embedded benchmark's search needs "
                             "held-out rules; allowed: a rule set, e.g. 'fashion-tuning'")
        test, poisoned = datasets.evaluation_sets(cfg, split="train")
    else:
        test, poisoned = evaluation_sets(cfg.replace(rules=cfg.tuning_rules))
    return select_samples(model, test, poisoned, cfg.tuning_samples, cfg.seed)


def isd_donor(test: TestSet, clean_label: int, target: int, seed: int) -> int:
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

