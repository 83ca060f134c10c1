"""Insertion/deletion runner (Table J.18): rows against a direct computation on the dense model,
the resumable store, clean images, degenerate maps, and the table and verdict on known numbers."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from spade_lib import attribution, data, insertion, metrics, results
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
        ends = insertion.endpoints(table).loc[s]
        with torch.no_grad():
            p = torch.softmax(model(torch.stack([image, metrics.petsiuk_blur(image),
                                                 torch.zeros_like(image)])).double(), 1)
        np.testing.assert_allclose(ends.to_numpy(), p[:, explained].numpy(), atol=1e-5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_store_resumes_and_key_follows_the_protocol(cfg, model, samples, stand_in) -> None:
    first = _run(cfg, model, samples, stand_in, store=True)
    key = first["config_hash"][0]
    cost = insertion.timings(first)
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
    s = insertion.summary(table).set_index(["metric", "method", "variant"])
    assert s.loc[("insertion", "Saliency", "sparse_fc"), "n"] == 0
    assert math.isnan(s.loc[("insertion", "Saliency", "sparse_fc"), "value"])
    assert s.loc[("insertion", "Saliency", "dense"), "n"] == 2
    assert "not comparable" in insertion.claim_sentence(
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


# --------------------------------------------------------------------------------------------
# Tables on known numbers
# --------------------------------------------------------------------------------------------

def _rows(values: dict[tuple[str, str, str], list[float]], metric_offset: float = 0.5,
          ) -> pd.DataFrame:
    """Rows with given normalised insertion per (method, variant, aggregation) and sample;
    deletion = ``metric_offset`` - insertion, so a better insertion is a better deletion."""
    out = []
    for (method, variant, how), per_sample in values.items():
        for s, v in enumerate(per_sample):
            out.append({"sample": s, "kind": "trojan", "rule_name": "r", "label": 1,
                        "explained": 1, "method": method, "variant": variant,
                        "aggregation": how, "full_probability": 0.5, "insertion": v / 2,
                        "deletion": (metric_offset - v) / 2, "insertion_normalised": v,
                        "deletion_normalised": metric_offset - v,
                        "insertion_curve": np.zeros(3), "deletion_curve": np.zeros(3),
                        "constant_map": False, "keeps_prediction": True, "trace_seconds": 0.0,
                        "attribution_seconds": 0.0, "config_hash": "k"})
    return insertion.typed_rows(pd.DataFrame(out))


def test_summary_differences_and_verdict_by_hand() -> None:
    values = {
        ("A", "dense", "sum"): [0.2, 0.4, 0.3], ("A", "dense", "abs"): [0.1, 0.1, 0.1],
        ("A", "spade", "sum"): [0.3, 0.5, 0.7], ("A", "spade", "abs"): [0.6, 0.6, 0.6],
        ("B", "dense", "sum"): [0.5, 0.5, 0.5], ("B", "dense", "abs"): [0.5, 0.5, 0.5],
        ("B", "spade", "sum"): [0.4, 0.6, 0.6], ("B", "spade", "abs"): [0.0, 0.0, 0.0],
    }
    rows = _rows(values)
    s = insertion.summary(rows, percent=False).set_index(["metric", "method", "variant"])
    # insertion: A dense takes sum (mean .3 > .1), A spade takes abs (.6 > .5)
    assert s.loc[("insertion", "A", "dense"), "aggregation"] == "sum"
    assert s.loc[("insertion", "A", "spade"), "aggregation"] == "abs"
    assert s.loc[("insertion", "A", "dense"), "value"] == pytest.approx(0.3)
    assert s.loc[("insertion", "A", "dense"), "se"] == pytest.approx(0.1 / math.sqrt(3))
    assert s.loc[("insertion", "B", "dense"), "aggregation"] == "sum"  # a tie keeps sum
    # deletion = 0.5 - insertion: the lower deletion is the same choice
    assert s.loc[("deletion", "A", "spade"), "value"] == pytest.approx(0.5 - 0.6)
    assert s.loc[("insertion", "Average", "spade"), "value"] == pytest.approx((0.6 + 1.6 / 3) / 2)
    d = insertion.differences(rows, percent=False).set_index(["metric", "method"])
    assert d.loc[("insertion", "A"), "delta"] == pytest.approx(0.3)
    assert d.loc[("insertion", "A"), "se"] == pytest.approx(0.1 / math.sqrt(3))
    assert d.loc[("insertion", "B"), ["better", "worse"]].tolist() == [2, 1]
    per_sample = np.array([[0.4, 0.2, 0.3], [-0.1, 0.1, 0.1]]).mean(0)
    assert d.loc[("insertion", "Average"), "delta"] == pytest.approx(per_sample.mean())
    assert d.loc[("deletion", "Average"), "delta"] == pytest.approx(-per_sample.mean())
    assert d.loc[("deletion", "Average"), "better"] == 3
    se = per_sample.std(ddof=1) / math.sqrt(3)
    assert d.loc[("insertion", "Average"), "se"] == pytest.approx(se)
    assert insertion.claim_verdict(-0.15, 0.05, -1.0) == "holds"
    assert insertion.claim_verdict(-0.15, 0.05, 1.0) == "fails"
    assert insertion.claim_verdict(0.04, 0.05, 1.0) == "inconclusive"
    assert insertion.claim_verdict(math.nan, 0.05, 1.0) == "not comparable"
    sentence = insertion.claim_sentence(rows)
    gain = f"{100 * per_sample.mean():.2f} +- {100 * se:.2f}"
    assert (f"insertion +{gain} (paper +8.74): the claimed direction **holds** (2 of 2 methods "
            "better)") in sentence
    assert (f"deletion -{gain} (paper -1.12): the claimed direction **holds** (2 of 2 methods "
            "better)") in sentence
    level = insertion.claim_sentence(rows.assign(variant=rows["variant"].replace(
        {"spade": "sparse_fc"})))
    assert "Sparse FC against Dense (3 samples): insertion" in level and "**better** than" in level
    assert "Sparse FC" in sentence and "87.74" in sentence  # the paper's numbers, quoted
    fixed = insertion.summary(rows, aggregation="abs", percent=False).set_index(
        ["metric", "method", "variant"])
    assert fixed.loc[("insertion", "A", "dense"), "value"] == pytest.approx(0.1)


def test_table_j18_layout_and_paper_numbers() -> None:
    values = {(m, v, how): [0.8, 0.9] for m in ("Saliency", "Lime")
              for v in VARIANTS for how in metrics.AGGREGATIONS}
    table = insertion.table_j18(_rows(values))
    frame = table.data
    assert list(frame.index) == ["Saliency", "Lime", "Average"]
    assert frame.iloc[0, 0] == "85.00 +- 5.00"
    assert frame.loc["Average", ("Insertion (higher is better)", "paper: SPADE")] == "87.74"
    assert frame.loc["Lime", ("Deletion (lower is better)", "paper: Sparse FC")] == "5.32"
    assert "2 samples" in table.caption and "normalisation" in table.caption
    raw = insertion.table_j18(_rows(values), normalised=False).data
    assert raw.shape[1] == 6 and raw.iloc[0, 0] == "42.50 +- 2.50"  # paper columns: normalised only
    # the transcription: each Average of the paper's table is the mean of its rows, to rounding
    paper = insertion.PAPER_J18
    np.testing.assert_allclose(paper.drop("Average").mean(), paper.loc["Average"], atol=0.01)


def test_mean_curves() -> None:
    rows = _rows({("A", v, how): [0.5, 0.5] for v in VARIANTS for how in metrics.AGGREGATIONS})
    rows["insertion_curve"] = [np.array([0.1, 0.3, 0.5]), np.array([0.1, 0.2, 0.5])] * 6
    curves = insertion.mean_curves(rows, "A", "insertion")
    assert curves.index.tolist() == [0.0, 0.5, 1.0] and list(curves.columns) == list(VARIANTS)
    np.testing.assert_allclose(curves["dense"], [0.2, 0.5, 1.0])  # p / p(full) = p / 0.5
    with pytest.raises(ValueError, match="no scored rows of method 'B'"):
        insertion.mean_curves(rows, "B")
