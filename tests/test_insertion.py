"""Insertion/deletion runner (Table J.18): rows against a direct computation on the dense model,
the resumable store, clean images, degenerate maps (the tables on known numbers:
``test_insertion_tables.py``)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from spade_lib import attribution, data, insertion, insertion_tables, metrics, results
from spade_lib.trace import trace

pytestmark = pytest.mark.usefixtures("one_thread", "quiet")

VARIANTS = ("dense", "sparse_fc", "spade")


@pytest.fixture
def samples(scenes: tuple[data.SceneSet, data.PoisonedSet]) -> results.Samples:
    test, poisoned = scenes
    return results.Samples.from_ids(poisoned, test, [3, 500])


@pytest.fixture
def stand_in(model: nn.Module) -> nn.Module:
    """A Sparse FC stand-in: the dense model with 80% of its head's weights (smallest) zeroed."""
    net = copy.deepcopy(model)
    w = net.fc.weight.data
    w[w.abs() < w.abs().quantile(0.8)] = 0
    return net


def _run(cfg, model, samples, stand_in, **kw) -> pd.DataFrame:
    kw.setdefault("store", False)
    kw.setdefault("variants", VARIANTS)
    return insertion.evaluate(cfg, model, samples, methods=["Saliency"],
                              networks={"sparse_fc": stand_in}, progress=False, **kw)


def test_rows_equal_a_direct_computation_on_the_dense_model(cfg, model, samples,
                                                             stand_in) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = _run(cfg, model, samples, stand_in)
    assert list(table.columns) == list(insertion.COLUMNS)
    assert len(table) == 2 * 3 * 2  # samples x variants x aggregations
    assert table["variant"].tolist()[:6] == [v for v in VARIANTS for _ in range(2)]
    for s in (3, 500):
        image = samples.poisoned.float_images([s])[0]
        explained = int(model(image[None]).argmax())
        pruned = trace(model, image, sparsity=cfg.sparsity, pruner=cfg.pruner,
                       n_augmentations=cfg.n_augmentations, recipe=cfg.augment,
                       batch_size=results.TRACE_BATCH,
                       seed=results.sample_seed(cfg.seed, s)).model
        for variant, net in (("dense", model), ("sparse_fc", stand_in), ("spade", pruned)):
            attr = attribution.attribute(net, image[None], explained, "Saliency")
            for how in metrics.AGGREGATIONS:
                # every curve on the DENSE model, Petsiuk's canvases, H steps
                want = metrics.insertion_deletion_curves(
                    model, image, attr.aggregate(how)[0], explained, normalize=False,
                    insertion_canvas="blur", deletion_canvas=0.0)
                got = table[(table["sample"] == s) & (table["variant"] == variant)
                            & (table["aggregation"] == how)].iloc[0]
                assert got["explained"] == explained  # the dense prediction (a random net's)
                assert got["label"] == samples.poisoned.labels[s]  # the Trojan target
                # the same float32 network on the same images in other batches: float32 round-off
                for col, value in (("insertion", want.insertion_area),
                                   ("deletion", want.deletion_area),
                                   ("insertion_normalised", want.insertion_normalised),
                                   ("deletion_normalised", want.deletion_normalised),
                                   ("full_probability", want.full_probability)):
                    assert got[col] == pytest.approx(value, abs=1e-5), (s, variant, how, col)
                np.testing.assert_allclose(got["insertion_curve"], want.insertion.numpy(),
                                           atol=1e-5)
                assert len(got["deletion_curve"]) == 32 + 1
        ends = insertion_tables.endpoints(table).loc[s]
        with torch.no_grad():
            p = torch.softmax(model(torch.stack([image, metrics.petsiuk_blur(image),
                                                 torch.zeros_like(image)])).double(), 1)
        np.testing.assert_allclose(ends.to_numpy(), p[:, explained].numpy(), atol=1e-5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_store_resumes_and_key_follows_the_protocol(cfg, model, samples, stand_in) -> None:
    first = _run(cfg, model, samples, stand_in, store=True)
    key = first["config_hash"][0]
    cost = insertion_tables.timings(first)
    assert cost.loc["trace", "Dense"] == 0 < cost.loc["trace", "SPADE"]
    assert cost["n"].tolist() == [2, 2] and cost.loc["Saliency"].gt(0).all()
    store = results.ResultStore(cfg.cache_path("results", key))
    assert store.done() == {3, 500} and store.read_meta()["protocol"]["steps"] == 32
    store.file(500).unlink()
    again = _run(cfg, model, samples, stand_in, store=True)
    curves = ["insertion_curve", "deletion_curve"]
    scalars = [c for c in insertion.COLUMNS
               if c not in (*curves, "attribution_seconds", "trace_seconds")]
    # bit-identical: the recomputed sample and the one read back
    pd.testing.assert_frame_equal(first[scalars], again[scalars], check_exact=True)
    for col in curves:
        for a, b in zip(first[col], again[col], strict=True):
            assert np.array_equal(a, b), col
    other = _run(cfg, model, results.Samples.from_ids(samples.poisoned, samples.test, [3]),
                 stand_in, store=True, protocol=insertion.Protocol(steps=8))
    assert other["config_hash"][0] != key and len(other["insertion_curve"][0]) == 9


def test_clean_images_explain_the_prediction(cfg, model, stand_in) -> None:
    two, three = insertion.clean_images(cfg, model, 2), insertion.clean_images(cfg, model, 3)
    assert set(two.ids) < set(three.ids)
    assert (two.test.rule[torch.as_tensor(two.ids)] == -1).all()
    table = _run(cfg, model, 2, stand_in, kind="clean")
    assert set(table["kind"]) == {"clean"} and table["sample"].unique().tolist() == two.ids
    images = two.test.float_images(two.ids)
    assert table.groupby("sample", sort=False)["explained"].first().tolist() == \
        model(images).argmax(1).tolist()
    assert table.groupby("sample", sort=False)["label"].first().tolist() == \
        two.table["clean_label"].tolist()
    with pytest.raises(ValueError, match="needs Trojan samples"):
        insertion.evaluate(cfg, model, two, methods=["Saliency"],
                           variants=("dense", results.Variant("isd", 0.5, other_image=True)),
                           store=False, progress=False)


def test_constant_maps_are_nan_and_counted(cfg, model, samples) -> None:
    blind = copy.deepcopy(model)
    blind.fc.weight.data.zero_()  # every logit is its bias: zero gradient, a constant map
    table = insertion.evaluate(cfg, model, samples, methods=["Saliency"],
                               variants=("dense", "sparse_fc"), networks={"sparse_fc": blind},
                               store=False, progress=False)
    flat = table[table["variant"] == "sparse_fc"]
    assert flat["constant_map"].all() and flat[list(insertion.AREAS)].isna().all().all()
    assert not table.loc[table["variant"] == "dense", "constant_map"].any()
    s = insertion_tables.summary(table).set_index(["metric", "method", "variant"])
    assert s.loc[("insertion", "Saliency", "sparse_fc"), "n"] == 0
    assert math.isnan(s.loc[("insertion", "Saliency", "sparse_fc"), "value"])
    assert s.loc[("insertion", "Saliency", "dense"), "n"] == 2
    assert "not comparable" in insertion_tables.claim_sentence(
        table.assign(variant=table["variant"].replace({"sparse_fc": "spade"})))


def test_bad_arguments(cfg, model, samples, stand_in) -> None:
    with pytest.raises(ValueError, match="unknown variant 'sparse'"):
        _run(cfg, model, samples, stand_in, variants=("dense", "sparse"))
    with pytest.raises(ValueError, match=r"networks names \['extra'\]"):
        insertion.evaluate(cfg, model, samples, methods=["Saliency"], variants=("dense",),
                           networks={"extra": stand_in}, store=False, progress=False)
    with pytest.raises(ValueError, match="unknown kind 'noise'"):
        _run(cfg, model, 2, stand_in, kind="noise")
    with pytest.raises(ValueError, match="samples must be an integer >= 1"):
        _run(cfg, model, 0, stand_in)
