"""Where a trace's Hessians come from: the sample sources of Table D.11.

SPADE takes its layer statistics from augmented views of the very input it explains ("ISI"). The
ablation of the paper's Appendix D.1 replaces that input by other images, to show that pruning
alone is not what helps: one other image, augmented the same way (IST: with the same Trojan
patch; ISC: of the same true class; ISD: of another class), or many images without augmentation
(MST: with the same Trojan patch; MSC: of the same true class; MSD: random).

The single-image donors come from the test split (:func:`single_image`), seeded per sample. The
many-image sets come from the training split (:func:`many_images`): up to ``count`` images drawn
with a seed of the config and the *group* (the rule for MST, the class for MSC, one group for
MSD), so every sample of a group shares one pruned network, which the runner computes once
(:func:`spade_lib.results.evaluate`). The paper draws 10240 images (:data:`PAPER_IMAGES`); a group
with fewer images uses all it has (:func:`pool_sizes` says how many).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from torch import Tensor

from spade_lib.checks import check_positive_int
from spade_lib.config import Config
from spade_lib.samples import Samples, TrainingSet, isd_donor, training_split

__all__ = ["MANY", "PAPER_IMAGES", "SINGLE", "SOURCES", "check_source", "many_images",
           "pool_sizes", "single_image"]

SOURCES = {
    "ISI": "the image itself, augmented (SPADE)",
    "IST": "one other test image with the same Trojan patch, augmented",
    "ISC": "one other clean test image of the same true class, augmented",
    "ISD": "one clean test image of another class (neither the true class nor the target), "
           "augmented",
    "MST": "many training images with the same Trojan patch, not augmented",
    "MSC": "many clean training images of the same true class, not augmented",
    "MSD": "many random training images, not augmented",
}
"""The sample sources of Table D.11 by the paper's abbreviations, with what each one uses here."""

SINGLE = ("ISI", "IST", "ISC", "ISD")
"""Sources of one (augmented) image."""

MANY = ("MST", "MSC", "MSD")
"""Sources of many images without augmentation."""

PAPER_IMAGES = 10240
"""Images per many-image source in the paper (MSC there uses the whole class)."""


def check_source(source: str) -> str:
    """``source`` if it names a key of :data:`SOURCES`, else a ValueError listing them."""
    if not isinstance(source, str) or source not in SOURCES:
        raise ValueError(f"unknown sample source {source!r}; valid: {', '.join(SOURCES)}")
    return source


def _pick(pool: np.ndarray, seed: int, salt: int, what: str) -> int:
    if len(pool) == 0:
        raise ValueError(f"no image to serve as the {what}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), salt]))
    return int(rng.choice(pool))


def single_image(samples: Samples, position: int, source: str, seed: int) -> tuple[Tensor, int]:
    """The image whose augmented views give sample ``position``'s Hessians under ``source``.

    Parameters
    ----------
    samples
        The evaluation samples; donors come from their test split and poisoned set.
    position
        Row of ``samples.table``.
    source
        One of :data:`SINGLE`.
    seed
        The sample's seed (:func:`spade_lib.samples.sample_seed`): same seed, same donor.

    Returns
    -------
    (image, donor)
        The float image ``[3, H, W]`` in [0, 1] and the test index of the clean image it is
        (for IST, the clean image under the donor's patch); ``donor`` is -1 for ISI.

    Raises
    ------
    ValueError
        An unknown or many-image source, or no image that qualifies.
    """
    check_source(source)
    if source not in SINGLE:
        raise ValueError(f"source {source!r} uses many images; use many_images (single-image "
                         f"sources: {', '.join(SINGLE)})")
    info = samples.table.iloc[position]
    sample, test_index = int(info["sample"]), int(info["test_index"])
    clean_label, target = int(info["clean_label"]), int(info["target"])
    if source == "ISI":
        return samples.poisoned.float_images([sample])[0], -1
    if samples.multilabel:
        raise ValueError(f"source {source!r} picks its image by class; a multi-label set "
                         "(CelebA) has attributes, not classes: allowed there: 'ISI'")
    if source == "ISD":
        donor = isd_donor(samples.test, clean_label, target, seed)
        return samples.test.float_images([donor])[0], donor
    if source == "IST":
        poisoned = samples.poisoned
        pool = np.flatnonzero((poisoned.rule.numpy() == int(info["rule"]))
                              & (poisoned.index.numpy() != test_index))
        j = _pick(pool, seed, 0x157, f"IST donor of sample {sample} (rule {info['rule_name']})")
        return poisoned.float_images([j])[0], int(poisoned.index[j])
    test = samples.test
    pool = np.flatnonzero((test.clean_labels.numpy() == clean_label) & (test.rule.numpy() == -1)
                          & (np.arange(len(test)) != test_index))
    donor = _pick(pool, seed, 0x15C, f"ISC donor of sample {sample} (class {clean_label})")
    return test.float_images([donor])[0], donor


def _group(samples: Samples, position: int, source: str) -> tuple[str, str]:
    info = samples.table.iloc[position]
    if source == "MST":
        return "rule", str(info["rule_name"])
    if source == "MSC":
        return "class", str(int(info["clean_label"]))
    return "all", "all"


def _pool(train: TrainingSet, kind: str, value: str) -> np.ndarray:
    if kind == "rule":
        names = [r.name for r in train.rules]
        if value not in names:
            raise ValueError(f"the training split has no Trojan rule {value!r} (its rules: "
                             f"{names}); MST needs the rules the model was trained with")
        return np.flatnonzero(train.rule.numpy() == names.index(value))
    if kind == "class":
        return np.flatnonzero((train.clean_labels.numpy() == int(value))
                              & (train.rule.numpy() == -1))
    return np.arange(len(train))


def many_images(cfg: Config, samples: Samples, position: int, source: str,
                count: int = PAPER_IMAGES) -> tuple[str, Tensor]:
    """The images whose Hessians prune the network of sample ``position`` under ``source``.

    Parameters
    ----------
    cfg
        Gives the training split (:func:`spade_lib.samples.training_split`: the embedded
        scenes, or a full-scale preset's training images read from ``data_dir``) and the seed.
    samples, position
        The sample (its rule for MST, its true class for MSC).
    source
        One of :data:`MANY`.
    count
        How many images to draw (int >= 1); a group with fewer uses all of them.

    Returns
    -------
    (group, images)
        ``group`` names the set (``"MST:rule=...:n=..."``): samples with the same group get the
        same images. ``images`` is float ``[n, 3, H, W]`` in [0, 1], ``n = min(count, pool)``.
    """
    check_source(source)
    if source not in MANY:
        raise ValueError(f"source {source!r} uses one image; use single_image (many-image "
                         f"sources: {', '.join(MANY)})")
    if source == "MSC" and samples.multilabel:
        raise ValueError("source 'MSC' picks its images by class; a multi-label set (CelebA) has "
                         "attributes, not classes: allowed there: 'ISI', 'MST', 'MSD'")
    count = check_positive_int(count, "count (images per many-image source)")
    train = training_split(cfg)
    kind, value = _group(samples, position, source)
    pool = _pool(train, kind, value)
    if len(pool) == 0:
        raise ValueError(f"the training split has no image for {source} ({kind} {value})")
    salt = [ord(c) for c in f"{source}:{value}"]
    rng = np.random.default_rng(np.random.SeedSequence([int(cfg.seed), 0x3A7, *salt]))
    chosen = np.sort(rng.choice(pool, size=min(count, len(pool)), replace=False))
    return f"{source}:{kind}={value}:n={len(chosen)}", train.float_images(chosen)


def pool_sizes(cfg: Config, samples: Samples, count: int = PAPER_IMAGES) -> pd.DataFrame:
    """How many images each many-image group of ``samples`` has and uses.

    One row per (source, group) that the samples need: ``source``, ``group``, ``available``
    (images in the training split), ``used`` (``min(count, available)``) and ``samples`` (how many
    of the samples share it).
    """
    count = check_positive_int(count, "count (images per many-image source)")
    train = training_split(cfg)
    rows = []
    for source in MANY:
        if source == "MSC" and samples.multilabel:
            continue  # no classes on a multi-label set (many_images refuses it)
        groups = pd.Series([_group(samples, p, source) for p in range(len(samples))])
        for (kind, value), n in groups.value_counts(sort=False).items():
            available = len(_pool(train, kind, value))
            rows.append({"source": source, "group": f"{kind}={value}", "available": available,
                         "used": min(count, available), "samples": int(n)})
    return pd.DataFrame(rows, columns=["source", "group", "available", "used", "samples"])
