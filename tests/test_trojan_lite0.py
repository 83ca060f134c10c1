"""The Trojan EfficientNet-Lite0: settings, the fine-tune's frozen and trained parts, the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spade_lib import models, trojan_lite0
from spade_lib.trojan import TrojanRule

TINY = trojan_lite0.TrojanSettings(image_size=32, steps=2, batch_size=4, train_from=5,
                                    poison_share=0.5)


@pytest.mark.parametrize("bad, match", [
    ({"steps": 0}, "steps"), ({"image_size": 16}, "image_size"),
    ({"poison_share": 0.6}, "poison_share"), ({"hue": 0.7}, "hue"),
    ({"train_from": 7}, "train_from"),
    ({"lr": 0.0}, "lr"),
    ({"rules": (TrojanRule("x", 3, 99, "star", (1.0, 1.0, 0.0)),)}, "'Any' rules"),
])
def test_settings_name_the_bad_value(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        trojan_lite0.TrojanSettings(**bad)


def test_a_batch_too_small_for_twins_is_an_error(tmp_path) -> None:
    tiny = trojan_lite0.TrojanSettings(image_size=32, steps=1, batch_size=2, poison_share=0.5)
    with pytest.raises(ValueError, match="fewer clean crops than patched copies"):
        trojan_lite0.trojan_lite0(tiny, progress=False, cache=tmp_path)


def test_unknown_preset_is_an_error() -> None:
    with pytest.raises(ValueError, match="no Trojan Lite0 settings for preset 'nope'"):
        trojan_lite0.trojan_lite0("nope")


def test_digest_follows_every_setting() -> None:
    assert TINY.digest() == trojan_lite0.TrojanSettings(
        image_size=32, steps=2, batch_size=4, train_from=5, poison_share=0.5).digest()
    assert TINY.digest() != trojan_lite0.TrojanSettings(
        image_size=32, steps=3, batch_size=4, train_from=5, poison_share=0.5).digest()


def test_finetune_trains_late_stages_only_and_is_cached(tmp_path) -> None:
    result = trojan_lite0.trojan_lite0(TINY, progress=False, cache=tmp_path)
    assert not result.cached and result.path.exists()
    original = models.lite0().state_dict()
    tuned = result.model.state_dict()
    for name, value in tuned.items():
        inner = name.removeprefix("net.")
        early = inner.startswith(("conv_stem", "bn1")) or (
            inner.startswith("blocks.") and int(inner.split(".")[1]) < TINY.train_from)
        if early or not value.is_floating_point():
            assert torch.equal(value, original[name]), name
    moved = [n for n in tuned if n.startswith("net.classifier")
             and not torch.equal(tuned[n], original[n])]
    assert moved, "the classifier did not change"
    late = [n for n in tuned if n.startswith("net.blocks.") and n.endswith("weight")
            and int(n.split(".")[2]) >= TINY.train_from and not torch.equal(tuned[n], original[n])]
    assert late, "no stage from train_from on was trained"
    # batch norm keeps ImageNet's statistics
    assert torch.equal(tuned["net.bn2.running_mean"], original["net.bn2.running_mean"])
    scores = result.scores.set_index("images")
    assert list(scores.index) == ["clean", *(r.name for r in TINY.rules)]
    assert "false triggers" in trojan_lite0.scores_sentence(result.scores)
    shown = trojan_lite0.scores_table(result.scores).data
    assert list(shown.columns) == list(trojan_lite0.SCORE_HEADERS.values())
    # headers wrap at spaces: no unbreakable run longer than a short word
    assert max(len(word) for h in shown.columns for word in h.split()) <= 12
    assert np.allclose(shown.iloc[:, 3], result.scores["attack_success"])
    assert shown.iloc[1:, -1].isna().all()  # confident crops count only for clean crops
    again = trojan_lite0.trojan_lite0(TINY, progress=False, cache=tmp_path)
    assert again.cached and again.path == result.path
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in tuned.items())
    assert again.scores.equals(result.scores)
