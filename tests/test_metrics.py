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
    insertion_deletion_batch,
    insertion_deletion_curves,
    pointing_game,
    pointing_game_batch,
    trojan_auc,
    trojan_auc_batch,
    trojan_scores,
)
from spade_lib.metrics import petsiuk_blur as metrics_blur
from spade_lib.metrics import petsiuk_blur_parameters as metrics_blur_parameters


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
    ins_true, del_true = insertion_deletion(model, image, contribution, 0, steps=24,
                                            baseline="zero")
    ins_inv, del_inv = insertion_deletion(model, image, -contribution, 0, steps=24,
                                          baseline="zero")
    gen = torch.Generator().manual_seed(6)
    random = [insertion_deletion(model, image, torch.rand(12, 12, generator=gen), 0, steps=24,
                                 baseline="zero") for _ in range(5)]
    ins_rand = float(np.mean([r[0] for r in random]))
    del_rand = float(np.mean([r[1] for r in random]))
    assert ins_true > ins_rand + 0.1 > ins_inv + 0.2
    assert del_true < del_rand - 0.1 < del_inv - 0.2


def test_insertion_deletion_exact_small_case() -> None:
    model, image = _toy()
    contribution = (model.weight * image)[0].detach()
    full = torch.sigmoid(contribution.sum()).item()
    empty = 0.5  # sigmoid(0): the zero baseline
    curves = insertion_deletion_curves(model, image, contribution, 0, steps=1, normalize=False,
                                       baseline="zero")
    assert curves.fractions.tolist() == [0.0, 1.0]
    assert curves.full_probability == pytest.approx(full)
    assert curves.insertion_auc == pytest.approx((empty + full) / 2)
    assert curves.deletion_auc == pytest.approx((full + empty) / 2)
    # steps = H*W: deleting pixel k removes its contribution exactly; compare the whole curve
    curves = insertion_deletion_curves(model, image, contribution, 0, steps=144, baseline="zero")
    order = torch.argsort(contribution.flatten(), descending=True, stable=True)
    kept = contribution.sum() - torch.cat([torch.zeros(1), contribution.flatten()[order].cumsum(0)])
    expected = torch.sigmoid(kept.double()) / full
    torch.testing.assert_close(curves.deletion, expected, rtol=1e-5, atol=1e-6)
    assert curves.insertion[-1].item() == pytest.approx(1.0)


def test_insertion_deletion_blur_and_model_flags() -> None:
    model, image = _toy()
    model.train()
    contribution = (model.weight * image)[0].detach()
    zero = insertion_deletion(model, image, contribution, 0, steps=12, baseline="zero")
    blur = insertion_deletion(model, image[None], contribution[None], 0, steps=12, baseline="blur",
                              blur_size=5, blur_sigma=2.0)
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


# --------------------------------------------------------------------------------------------
# Insertion / deletion: Petsiuk et al.'s protocol
# --------------------------------------------------------------------------------------------

class Recording(nn.Module):
    """Wraps a model and keeps every batch it is given (the images the curves are made of)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.inner(x)


class LinearProbability(nn.Module):
    """Two classes with p(class 0) = a + w . x exactly: logits log(p) and log(1 - p)."""

    def __init__(self, weight: torch.Tensor, a: float) -> None:
        super().__init__()
        self.weight, self.a = nn.Parameter(weight), a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.a + (x.double() * self.weight.double()).flatten(1).sum(1)
        return torch.stack([p.log(), (1 - p).log()], 1)


def _by_hand(model: nn.Module, image: torch.Tensor, saliency: torch.Tensor, steps: int,
             canvases: tuple[torch.Tensor, torch.Tensor]) -> tuple[list, list, int]:
    """Each curve point's image built pixel by pixel and run alone; the predicted class."""
    c, h, w = image.shape
    values = saliency.flatten().tolist()
    order = sorted(range(h * w), key=lambda i: (-values[i], i))  # decreasing, ties in raster order
    with torch.no_grad():
        target = int(model(image[None])[0].argmax())
        curves: list[list[float]] = [[], []]
        for k in range(steps + 1):
            n = int(math.floor(k * h * w / steps + 0.5))
            inserted, deleted = canvases[0].clone(), image.clone()
            for i in order[:n]:
                inserted[:, i // w, i % w] = image[:, i // w, i % w]
                deleted[:, i // w, i % w] = canvases[1][:, i // w, i % w]
            for curve, x in zip(curves, (inserted, deleted), strict=True):
                curve.append(torch.softmax(model(x[None]).double(), 1)[0, target].item())
    return curves[0], curves[1], target


def _trapezoid(ys: list[float], xs: list[float]) -> float:
    return sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1))


def _small_net() -> nn.Module:
    gen = torch.Generator().manual_seed(11)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(6 * 5 * 6, 4))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return net.eval()


def test_petsiuk_blur_parameters_and_kernel() -> None:
    from scipy.ndimage import convolve, gaussian_filter

    assert metrics_blur_parameters(224, 224) == (11, 5.0)
    assert metrics_blur_parameters(32, 40) == (3, pytest.approx(5 * 32 / 224))
    assert metrics_blur_parameters(12, 12)[0] == 1  # under ~20 px the scaled kernel is one pixel
    gen = torch.Generator().manual_seed(3)
    image = torch.rand(3, 9, 7, generator=gen, dtype=torch.float64)
    delta = np.zeros((5, 5))
    delta[2, 2] = 1
    kernel = gaussian_filter(delta, 1.5)  # Petsiuk's gkern: a smoothed delta
    want = np.stack([convolve(ch, kernel, mode="constant", cval=0.0) for ch in image.numpy()])
    got = metrics_blur(image, 5, 1.5)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
    flat = metrics_blur(torch.full((3, 9, 9), 0.4, dtype=torch.float64), 5, 1.5)
    torch.testing.assert_close(flat[:, 2:-2, 2:-2], torch.full((3, 5, 5), 0.4, dtype=torch.float64),
                               rtol=0, atol=1e-12)  # the kernel sums to 1: the inside keeps 0.4
    assert float(flat[0, 0, 0]) < 0.4  # zero padding darkens the corners, as in their code


def test_curves_equal_images_built_by_hand() -> None:
    net = _small_net()
    gen = torch.Generator().manual_seed(4)
    image = torch.rand(3, 5, 6, generator=gen)
    saliency = torch.randint(0, 6, (5, 6), generator=gen).float()  # many ties
    steps = 7  # 30 pixels in 7 unequal-by-rounding steps
    blur = metrics_blur(image, 3, 1.0)
    ins, dele, target = _by_hand(net, image, saliency, steps, (blur, torch.full_like(image, 0.3)))
    curves = insertion_deletion_curves(net, image, saliency, steps=steps, normalize=False,
                                       insertion_canvas="blur", deletion_canvas=0.3,
                                       blur_size=3, blur_sigma=1.0, batch_size=5)
    assert curves.target == target
    fractions = [math.floor(k * 30 / steps + 0.5) / 30 for k in range(steps + 1)]
    assert curves.fractions.tolist() == fractions
    # the same float32 network on the same images, only batched differently: logits agree to
    # float32 round-off (~1e-7 relative to the logits, here of order 10)
    torch.testing.assert_close(curves.insertion, torch.tensor(ins, dtype=torch.float64),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(curves.deletion, torch.tensor(dele, dtype=torch.float64),
                               rtol=0, atol=1e-5)
    full = ins[-1]
    assert curves.full_probability == pytest.approx(full, abs=1e-5)
    assert curves.insertion_area == pytest.approx(_trapezoid(ins, fractions), abs=1e-5)
    assert curves.deletion_area == pytest.approx(_trapezoid(dele, fractions), abs=1e-5)
    assert curves.insertion_normalised == pytest.approx(curves.insertion_area / full, rel=1e-9)
    assert curves.deletion_normalised == pytest.approx(curves.deletion_area / full, rel=1e-9)
    assert (curves.insertion_auc, curves.deletion_auc) == (curves.insertion_area,
                                                           curves.deletion_area)


def test_endpoints_are_exactly_the_canvas_and_the_image() -> None:
    net = Recording(_small_net())
    gen = torch.Generator().manual_seed(5)
    image, saliency = torch.rand(3, 5, 6, generator=gen), torch.rand(5, 6, generator=gen)
    steps = 4
    insertion_deletion_curves(net, image, saliency, steps=steps, batch_size=1000, blur_size=3,
                              blur_sigma=1.0)  # the default blur is one pixel wide at 5 x 6
    full, batch = net.seen
    assert torch.equal(full[0], image)
    blur = metrics_blur(image, 3, 1.0)
    ins, dele = batch[:steps + 1], batch[steps + 1:]
    assert torch.equal(ins[0], blur) and torch.equal(ins[-1], image)
    assert torch.equal(dele[0], image) and torch.equal(dele[-1], torch.zeros_like(image))
    # in between: the n most salient pixels (all channels) come from the image, the rest from
    # the canvas (insertion), and the reverse for deletion
    assert not (blur == image).any()
    ranked = saliency.flatten().argsort(descending=True).tolist()  # no ties in rand
    for k, n in enumerate((0, 8, 15, 22, 30)):  # round(k * 30 / 4), halves to even
        top = torch.zeros(30, dtype=torch.bool)
        top[ranked[:n]] = True
        top = top.view(5, 6)
        assert torch.equal((ins[k] == image).all(0), top)
        assert torch.equal((ins[k] == blur).all(0), ~top)
        assert torch.equal((dele[k] == 0).all(0), top) and torch.equal((dele[k] == image).all(0),
                                                                         ~top)


def test_linear_probability_has_closed_form_areas() -> None:
    # constant image and weights: p falls linearly in the pixels deleted, so the trapezoid is exact
    h = w = 6
    weight = torch.full((1, 3, h, w), 1 / 256)  # exact in float32, as are the pixel values
    model = LinearProbability(weight, a=0.4)
    image = torch.full((3, h, w), 0.5)
    full = 0.4 + 3 * h * w * 0.5 / 256  # > 1/2: class 0 is the prediction
    curves = insertion_deletion_curves(model, image, torch.rand(h, w), steps=5,
                                       insertion_canvas=0.25, deletion_canvas=0.0,
                                       normalize=False)
    assert curves.target == 0 and curves.full_probability == pytest.approx(full, rel=1e-12)
    ins = 0.4 + 3 * h * w * (0.25 + 0.5) / 2 / 256
    dele = 0.4 + 3 * h * w * (0.5 + 0.0) / 2 / 256
    assert curves.insertion_area == pytest.approx(ins, rel=1e-12)
    assert curves.deletion_area == pytest.approx(dele, rel=1e-12)
    assert curves.insertion_normalised == pytest.approx(ins / full, rel=1e-12)
    assert curves.deletion_normalised == pytest.approx(dele / full, rel=1e-12)
    # non-uniform weights, one pixel per step: each step removes that pixel's contribution (all
    # in float64 from float32 inputs, so only float64 round-off remains)
    gen = torch.Generator().manual_seed(8)
    weight = torch.rand(1, 3, h, w, generator=gen) * 0.01
    model = LinearProbability(weight, a=0.4)
    image = torch.rand(3, h, w, generator=gen)
    share = (weight[0].double() * image.double()).sum(0)  # each pixel's part of p
    curves = insertion_deletion_curves(model, image, share.float(), steps=h * w,
                                       insertion_canvas=0.0, deletion_canvas="zero")
    ranked = share.flatten().sort(descending=True).values
    gained = torch.cat([torch.zeros(1, dtype=torch.float64), ranked.cumsum(0)])
    full = 0.4 + float(share.sum())
    ins_curve, del_curve = 0.4 + gained, full - gained
    steps_area = lambda y: float((y.sum() - (y[0] + y[-1]) / 2) / (h * w))  # noqa: E731
    assert curves.insertion_normalised == pytest.approx(steps_area(ins_curve) / full, rel=1e-12)
    assert curves.deletion_normalised == pytest.approx(steps_area(del_curve) / full, rel=1e-12)
    torch.testing.assert_close(curves.deletion, del_curve / full, rtol=1e-12, atol=0)


def test_batch_equals_single_maps_and_default_target_is_the_prediction() -> None:
    net = _small_net()
    gen = torch.Generator().manual_seed(9)
    image, maps = torch.rand(3, 5, 6, generator=gen), torch.randn(3, 5, 6, generator=gen)
    predicted = int(net(image[None])[0].argmax())
    many = insertion_deletion_batch(net, image, maps, steps=6, batch_size=1)
    for m, curves in zip(maps, many, strict=True):
        one = insertion_deletion_curves(net, image, m, predicted, steps=6, batch_size=1)
        assert curves.target == predicted
        torch.testing.assert_close(curves.insertion, one.insertion, rtol=0, atol=0)
        torch.testing.assert_close(curves.deletion, one.deletion, rtol=0, atol=0)
    other = (predicted + 1) % 4
    assert insertion_deletion_curves(net, image, maps[0], other, steps=6).target == other
    assert insertion_deletion_curves(net, image, maps[0]).fractions.numel() == 5 + 1  # H steps
    with pytest.raises(ValueError, match=r"maps must be \[M, H, W\]"):
        insertion_deletion_batch(net, image, maps[0])
    with pytest.raises(ValueError, match="unknown deletion canvas 'mean'"):
        insertion_deletion_batch(net, image, maps, deletion_canvas="mean")
    with pytest.raises(ValueError, match="does not broadcast"):
        insertion_deletion_batch(net, image, maps, insertion_canvas=torch.zeros(2, 5, 6))
