"""Chapter E's evaluation: the runner over evaluation samples, its cache, tables and verdict."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from nets import COS_TOL

from spade_lib import fidelity, gradient_noise, schedules
from spade_lib.results import Variant, variant_network
from spade_lib.samples import Samples, sample_seed
from spade_lib.tables import ALL_LAYERS

# --------------------------------------------------------------------------------------------
# The runner (smoke scenes, a random ResNet-20)
# --------------------------------------------------------------------------------------------

def test_gradient_noise_rows_pair_dense_and_spade_and_cache(cfg, model, scenes):
    cfg = cfg.replace(sparsity=0.8, n_augmentations=8)
    test, poisoned = scenes
    two = Samples.from_ids(poisoned, test, np.flatnonzero(poisoned.rule.numpy() == 0)[:2].tolist())
    rows = gradient_noise.gradient_noise_rows(cfg, model, two, n_copies=4, progress=False)
    layers = schedules.default_layers(model)
    assert list(rows.columns) == list(gradient_noise.GRADIENT_COLUMNS)
    assert len(rows) == 2 * 2 * (1 + len(layers))
    info = two.table.iloc[1]
    image = two.poisoned.float_images([int(info["sample"])])[0]
    seed = sample_seed(cfg.seed, int(info["sample"]))
    spade = variant_network(cfg, model, two, 1, Variant("spade", cfg.sparsity))[0]
    for variant, net in (("dense", model), ("spade", spade)):
        want = fidelity.gradient_noise(net, image, int(info["target"]), layers, 4, seed=seed)
        got = rows[(rows["sample"] == info["sample"]) & (rows["variant"] == variant)]
        np.testing.assert_allclose(got["cosine"], want["cosine"], atol=COS_TOL)
    again = gradient_noise.gradient_noise_rows(cfg, model, two, n_copies=4, progress=False)
    pd.testing.assert_frame_equal(rows, again)
    key = gradient_noise.gradient_noise_key(cfg, model, 4, fidelity.SMOOTHGRAD_NOISE,
                                      [r.name for r in two.poisoned.rules])
    meta = cfg.cache_path("fidelity", "gradient-noise", key, "meta.json")
    assert json.loads(meta.read_text())["key"] == key == rows["config_hash"].iloc[0]
    summary = gradient_noise.gradient_noise_summary(rows)
    assert summary["layer"].iloc[-1] == ALL_LAYERS and (summary["n"] == 2).all()



# --------------------------------------------------------------------------------------------
# Summaries and verdict
# --------------------------------------------------------------------------------------------

def _cosines(delta: list[float]) -> pd.DataFrame:
    rows = []
    for s, d in enumerate(delta):
        for pos, layer in enumerate(("input", "a")):
            base = 0.5 + 0.01 * s
            rows.append({"sample": s, "variant": "dense", "layer": layer, "position": pos,
                         "cosine": base})
            rows.append({"sample": s, "variant": "spade", "layer": layer, "position": pos,
                         "cosine": base + d})
    return pd.DataFrame(rows)


def test_gradient_noise_verdict_follows_the_paired_differences():
    up = gradient_noise.gradient_noise_verdict(_cosines([0.1, 0.12, 0.08]))
    assert up["verdict"] == "holds" and up["delta"] == pytest.approx(0.1)
    assert up["se"] == pytest.approx(0.02 / math.sqrt(3))
    assert up["layers_higher"] == 2 and up["layers_lower"] == 0 and up["n"] == 3
    assert "**holds**" in up["sentence"] and "0.7355" in up["sentence"]
    down = gradient_noise.gradient_noise_verdict(_cosines([-0.1, -0.12, -0.08]))
    assert down["verdict"] == "fails"
    assert gradient_noise.gradient_noise_verdict(_cosines([0.1, -0.1, 0.01]))["verdict"] == \
        "inconclusive"
    same = gradient_noise.gradient_noise_verdict(_cosines([0.0, 0.0, 0.0]))   # like the logits' row
    assert same["verdict"] == "inconclusive" and same["layers_higher"] == 0 == same["layers_lower"]
    nan = _cosines([0.1, 0.1])
    nan.loc[nan["sample"] == 0, "cosine"] = np.nan
    assert gradient_noise.gradient_noise_verdict(nan)["verdict"] == "inconclusive"   # one sample
    table = gradient_noise.gradient_noise_summary(nan).set_index(["layer", "variant"])
    assert table.loc[("a", "spade"), "n"] == 1 and table.loc[("a", "spade"), "n_nan"] == 1
    wide = gradient_noise.gradient_noise_table(_cosines([0.1, 0.12, 0.08]))
    assert list(wide.index) == ["input", "a", ALL_LAYERS]
    assert wide.loc["a", "spade"] - wide.loc["a", "dense"] == pytest.approx(0.1)
    assert wide.loc["a", "dense_std"] == pytest.approx(0.01)
    assert wide["delta"].to_numpy() == pytest.approx([0.1] * 3)
    assert wide["se"].to_numpy() == pytest.approx([0.02 / math.sqrt(3)] * 3)
