"""Metrics: Trojan AUC against scikit-learn, degenerate cases, Pointing Game, aggregations,
insertion/deletion on a model whose output is a known function of the pixels."""

from __future__ import annotations

import math
import types
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from spade_lib.metrics import (
    SCORE_COLUMNS,
    DegenerateScoreWarning,
    aggregate,
    best_of_aggregations,
    insertion_deletion,
    insertion_deletion_curves,
    pointing_game,
    pointing_game_batch,
    trojan_auc,
    trojan_auc_batch,
    trojan_scores,
)


def _patch_mask(h: int = 8, w: int = 8, top: int = 2, left: int = 3, size: int = 3) -> torch.Tensor:
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[top:top + size, left:left + size] = True
    return mask


# --------------------------------------------------------------------------------------------
# Trojan AUC
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("levels", [3, 5, None])
def test_auc_matches_sklearn_with_ties(levels: int | None) -> None:
    gen = torch.Generator().manual_seed(levels or 0)
    maps = torch.randn(12, 9, 7, generator=gen)
    if levels is not None:  # coarse values: many ties within and across the classes
        maps = torch.randint(0, levels, (12, 9, 7), generator=gen).float()
    masks = torch.rand(12, 9, 7, generator=gen) < torch.linspace(0.05, 0.9, 12)[:, None, None]
    masks[:, 0, 0], masks[:, -1, -1] = True, False  # never empty, never full
    maps[:, 0, 1] = maps[:, 0, 0] + 1  # never constant
    batch = trojan_auc_batch(maps, masks)
    assert batch.dtype == torch.float64 and batch.shape == (12,)
    for i in range(12):
        expected = roc_auc_score(masks[i].flatten().numpy(), maps[i].flatten().numpy())
        assert batch[i].item() == pytest.approx(expected, abs=1e-12)
        assert trojan_auc(maps[i], masks[i]) == pytest.approx(expected, abs=1e-12)
        assert trojan_auc(maps[i].numpy(), masks[i].numpy()) == pytest.approx(expected, abs=1e-12)


def test_auc_hand_cases() -> None:
    mask = _patch_mask()
    perfect = mask.float() * 2 + 0.1 * torch.rand(8, 8, generator=torch.Generator().manual_seed(0))
    assert trojan_auc(perfect, mask) == 1.0
    assert trojan_auc(-perfect, mask) == 0.0
    # one background pixel tied with the patch: 9 * 55 pairs, 9 ties count half
    tied = mask.float()
    tied[7, 7] = 1.0
    assert trojan_auc(tied, mask) == pytest.approx(1 - 0.5 * 9 / (9 * 55))
    # a map that ranks the patch in the middle: half the background above, half below
    ramp = torch.arange(64.0).view(8, 8)
    mid = torch.zeros(8, 8, dtype=torch.bool)
    mid.view(-1)[30:34] = True
    assert trojan_auc(ramp, mid) == pytest.approx(0.5)


@pytest.mark.parametrize("case", ["constant map", "empty mask", "full mask"])
def test_auc_degenerate_is_nan_with_warning(case: str) -> None:
    mask = _patch_mask()
    saliency = torch.rand(8, 8, generator=torch.Generator().manual_seed(1))
    if case == "constant map":
        saliency = torch.full((8, 8), 0.3)
    elif case == "empty mask":
        mask = torch.zeros(8, 8, dtype=torch.bool)
    else:
        mask = torch.ones(8, 8, dtype=torch.bool)
    with pytest.warns(DegenerateScoreWarning, match=case):
        assert math.isnan(trojan_auc(saliency, mask))
    with pytest.warns(DegenerateScoreWarning, match=case):
        assert math.isnan(pointing_game(saliency, mask))


def test_auc_batch_nan_only_on_degenerate_rows() -> None:
    gen = torch.Generator().manual_seed(2)
    maps = torch.rand(4, 8, 8, generator=gen)
    masks = _patch_mask().expand(4, 8, 8).clone()
    maps[1] = 5.0
    masks[3] = False
    with pytest.warns(DegenerateScoreWarning, match="2 of 4"):
        auc = trojan_auc_batch(maps, masks)
    assert torch.isnan(auc[[1, 3]]).all() and torch.isfinite(auc[[0, 2]]).all()
    assert auc[0].item() == pytest.approx(roc_auc_score(masks[0].flatten(), maps[0].flatten()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trojan_auc_batch(maps[[0, 2]], masks[[0, 2]])  # no warning without degenerate rows


def test_auc_rejects_bad_input() -> None:
    mask = _patch_mask()
    with pytest.raises(ValueError, match="differs"):
        trojan_auc(torch.rand(8, 7), mask)
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        trojan_auc(torch.rand(1, 8, 8), mask[None])
    with pytest.raises(ValueError, match="NaN"):
        trojan_auc(torch.full((8, 8), math.nan), mask)
    with pytest.raises(ValueError, match="boolean"):
        trojan_auc(torch.rand(8, 8), mask.long() * 2)
    assert trojan_auc(mask.float(), mask.long()) == 1.0  # 0/1 masks are accepted


# --------------------------------------------------------------------------------------------
# Pointing Game
# --------------------------------------------------------------------------------------------

def test_pointing_game_hand_cases() -> None:
    mask = _patch_mask()
    saliency = torch.zeros(8, 8)
    saliency[3, 4] = 1.0  # inside the patch
    assert pointing_game(saliency, mask) is True
    saliency[0, 0] = 2.0  # a stronger peak outside
    assert pointing_game(saliency, mask) is False
    # a plateau at the maximum, half inside and half outside the patch
    plateau = torch.zeros(8, 8)
    plateau[2, 3] = plateau[2, 2] = 1.0
    assert pointing_game(plateau, mask, ties="all") is False
    assert pointing_game(plateau, mask, ties="any") is True
    assert pointing_game(plateau, mask, ties="fraction") == 0.5
    with pytest.raises(ValueError, match="ties"):
        pointing_game(plateau, mask, ties="first")


def test_pointing_game_batch() -> None:
    masks = _patch_mask().expand(3, 8, 8)
    maps = torch.zeros(3, 8, 8)
    maps[0, 3, 4] = 1.0
    maps[1, 7, 7] = 1.0
    with pytest.warns(DegenerateScoreWarning, match="1 of 3"):
        hits = pointing_game_batch(maps, masks)
    assert hits[:2].tolist() == [1.0, 0.0] and math.isnan(hits[2])


# --------------------------------------------------------------------------------------------
# Aggregations and the score table
# --------------------------------------------------------------------------------------------

def test_aggregate() -> None:
    m = torch.tensor([[[1.0, -2.0]], [[-3.0, 0.5]], [[1.0, 1.0]]])  # [C=3, H=1, W=2]
    assert aggregate(m, "sum").tolist() == [[-1.0, -0.5]]
    assert aggregate(m, "abs").tolist() == [[5.0, 3.5]]
    assert aggregate(m[None].expand(2, -1, -1, -1), "abs").shape == (2, 1, 2)
    with pytest.raises(ValueError, match="allowed: sum, abs"):
        aggregate(m, "max")
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        aggregate(m[0, 0], "sum")


def test_trojan_scores_both_aggregations() -> None:
    masks = _patch_mask().expand(2, 8, 8).clone()
    gen = torch.Generator().manual_seed(3)
    attr = 0.1 * torch.rand(2, 3, 8, 8, generator=gen)
    # sample 0: the patch has opposite-sign channels: invisible to the signed sum, clear in abs
    attr[0, 0][masks[0]] += 5.0
    attr[0, 1][masks[0]] -= 5.0
    attr[0, 2][masks[0]] = 0.0
    # sample 1: a negative patch: the signed sum ranks it last, abs first
    attr[1, :, masks[1]] = -1.0
    frame = trojan_scores(types.SimpleNamespace(map=attr), masks)
    assert list(frame.columns) == list(SCORE_COLUMNS) and frame.index.name == "sample"
    assert frame.loc[0, "auc_abs"] == 1.0 and frame.loc[0, "auc_sum"] < 0.8
    assert frame.loc[1, "auc_abs"] == 1.0 and frame.loc[1, "auc_sum"] == 0.0
    assert frame.loc[1, "pointing_abs"] == 1.0 and frame.loc[1, "pointing_sum"] == 0.0
    for how in ("sum", "abs"):
        expected = trojan_auc_batch(aggregate(attr, how), masks).numpy()
        np.testing.assert_allclose(frame[f"auc_{how}"].to_numpy(), expected)


def test_trojan_scores_warns_once_for_degenerate() -> None:
    masks = _patch_mask().expand(2, 8, 8).clone()
    attr = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    attr[1] = 0.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = trojan_scores(attr, masks)
    assert len([w for w in caught if issubclass(w.category, DegenerateScoreWarning)]) == 1
    assert frame.loc[1].isna().all() and frame.loc[0].notna().all()


def test_best_of_aggregations_labels_the_choice() -> None:
    scores = pd.DataFrame({
        "method": ["A", "A", "B", "B"],
        "variant": ["dense", "dense", "dense", "dense"],
        "auc_sum": [0.9, 0.7, 0.6, math.nan],
        "auc_abs": [0.6, 0.8, 0.9, 0.95],
        "pointing_sum": [1.0, 0.0, 0.0, 0.0],
        "pointing_abs": [1.0, 1.0, 0.0, 1.0],
    })
    table = best_of_aggregations(scores, by=["method", "variant"])
    a, b = table.set_index("method").loc["A"], table.set_index("method").loc["B"]
    assert a["sum"] == pytest.approx(0.8) and a["abs"] == pytest.approx(0.7)
    assert a["best"] == pytest.approx(0.8) and a["aggregation"] == "sum"
    assert b["sum"] == pytest.approx(0.6) and b["best"] == pytest.approx(0.925)
    assert b["aggregation"] == "abs" and b["n"] == 2
    assert "best of" in table.attrs["description"]
    overall = best_of_aggregations(scores, metric="pointing")
    assert overall.loc[0, "aggregation"] == "abs" and overall.loc[0, "best"] == 0.75
    with pytest.raises(ValueError, match="lack columns"):
        best_of_aggregations(scores, by="sample")
    with pytest.raises(ValueError, match="metric"):
        best_of_aggregations(scores, metric="iou")


# --------------------------------------------------------------------------------------------
# Insertion / deletion
# --------------------------------------------------------------------------------------------

class PixelLinear(nn.Module):
    """Two logits: ``w . x`` and 0, so p(class 0) = sigmoid(w . x), a known function of pixels."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = (x * self.weight).flatten(1).sum(1)
        return torch.stack([score, torch.zeros_like(score)], 1)


def _toy() -> tuple[PixelLinear, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(1, 12, 12, generator=gen) * 0.3
    image = torch.rand(1, 12, 12, generator=gen)
    return PixelLinear(weight), image


def test_insertion_deletion_true_order_beats_random() -> None:
    model, image = _toy()
    contribution = (model.weight * image)[0].detach()
    ins_true, del_true = insertion_deletion(model, image, contribution, 0, steps=24)
    ins_inv, del_inv = insertion_deletion(model, image, -contribution, 0, steps=24)
    gen = torch.Generator().manual_seed(6)
    random = [insertion_deletion(model, image, torch.rand(12, 12, generator=gen), 0, steps=24)
              for _ in range(5)]
    ins_rand = float(np.mean([r[0] for r in random]))
    del_rand = float(np.mean([r[1] for r in random]))
    assert ins_true > ins_rand + 0.1 > ins_inv + 0.2
    assert del_true < del_rand - 0.1 < del_inv - 0.2


def test_insertion_deletion_exact_small_case() -> None:
    model, image = _toy()
    contribution = (model.weight * image)[0].detach()
    full = torch.sigmoid(contribution.sum()).item()
    empty = 0.5  # sigmoid(0): the zero baseline
    curves = insertion_deletion_curves(model, image, contribution, 0, steps=1, normalize=False)
    assert curves.fractions.tolist() == [0.0, 1.0]
    assert curves.full_probability == pytest.approx(full)
    assert curves.insertion_auc == pytest.approx((empty + full) / 2)
    assert curves.deletion_auc == pytest.approx((full + empty) / 2)
    # steps = H*W: deleting pixel k removes its contribution exactly; compare the whole curve
    curves = insertion_deletion_curves(model, image, contribution, 0, steps=144)
    order = torch.argsort(contribution.flatten(), descending=True, stable=True)
    kept = contribution.sum() - torch.cat([torch.zeros(1), contribution.flatten()[order].cumsum(0)])
    expected = torch.sigmoid(kept.double()) / full
    torch.testing.assert_close(curves.deletion, expected, rtol=1e-5, atol=1e-6)
    assert curves.insertion[-1].item() == pytest.approx(1.0)


def test_insertion_deletion_blur_and_model_flags() -> None:
    model, image = _toy()
    model.train()
    contribution = (model.weight * image)[0].detach()
    zero = insertion_deletion(model, image, contribution, 0, steps=12)
    blur = insertion_deletion(model, image[None], contribution[None], 0, steps=12, baseline="blur")
    assert model.training and zero != blur
    assert blur[0] > blur[1]


def test_insertion_deletion_rejects_bad_input() -> None:
    model, image = _toy()
    saliency = torch.rand(12, 12)
    with pytest.raises(ValueError, match="baseline"):
        insertion_deletion(model, image, saliency, 0, baseline="mean")
    with pytest.raises(ValueError, match="steps"):
        insertion_deletion(model, image, saliency, 0, steps=0)
    with pytest.raises(ValueError, match="does not match"):
        insertion_deletion(model, image, saliency[:5], 0)
    with pytest.raises(ValueError, match="out of range"):
        insertion_deletion(model, image, saliency, 2)
