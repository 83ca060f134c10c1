"""Chapter K's evaluation: the pairs, the runner with its per-image cache, tables and verdicts."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from nets import model_state, same_state

from spade_lib import mask_agreement, schedules
from spade_lib.samples import Samples
from spade_lib.tables import ALL_LAYERS

# --------------------------------------------------------------------------------------------
# Pairs
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pool(scenes) -> Samples:
    test, poisoned = scenes
    ids = [i for k in range(len(poisoned.rules))
           for i in np.flatnonzero(poisoned.rule.numpy() == k)[:20].tolist()]
    return Samples.from_ids(poisoned, test, ids)


def test_pairs_of_each_kind_are_what_they_claim_and_disjoint(pool):
    pairs = mask_agreement.select_pairs(pool, 4, seed=0)
    assert list(pairs.columns) == list(mask_agreement.PAIR_COLUMNS)
    assert pairs["kind"].value_counts().to_dict() == \
        dict.fromkeys(mask_agreement.AGREEMENT_KINDS, 4)
    rule = dict(zip(pool.table["sample"], pool.table["rule_name"], strict=True))
    label = dict(zip(pool.table["sample"], pool.table["clean_label"], strict=True))
    test = pool.test
    for p in pairs.itertuples():
        if p.kind == "random":
            assert p.source_a == p.source_b == "test" and p.rule_name == ""
            assert test.rule[p.index_a] == test.rule[p.index_b] == -1
            assert test.clean_labels[p.index_a] == p.label_a != p.label_b \
                == test.clean_labels[p.index_b]
        else:
            assert p.source_a == p.source_b == "poisoned"
            assert rule[p.index_a] == rule[p.index_b] == p.rule_name
            assert (label[p.index_a], label[p.index_b]) == (p.label_a, p.label_b)
            assert (p.label_a == p.label_b) == (p.kind == "same Trojan and class")
    trojan = pairs[pairs["source_a"] == "poisoned"]
    mix = trojan.groupby(["kind", "rule_name"]).size().unstack("kind")
    assert (mix["same Trojan"] == mix["same Trojan and class"]).all()   # the same Trojans
    several = {r for r, part in pool.table.groupby("rule_name")
               if part["clean_label"].nunique() > 1}
    assert set(mix.index) == several and len(several) == 2   # the two "Any" rules
    images = [*trojan["index_a"], *trojan["index_b"]]
    assert len(set(images)) == len(images)
    clean = [*pairs.loc[pairs["kind"] == "random", "index_a"],
             *pairs.loc[pairs["kind"] == "random", "index_b"]]
    originals = set(pool.table["test_index"])
    assert len(set(clean)) == len(clean) and not set(clean) & originals
    pd.testing.assert_frame_equal(pairs, mask_agreement.select_pairs(pool, 4, seed=0))
    assert not pairs.equals(mask_agreement.select_pairs(pool, 4, seed=1))


def test_a_small_pool_gives_fewer_pairs_with_a_warning(pool):
    with pytest.warns(UserWarning, match="fewer than 500 pairs"):
        pairs = mask_agreement.select_pairs(pool, 500)
    assert (pairs["kind"].value_counts() < 500).any()


def test_agreement_pairs_grow_the_pool_until_every_kind_is_full_and_cache_it(cfg, model, pool,
                                                                            monkeypatch):
    asked = []

    def evaluation_samples(c, m):
        asked.append(c.samples)
        return Samples.from_ids(pool.poisoned, pool.test, pool.ids[:c.samples])

    monkeypatch.setattr(mask_agreement, "evaluation_samples", evaluation_samples)
    pairs, found = mask_agreement.agreement_pairs(cfg, model, 2)
    # the first pools hold one rule's samples only (ids are grouped by rule), so it must grow
    assert len(asked) > 1 and asked == [max(cfg.samples, 8) * 2 ** i for i in range(len(asked))]
    assert pairs["kind"].value_counts().to_dict() == \
        dict.fromkeys(mask_agreement.AGREEMENT_KINDS, 2)
    pd.testing.assert_frame_equal(pairs, mask_agreement.select_pairs(found, 2, cfg.seed))
    monkeypatch.setattr(mask_agreement, "evaluation_samples", None)   # a rebuild runs no filter
    again, same = mask_agreement.agreement_pairs(cfg, model, 2)
    assert same.ids == found.ids
    pd.testing.assert_frame_equal(pairs, again)


# --------------------------------------------------------------------------------------------
# The runners (smoke scenes, a random ResNet-20)
# --------------------------------------------------------------------------------------------

def test_mask_agreement_rows_trace_each_image_once_and_cache(cfg, model, pool, monkeypatch):
    cfg = cfg.replace(n_augmentations=8)
    ids = pool.ids
    pairs = pd.DataFrame([
        ("same Trojan", 0, "poisoned", ids[0], 0, "poisoned", ids[0], 0, "x"),
        ("same Trojan", 1, "poisoned", ids[1], 0, "poisoned", ids[30], 1, "x"),
        ("random", 0, "test", 3, 0, "test", 5, 1, ""),
    ], columns=list(mask_agreement.PAIR_COLUMNS))
    before = model_state(model)
    rows = mask_agreement.mask_agreement_rows(cfg, model, pool, pairs, progress=False)
    assert same_state(before, model_state(model))
    layers = schedules.default_layers(model)
    assert list(rows.columns) == list(mask_agreement.AGREEMENT_COLUMNS)
    assert len(rows) == 3 * len(layers) and list(rows["layer"][:len(layers)]) == layers
    first = rows[rows["pair"] == 0].iloc[:len(layers)]
    assert (first["agreement"] == 1.0).all()      # an image against itself
    conv = rows[(rows["layer"] == layers[3]) & ~rows["flagged"]]
    assert (conv["kept_a"] / conv["weights"] < 0.02).all()
    assert (first["chance"] < 0.1).all() and (rows["dense_zeros"] == 0).all()
    calls = []
    monkeypatch.setattr(mask_agreement, "trace", lambda *a, **k: calls.append(1))
    again = mask_agreement.mask_agreement_rows(cfg, model, pool, pairs, progress=False)
    assert not calls
    pd.testing.assert_frame_equal(rows, again)



# --------------------------------------------------------------------------------------------
# Summaries and verdicts
# --------------------------------------------------------------------------------------------

def _agreements(levels: dict[str, list[float]], n_pairs: int = 4) -> pd.DataFrame:
    rows = []
    for kind, per_layer in levels.items():
        for pair in range(n_pairs):
            for pos, value in enumerate(per_layer):
                wobble = 0.01 * (pair - (n_pairs - 1) / 2)
                rows.append({"kind": kind, "pair": pair, "rule_name": "", "label_a": 0,
                             "label_b": 1, "layer": f"l{pos}", "position": pos, "weights": 100,
                             "kept_a": 1, "kept_b": 1, "overlap": 0,
                             "agreement": value + wobble, "chance": 0.01, "flagged": False})
    return pd.DataFrame(rows, columns=list(mask_agreement.AGREEMENT_COLUMNS))


def test_agreement_verdicts_hand_case():
    rows = _agreements({"random": [0.3, 0.2, 0.1], "same Trojan": [0.4, 0.3, 0.2],
                        "same Trojan and class": [0.6, 0.5, 0.4]})
    table = mask_agreement.agreement_verdicts(rows).set_index("claim")
    assert table.loc["random: agreement in [20%, 60%]", "value"] == pytest.approx(0.2)
    assert table.loc["random: agreement in [20%, 60%]", "verdict"] == "inconclusive"
    assert table.loc["same Trojan: agreement in [20%, 60%]", "verdict"] == "holds"
    assert table.loc["same Trojan and class: agreement in [20%, 60%]", "verdict"] == "holds"
    assert table.loc["same Trojan above random", "value"] == pytest.approx(0.1)
    assert (table.filter(like="above", axis=0)["verdict"] == "holds").all()
    assert table.loc["first 1 layers above last 1", "value"] == pytest.approx(0.2)
    assert "**6 of 7**" in table.attrs["sentence"]
    summary = mask_agreement.agreement_summary(rows)
    assert list(summary["kind"].unique()) == list(mask_agreement.AGREEMENT_KINDS)
    last = summary[summary["layer"] == ALL_LAYERS].set_index("kind")["mean"]
    assert last.to_dict() == pytest.approx({"random": 0.2, "same Trojan": 0.3,
                                            "same Trojan and class": 0.5})
    assert (summary["chance"] == 0.01).all() and (summary["kept"] == 0.01).all()
    wide = mask_agreement.agreement_table(rows)
    assert list(wide.index) == ["l0", "l1", "l2", ALL_LAYERS]
    assert wide[("mean", "same Trojan")].to_numpy() == pytest.approx([0.4, 0.3, 0.2, 0.3])
    # the wobbles are -1.5, -0.5, 0.5, 1.5 hundredths: std 0.01 sqrt(5/3), se std / 2
    assert wide[("se", "random")].iloc[0] == pytest.approx(0.01 * math.sqrt(5 / 3) / 2)
    assert (wide[("chance", "")] == 0.01).all() and (wide[("flagged", "")] == 0).all()
