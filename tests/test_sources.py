"""Sample sources of Table D.11: which image(s) a trace's Hessians come from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spade_lib import config, data, results, sources
from spade_lib.samples import Samples, isd_donor, sample_seed


@pytest.fixture(scope="module")
def smoke() -> config.Config:
    return config.load("smoke")


@pytest.fixture(scope="module")
def samples(scenes: tuple[data.SceneSet, data.PoisonedSet]) -> Samples:
    test, poisoned = scenes
    # two samples of rule 0 and one of the last rule (the poisoned set is grouped by rule)
    last = int(np.flatnonzero(poisoned.rule.numpy() == len(poisoned.rules) - 1)[0])
    return Samples.from_ids(poisoned, test, [0, 5, last])


def test_isi_is_the_sample_itself(samples):
    image, donor = sources.single_image(samples, 1, "ISI", seed=7)
    assert torch.equal(image, samples.poisoned.float_images([5])[0]) and donor == -1


@pytest.mark.parametrize("position", [0, 1, 2])
def test_single_image_donors_qualify(samples, position):
    info = samples.table.iloc[position]
    test, poisoned = samples.test, samples.poisoned
    seed = sample_seed(0, int(info["sample"]))
    ist, ist_donor = sources.single_image(samples, position, "IST", seed)
    isc, isc_donor = sources.single_image(samples, position, "ISC", seed)
    isd, isd_index = sources.single_image(samples, position, "ISD", seed)
    # IST: a patched image of the same rule made from another clean image
    j = np.flatnonzero((poisoned.index.numpy() == ist_donor)
                       & (poisoned.rule.numpy() == int(info["rule"])))
    assert len(j) == 1 and ist_donor != int(info["test_index"])
    assert torch.equal(ist, poisoned.float_images(j)[0])
    # ISC: a clean image of the same true class, not the sample's own
    assert isc_donor != int(info["test_index"]) and int(test.rule[isc_donor]) == -1
    assert int(test.clean_labels[isc_donor]) == int(info["clean_label"])
    assert torch.equal(isc, test.float_images([isc_donor])[0])
    # ISD: the runner's donor (unchanged by the move to this module)
    assert isd_index == isd_donor(test, int(info["clean_label"]), int(info["target"]), seed)
    assert torch.equal(isd, test.float_images([isd_index])[0])


def test_single_image_donors_are_seeded(samples):
    for source in ("IST", "ISC"):
        donors = {sources.single_image(samples, 0, source, seed)[1] for seed in range(12)}
        assert sources.single_image(samples, 0, source, 3)[1] == \
            sources.single_image(samples, 0, source, 3)[1]
        assert len(donors) > 3, source             # 12 seeds over a pool of hundreds


def test_many_images_come_from_the_right_training_pool(smoke, samples):
    train, _ = data.load_scenes(smoke)
    k = int(samples.table.iloc[0]["rule"])
    group, images = sources.many_images(smoke, samples, 0, "MST", count=50)
    rows = _rows(train, images)
    assert len(rows) == 50 and (train.rule[rows] == k).all() and group == \
        f"MST:rule={samples.table.iloc[0]['rule_name']}:n=50"
    c = int(samples.table.iloc[0]["clean_label"])
    _, images = sources.many_images(smoke, samples, 0, "MSC", count=40)
    rows = _rows(train, images)
    assert (train.clean_labels[rows] == c).all() and (train.rule[rows] == -1).all()
    _, images = sources.many_images(smoke, samples, 2, "MSD", count=10 ** 6)
    assert len(images) == len(train)               # more than the pool: all of it


def _rows(train: data.SceneSet, images: torch.Tensor) -> torch.Tensor:
    """Positions in ``train`` of each image (the images of the split are distinct)."""
    flat = train.float_images().flatten(1)
    hits = [(flat == img.flatten()).all(1).nonzero()[:, 0] for img in images]
    assert all(len(h) == 1 for h in hits)
    return torch.cat(hits)


def test_a_group_shares_its_images_and_others_differ(smoke, samples):
    a = sources.many_images(smoke, samples, 0, "MST", count=30)
    b = sources.many_images(smoke, samples, 1, "MST", count=30)
    c = sources.many_images(smoke, samples, 2, "MST", count=30)
    assert a[0] == b[0] and torch.equal(a[1], b[1])          # the same rule: one network
    assert a[0] != c[0] and not torch.equal(a[1], c[1])
    other = sources.many_images(smoke.replace(seed=1), samples, 0, "MST", count=30)
    assert not torch.equal(a[1], other[1])


def test_pool_sizes_count_every_sample_once(smoke, samples):
    table = sources.pool_sizes(smoke, samples, count=100)
    assert set(table["source"]) == set(sources.MANY)
    assert (table.groupby("source")["samples"].sum() == len(samples)).all()
    assert (table["used"] == table["available"].clip(upper=100)).all()
    assert table[table["source"] == "MSD"]["available"].tolist() == [3000]


def test_bad_sources_name_the_valid_ones(smoke, samples):
    with pytest.raises(ValueError, match="unknown sample source 'XYZ'; valid: ISI, IST"):
        sources.single_image(samples, 0, "XYZ", 0)
    with pytest.raises(ValueError, match="uses many images"):
        sources.single_image(samples, 0, "MST", 0)
    with pytest.raises(ValueError, match="uses one image"):
        sources.many_images(smoke, samples, 0, "IST")
    with pytest.raises(ValueError, match="count"):
        sources.many_images(smoke, samples, 0, "MSD", count=0)


# --------------------------------------------------------------------------------------------
# The variants that use them
# --------------------------------------------------------------------------------------------

def test_old_variants_keep_their_description():
    """Adding options must not change the hash of the runs stored before them."""
    assert results.Variant("isd", 0.9, other_image=True).describe() == \
        {"name": "isd", "sparsity": 0.9, "other_image": True}
    assert results.Variant("s", 0.9).describe() == \
        {"name": "s", "sparsity": 0.9, "other_image": False}
    assert results.Variant("isd", 0.9, source="ISD") == \
        results.Variant("isd", 0.9, other_image=True)
    assert results.Variant("m", 0.9, source="MST", images=64).describe() == \
        {"name": "m", "sparsity": 0.9, "other_image": False, "source": "MST", "images": 64}
    assert results.Variant("o", 0.9, pruner="obc", pruner_options={"damp": 0.1}).describe() == \
        {"name": "o", "sparsity": 0.9, "other_image": False, "pruner": "obc",
         "pruner_options": {"damp": 0.1}}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"source": "ABC"}, "unknown sample source 'ABC'"),
    ({"source": "MST", "other_image": True}, "other_image means source 'ISD'"),
    ({"recipe": "J+J"}, "unknown augmentation recipe 'J\\+J'"),
    ({"n_augmentations": 0}, "n_augmentations"),
    ({"images": -3}, "images"),
    ({"pruner": "sgd"}, "unknown pruning method 'sgd'|'sgd'"),
    ({"pruner_options": {"mask_group": 0}}, "mask_group must be an int >= 1"),
])
def test_bad_variants_fail_when_made(kwargs, message):
    with pytest.raises(ValueError, match=message):
        results.Variant("v", 0.9, **kwargs)


def test_options_need_a_sparsity():
    with pytest.raises(ValueError, match="need a sparsity"):
        results.Variant("v", None, source="IST")
