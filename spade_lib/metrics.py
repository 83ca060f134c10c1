"""Scores of saliency maps: Trojan ROC-AUC, the Pointing Game, insertion and deletion.

A Trojan patch is the ground truth of where a backdoored prediction comes from, so a good map for
the Trojan target puts its mass on the patch. :func:`trojan_auc` is the pixel-level ROC-AUC of a
2-D map against the patch mask, and :func:`pointing_game` asks whether the map's maximum lies on
the patch. Maps ``[C, H, W]`` become 2-D by one of two channel aggregations (:func:`aggregate`):
the signed sum or the absolute sum over channels. Both are scored (:func:`trojan_scores`); the paper
reports, per method, the better of the two means (:func:`best_of_aggregations`).

Degenerate cases (a constant map, an empty mask, a mask covering the whole image) have no
meaningful score: they give NaN and a :class:`DegenerateScoreWarning`, never a silent 0.5 or hit.

:func:`insertion_deletion` measures fidelity (Table J.18) by Petsiuk et al.'s protocol (RISE,
2018): the probability of the predicted class as pixels are inserted, most salient first, into a
blurred copy of the image (:func:`petsiuk_blur`), or deleted from the image to a constant; the
areas under both curves, unnormalised and normalised by the full image's probability.
:func:`insertion_deletion_batch` does several maps of one image at once.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spade_lib.hessians import eval_mode
from spade_lib.models import device_of

__all__ = [
    "AGGREGATIONS", "BASELINES", "CANVASES", "PETSIUK_BLUR_SIGMA", "PETSIUK_BLUR_SIZE",
    "PETSIUK_SIDE", "SCORE_COLUMNS", "TIES", "DegenerateScoreWarning", "FidelityCurves",
    "aggregate", "best_of_aggregations", "insertion_deletion", "insertion_deletion_batch",
    "insertion_deletion_curves", "petsiuk_blur", "petsiuk_blur_parameters", "pointing_game",
    "pointing_game_batch", "trojan_auc", "trojan_auc_batch", "trojan_scores",
]

AGGREGATIONS = ("sum", "abs")
"""Channel aggregations: ``"sum"`` (signed sum over channels) and ``"abs"`` (sum of |values|)."""

TIES = ("all", "any", "fraction")


class DegenerateScoreWarning(UserWarning):
    """A score is undefined for some map/mask pair (constant map, empty or full mask): NaN."""


def aggregate(map_3d: Tensor, how: str = "sum") -> Tensor:
    """Collapse the channel axis (``-3``) of ``[..., C, H, W]`` maps to ``[..., H, W]``.

    Parameters
    ----------
    map_3d
        ``[C, H, W]`` or ``[N, C, H, W]``.
    how
        ``"sum"``: signed sum over channels, keeps evidence for and against the class apart.
        ``"abs"``: sum of absolute values, counts any strong influence as salient.
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}; allowed: {', '.join(AGGREGATIONS)}")
    if not isinstance(map_3d, Tensor) or map_3d.dim() not in (3, 4):
        shape = tuple(map_3d.shape) if isinstance(map_3d, Tensor) else type(map_3d).__name__
        raise ValueError(f"map must be a tensor [C, H, W] or [N, C, H, W], got {shape}")
    return map_3d.sum(-3) if how == "sum" else map_3d.abs().sum(-3)


def _as_pair(maps: Any, masks: Any, batched: bool) -> tuple[Tensor, Tensor]:
    """Validate and flatten maps and masks to ``[N, H*W]`` (float64, bool)."""
    m = torch.as_tensor(maps).detach()
    k = torch.as_tensor(masks).detach()
    want = 3 if batched else 2
    what = "[N, H, W]" if batched else "[H, W]"
    if m.dim() != want:
        raise ValueError(f"saliency map must be {what}, got shape {tuple(m.shape)}")
    if k.shape != m.shape:
        raise ValueError(f"mask shape {tuple(k.shape)} differs from map shape {tuple(m.shape)}")
    if k.dtype != torch.bool:
        if not ((k == 0) | (k == 1)).all():
            raise ValueError("mask must be boolean (or hold only 0 and 1)")
        k = k.bool()
    m = m.to(torch.float64)
    if not torch.isfinite(m).all():
        raise ValueError("saliency map contains NaN or inf")
    if not batched:
        m, k = m[None], k[None]
    return m.flatten(1), k.to(m.device).flatten(1)


def _degenerate(m: Tensor, k: Tensor) -> dict[str, Tensor]:
    """Per-row reasons a score is undefined."""
    pos = k.sum(1)
    return {"constant map": m.amax(1) == m.amin(1), "empty mask": pos == 0,
            "full mask": pos == k.shape[1]}


def _warn(score: str, reasons: dict[str, Tensor], stacklevel: int = 3) -> Tensor:
    """Warn about degenerate rows; return the bool row mask of them."""
    bad = torch.stack(list(reasons.values())).any(0)
    if bad.any():
        detail = ", ".join(f"{name}: {int(r.sum())}" for name, r in reasons.items() if r.any())
        warnings.warn(f"{score}: {int(bad.sum())} of {bad.numel()} map/mask pairs are degenerate "
                      f"({detail}); their score is NaN", DegenerateScoreWarning,
                      stacklevel=stacklevel)
    return bad


def _auc_rows(m: Tensor, k: Tensor) -> Tensor:
    """Mann-Whitney ROC-AUC per row, ties counted half (average ranks), as sklearn's."""
    ordered = m.sort(1).values.contiguous()
    left = torch.searchsorted(ordered, m.contiguous(), right=False)
    right = torch.searchsorted(ordered, m.contiguous(), right=True)
    ranks = (left + right + 1).to(torch.float64) / 2
    pos = k.sum(1).to(torch.float64)
    neg = k.shape[1] - pos
    rank_sum = (ranks * k).sum(1)
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)


def trojan_auc_batch(maps: Tensor | np.ndarray, masks: Tensor | np.ndarray) -> Tensor:
    """Pixel-level ROC-AUC of each map ``[N, H, W]`` against its patch mask ``[N, H, W]``.

    The probability that a random patch pixel scores higher than a random background pixel, ties
    counting one half: the Mann-Whitney statistic with average ranks, equal to scikit-learn's
    ``roc_auc_score(mask.ravel(), map.ravel())``. Returns float64 ``[N]``; rows with a constant map
    or an empty or full mask are NaN, with one :class:`DegenerateScoreWarning`.
    """
    m, k = _as_pair(maps, masks, batched=True)
    auc = _auc_rows(m, k)
    bad = _warn("trojan_auc", _degenerate(m, k))
    return auc.masked_fill(bad, math.nan)


def trojan_auc(saliency_2d: Tensor | np.ndarray, mask: Tensor | np.ndarray) -> float:
    """Pixel-level ROC-AUC of one map ``[H, W]`` against its patch mask; see
    :func:`trojan_auc_batch`. NaN with a warning when degenerate."""
    m, k = _as_pair(saliency_2d, mask, batched=False)
    bad = _warn("trojan_auc", _degenerate(m, k))
    return math.nan if bool(bad[0]) else float(_auc_rows(m, k)[0])


def _pointing_rows(m: Tensor, k: Tensor, ties: str) -> Tensor:
    top = m == m.amax(1, keepdim=True)
    inside = (top & k).sum(1).to(torch.float64)
    count = top.sum(1).to(torch.float64)
    if ties == "all":
        return (inside == count).to(torch.float64)
    if ties == "any":
        return (inside > 0).to(torch.float64)
    return inside / count


def pointing_game_batch(maps: Tensor | np.ndarray, masks: Tensor | np.ndarray,
                        ties: str = "all") -> Tensor:
    """Pointing Game per map: does the maximum of ``maps[i]`` lie inside ``masks[i]``?

    Parameters
    ----------
    maps, masks
        ``[N, H, W]`` maps and bool masks.
    ties
        When several pixels share the maximum: ``"all"`` (default) is a hit only if every one of
        them is inside the mask, so a plateau that spills out of the patch earns nothing;
        ``"any"`` is a hit if one is inside; ``"fraction"`` gives the fraction inside (the expected
        hit under a random tie break).

    Returns
    -------
    Tensor
        float64 ``[N]``: 1.0 hit, 0.0 miss (or a fraction), NaN for a constant map or an empty
        or full mask (with one :class:`DegenerateScoreWarning`).
    """
    if ties not in TIES:
        raise ValueError(f"unknown ties rule {ties!r}; allowed: {', '.join(TIES)}")
    m, k = _as_pair(maps, masks, batched=True)
    bad = _warn("pointing_game", _degenerate(m, k))
    return _pointing_rows(m, k, ties).masked_fill(bad, math.nan)


def pointing_game(saliency_2d: Tensor | np.ndarray, mask: Tensor | np.ndarray,
                  ties: str = "all") -> bool | float:
    """Pointing Game of one map ``[H, W]``: ``True`` if its maximum lies in ``mask``.

    Ties as in :func:`pointing_game_batch` (``"fraction"`` returns a float). Returns NaN, with a
    :class:`DegenerateScoreWarning`, for a constant map or an empty or full mask.
    """
    if ties not in TIES:
        raise ValueError(f"unknown ties rule {ties!r}; allowed: {', '.join(TIES)}")
    m, k = _as_pair(saliency_2d, mask, batched=False)
    if bool(_warn("pointing_game", _degenerate(m, k))[0]):
        return math.nan
    value = float(_pointing_rows(m, k, ties)[0])
    return value if ties == "fraction" else value == 1.0


SCORE_COLUMNS = tuple(f"{score}_{how}" for score in ("auc", "pointing") for how in AGGREGATIONS)
"""Columns of :func:`trojan_scores`: ``auc_sum, auc_abs, pointing_sum, pointing_abs``."""


def trojan_scores(attr: Any, masks: Tensor | np.ndarray, ties: str = "all") -> pd.DataFrame:
    """Trojan AUC and Pointing Game of a batch of maps under both channel aggregations.

    Parameters
    ----------
    attr
        ``[N, C, H, W]`` tensor, or an :class:`spade_lib.attribution.Attribution`.
    masks
        ``[N, H, W]`` bool patch masks.
    ties
        Pointing Game tie rule, see :func:`pointing_game_batch`.

    Returns
    -------
    pandas.DataFrame
        One row per sample (index ``sample``), columns :data:`SCORE_COLUMNS`. Degenerate rows are
        NaN, with one :class:`DegenerateScoreWarning` for the whole call.
    """
    maps = getattr(attr, "map", attr)
    if not isinstance(maps, Tensor) or maps.dim() != 4:
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"attr must be [N, C, H, W] maps or an Attribution, got {shape}")
    if ties not in TIES:
        raise ValueError(f"unknown ties rule {ties!r}; allowed: {', '.join(TIES)}")
    columns: dict[str, np.ndarray] = {}
    reasons: dict[str, Tensor] = {}
    for how in AGGREGATIONS:
        m, k = _as_pair(aggregate(maps, how), masks, batched=True)
        why = _degenerate(m, k)
        bad = torch.stack(list(why.values())).any(0)
        for name, r in why.items():
            reasons[name if name != "constant map" else f"constant {how} map"] = r
        columns[f"auc_{how}"] = _auc_rows(m, k).masked_fill(bad, math.nan).cpu().numpy()
        columns[f"pointing_{how}"] = (_pointing_rows(m, k, ties).masked_fill(bad, math.nan)
                                      .cpu().numpy())
    _warn("trojan_scores", reasons)
    frame = pd.DataFrame({c: columns[c] for c in SCORE_COLUMNS})
    frame.index.name = "sample"
    return frame


def best_of_aggregations(scores: pd.DataFrame, by: str | Sequence[str] | None = None,
                         metric: str = "auc") -> pd.DataFrame:
    """The paper's headline number: the better of the two aggregations' means, labelled.

    Parameters
    ----------
    scores
        A table with columns ``{metric}_sum`` and ``{metric}_abs`` (as from
        :func:`trojan_scores`), plus the ``by`` columns.
    by
        Columns to group by, e.g. ``["method", "variant"]``; ``None`` for one overall row. The
        choice is made per group, so dense and SPADE may end up on different aggregations: the
        ``aggregation`` column says which one each number is.
    metric
        ``"auc"`` or ``"pointing"``.

    Returns
    -------
    pandas.DataFrame
        Per group: ``sum`` and ``abs`` (NaN-skipping means), ``best`` (the larger; an aggregation
        with no score never beats one with a score), ``aggregation`` (``"sum"`` or ``"abs"``, the
        one taken; ``"sum"`` on an exact tie; ``None`` when neither has a score), ``n`` (rows)
        and ``n_scored`` (rows with a score in the aggregation taken; 0 when ``best`` is NaN).
    """
    if metric not in ("auc", "pointing"):
        raise ValueError(f"unknown metric {metric!r}; allowed: auc, pointing")
    cols = [f"{metric}_{how}" for how in AGGREGATIONS]
    keys = [] if by is None else [by] if isinstance(by, str) else list(by)
    missing = [c for c in (*cols, *keys) if c not in scores.columns]
    if missing:
        raise ValueError(f"scores lack columns {missing}; has {list(scores.columns)}")
    if keys:
        grouped = scores.groupby(keys, sort=False)
        table = grouped[cols].mean()
        table["n"] = grouped.size()
        scored = grouped[cols].count()
    else:
        table = scores[cols].mean().to_frame().T
        table["n"] = len(scores)
        scored = scores[cols].count().to_frame().T
    table = table.rename(columns={f"{metric}_{how}": how for how in AGGREGATIONS})
    take_abs = (table["abs"] > table["sum"]) | (table["sum"].isna() & table["abs"].notna())
    table["best"] = table["sum"].where(~take_abs, table["abs"])
    none = table["best"].isna()
    table["aggregation"] = pd.Series(
        [None if z else "abs" if a else "sum" for a, z in zip(take_abs, none, strict=True)],
        index=table.index, dtype=object)
    counts = scored[cols[1]].where(take_abs.to_numpy(), scored[cols[0]]).to_numpy()
    table["n_scored"] = np.where(none, 0, counts).astype(np.int64)
    table.attrs["description"] = (f"best of the signed-sum and abs-sum means of {metric}, "
                                  "as the paper reports it")
    table = table[["sum", "abs", "best", "aggregation", "n", "n_scored"]]
    return table.reset_index() if keys else table.reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Insertion / deletion
# --------------------------------------------------------------------------------------------

BASELINES = ("zero", "blur")
"""Names of the old ``baseline`` argument of :func:`insertion_deletion_curves` (one canvas for both
curves); the canvases of the Petsiuk protocol are :data:`CANVASES`, a constant or a tensor."""

CANVASES = ("blur", "zero")
"""Named canvases: ``"blur"`` (:func:`petsiuk_blur` of the image) and ``"zero"`` (all 0)."""

PETSIUK_SIDE = 224
"""Image side (pixels) of Petsiuk et al.'s ImageNet evaluation, to which their blur refers."""

PETSIUK_BLUR_SIZE = 11
"""Side of Petsiuk et al.'s blur kernel at :data:`PETSIUK_SIDE` pixels (``klen`` in their code)."""

PETSIUK_BLUR_SIGMA = 5.0
"""Width of Petsiuk et al.'s blur at :data:`PETSIUK_SIDE` pixels (``ksig`` in their code)."""


@dataclass
class FidelityCurves:
    """Insertion and deletion curves of one map.

    Attributes
    ----------
    fractions
        ``[steps + 1]`` fraction of pixels inserted / deleted at each point, 0 to 1 (both ends
        included).
    insertion, deletion
        ``[steps + 1]`` target probability on each image (divided by ``full_probability`` when
        the curves were asked for normalised).
    full_probability
        Target probability on the unmodified image.
    insertion_auc, deletion_auc
        Trapezoidal area under each curve above over ``fractions``; higher insertion and lower
        deletion mean a more faithful map.
    target
        The class whose probability is tracked (the model's prediction unless one was given).
    insertion_area, deletion_area
        Area under the unnormalised probability curves (in [0, 1]), whatever ``normalize`` was.
    insertion_normalised, deletion_normalised
        The same areas divided by ``full_probability``: the paper's (and Petsiuk et al.'s)
        normalisation; NaN when ``full_probability`` is 0.
    """

    fractions: Tensor
    insertion: Tensor
    deletion: Tensor
    full_probability: float
    insertion_auc: float
    deletion_auc: float
    target: int = -1
    insertion_area: float = math.nan
    deletion_area: float = math.nan
    insertion_normalised: float = math.nan
    deletion_normalised: float = math.nan


def petsiuk_blur_parameters(height: int, width: int) -> tuple[int, float]:
    """Petsiuk et al.'s blur scaled to an image of ``height x width`` pixels.

    Their kernel (side :data:`PETSIUK_BLUR_SIZE`, sigma :data:`PETSIUK_BLUR_SIGMA` at
    :data:`PETSIUK_SIDE` pixels) is scaled by ``min(height, width) / 224``: the sigma exactly,
    the side up to the next odd integer (so the kernel has a centre). At 224 px this gives (11, 5),
    at 32 px (3, 0.714).

    Returns
    -------
    tuple
        ``(size, sigma)``: kernel side in pixels (odd, >= 1) and the Gaussian's sigma in pixels.
    """
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive int (pixels), got {value!r}")
    scale = min(int(height), int(width)) / PETSIUK_SIDE
    size = max(1, 2 * math.ceil((PETSIUK_BLUR_SIZE * scale - 1) / 2) + 1)
    return size, PETSIUK_BLUR_SIGMA * scale


def petsiuk_blur(image: Tensor, size: int | None = None, sigma: float | None = None) -> Tensor:
    """Petsiuk et al.'s insertion canvas: each channel convolved with their Gaussian kernel.

    As in their ``evaluation.py``: the kernel is a ``size x size`` delta smoothed by
    ``scipy.ndimage.gaussian_filter`` with ``sigma`` (reflecting borders, so it sums to 1), and
    the image is convolved with it with zero padding of ``size // 2`` (borders darken).

    Parameters
    ----------
    image
        ``[C, H, W]`` or ``[N, C, H, W]`` float tensor.
    size, sigma
        Kernel side (odd int) and sigma in pixels; default :func:`petsiuk_blur_parameters` of
        the image's size.

    Returns
    -------
    Tensor
        Same shape, dtype and device as ``image``.
    """
    from scipy.ndimage import gaussian_filter

    if not isinstance(image, Tensor) or image.dim() not in (3, 4) or not image.is_floating_point():
        what = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be a float tensor [C, H, W] or [N, C, H, W], got {what}")
    auto_size, auto_sigma = petsiuk_blur_parameters(*image.shape[-2:])
    size = auto_size if size is None else size
    sigma = auto_sigma if sigma is None else sigma
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1 \
            or size % 2 == 0:
        raise ValueError(f"blur_size must be an odd positive int (pixels), got {size!r}")
    if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not 0 < sigma < math.inf:
        raise ValueError(f"blur_sigma must be a positive number (pixels), got {sigma!r}")
    delta = np.zeros((int(size), int(size)))
    delta[size // 2, size // 2] = 1.0
    kernel = torch.as_tensor(gaussian_filter(delta, float(sigma)), dtype=image.dtype,
                             device=image.device)
    x = image[None] if image.dim() == 3 else image
    c = x.shape[1]
    out = F.conv2d(x, kernel.expand(c, 1, size, size), padding=size // 2, groups=c)
    return out[0] if image.dim() == 3 else out


def _canvas(spec: Any, x: Tensor, what: str, blur_size: int | None,
            blur_sigma: float | None) -> Tensor:
    """The canvas ``[C, H, W]`` named by ``spec`` for image ``x``."""
    if isinstance(spec, Tensor):
        if not spec.is_floating_point() or not torch.isfinite(spec).all():
            raise ValueError(f"{what} canvas must be a finite float tensor")
        try:
            return spec.detach().to(x.device, x.dtype).expand_as(x).clone()
        except RuntimeError:
            raise ValueError(f"{what} canvas of shape {tuple(spec.shape)} does not broadcast to "
                             f"the image's {tuple(x.shape)}") from None
    if isinstance(spec, str) and spec in CANVASES:
        return petsiuk_blur(x, blur_size, blur_sigma) if spec == "blur" else torch.zeros_like(x)
    if isinstance(spec, int | float | np.floating | np.integer) and not isinstance(spec, bool) \
            and math.isfinite(spec):
        return torch.full_like(x, float(spec))
    raise ValueError(f"unknown {what} canvas {spec!r}; allowed: {', '.join(CANVASES)}, a finite "
                     "number (a constant image) or a tensor that broadcasts to [C, H, W]")


def _check_curve_image(image: Tensor, maps: Tensor, saliency_name: str) -> tuple[Tensor, Tensor]:
    """``(x [C, H, W], maps [M, H, W])`` after the checks shared by the curve functions."""
    for name, value in (("image", image), (saliency_name, maps)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    x = image[0] if image.dim() == 4 and image.shape[0] == 1 else image
    if x.dim() != 3:
        raise ValueError(f"image must be [C, H, W], got {tuple(image.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"image must be a float tensor, got {x.dtype}")
    return x, maps


def insertion_deletion_batch(
    model: nn.Module, image: Tensor, maps: Tensor, target: int | None = None,
    steps: int | None = None, *, insertion_canvas: str | float | Tensor = "blur",
    deletion_canvas: str | float | Tensor = 0.0, normalize: bool = True, batch_size: int = 64,
    blur_size: int | None = None, blur_sigma: float | None = None,
) -> list[FidelityCurves]:
    """Insertion and deletion curves of several maps of one image (Petsiuk et al. 2018, RISE).

    The protocol of Petsiuk et al.'s ``evaluation.py``, which the paper's Table J.18 follows.
    Pixels are ranked by each map (decreasing saliency, ties in raster order). **Insertion**
    starts from ``insertion_canvas`` (default: their blur of the image, :func:`petsiuk_blur`) and
    puts the image's pixels back, most salient first; **deletion** starts from the image and
    replaces its pixels, most salient first, by ``deletion_canvas`` (default: the constant 0).
    (The paper's text says deletion goes in *increasing* order of importance; the standard
    protocol, and the paper's own reading that lower is better, is decreasing, which is used here.)
    A pixel is all its channels. At ``steps + 1`` equally spaced pixel counts
    ``round(k * H * W / steps)``, both ends included, the model's softmax probability of
    ``target`` is recorded; the area under each curve is the trapezoid rule over the fraction of
    pixels (Petsiuk's ``auc``). At fraction 0 the insertion image is exactly the canvas and the
    deletion image the image; at fraction 1 the reverse.

    Parameters
    ----------
    model
        Classifier returning logits ``[N, K]``; run in eval mode without gradients, its flags
        restored. The images go to the model's device.
    image
        ``[C, H, W]`` (or ``[1, C, H, W]``) float tensor.
    maps
        ``[M, H, W]`` 2-D saliency maps (e.g. a channel aggregation, :func:`aggregate`).
    target
        Class whose probability is tracked; default the model's prediction on ``image`` (the
        protocol's "predicted class").
    steps
        Number of intervals (1 to ``H * W``); default ``H``: Petsiuk's 224 pixels (one row) per
        step at 224 x 224.
    insertion_canvas, deletion_canvas
        ``"blur"``, ``"zero"``, a number (a constant image) or a tensor broadcasting to
        ``[C, H, W]``.
    normalize
        Divide the curves (and ``insertion_auc``/``deletion_auc``) by the probability on the full
        image, the paper's normalisation. The unnormalised and normalised areas are returned
        either way (:class:`FidelityCurves`).
    batch_size
        Images per forward pass.
    blur_size, blur_sigma
        The blur kernel's side and sigma in pixels; default Petsiuk's scaled to the image
        (:func:`petsiuk_blur_parameters`).

    Returns
    -------
    list of FidelityCurves
        One per map, in order.

    Raises
    ------
    ValueError
        Bad shapes, non-finite values, ``steps`` or ``batch_size`` out of range, an unknown
        canvas, a target out of range, or ``normalize`` with a full-image probability of 0.
    """
    x, maps = _check_curve_image(image, maps, "maps")
    if maps.dim() != 3 or maps.shape[1:] != x.shape[1:] or maps.shape[0] == 0:
        raise ValueError(f"maps must be [M, H, W] with M >= 1 and [H, W] the image's "
                         f"{tuple(x.shape[1:])}, got {tuple(maps.shape)}")
    return _curves(model, x, maps, target, steps, insertion_canvas, deletion_canvas, normalize,
                   batch_size, blur_size, blur_sigma)


def _curves(model: nn.Module, x: Tensor, maps: Tensor, target: int | None, steps: int | None,
            insertion_canvas: Any, deletion_canvas: Any, normalize: bool, batch_size: int,
            blur_size: int | None, blur_sigma: float | None) -> list[FidelityCurves]:
    """The work of :func:`insertion_deletion_batch`, after the shape checks."""
    if not torch.isfinite(maps).all() or not torch.isfinite(x).all():
        raise ValueError("image and saliency map must be finite")
    hw = x.shape[1] * x.shape[2]
    steps = x.shape[1] if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= hw:
        raise ValueError(f"steps must be an int in 1..{hw} (pixels), got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if target is not None and (isinstance(target, bool)
                               or not isinstance(target, int | np.integer)):
        raise ValueError(f"target must be an int, got {target!r}")
    device = device_of(model, x.device)
    x = x.detach().to(device)
    canvases = (_canvas(insertion_canvas, x, "insertion", blur_size, blur_sigma),
                _canvas(deletion_canvas, x, "deletion", blur_size, blur_sigma))
    m, points = maps.shape[0], steps + 1
    order = torch.argsort(maps.detach().to(device).flatten(1), dim=1, descending=True,
                          stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(hw, device=device).expand(m, hw))
    rank = rank.view(m, 1, *x.shape[1:])
    counts = torch.round(torch.arange(points, device=device) * hw / steps).long()

    probs: list[Tensor] = []
    total = m * 2 * points
    with eval_mode(model), torch.no_grad():
        logits = model(x[None])
        if logits.dim() != 2:
            raise ValueError(f"the model must return logits [N, K], got {tuple(logits.shape)}")
        target = int(logits[0].argmax()) if target is None else int(target)
        if not 0 <= target < logits.shape[1]:
            raise ValueError(f"target {target} out of range for logits of shape "
                             f"{tuple(logits.shape)}")
        full = float(F.softmax(logits.double(), 1)[0, target])
        for start in range(0, total, batch_size):
            idx = torch.arange(start, min(start + batch_size, total), device=device)
            which, k = idx // (2 * points), idx % points
            insert = (idx % (2 * points)) < points
            revealed = rank[which] < counts[k].view(-1, 1, 1, 1)
            batch = torch.where(insert.view(-1, 1, 1, 1),
                                torch.where(revealed, x[None], canvases[0][None]),
                                torch.where(revealed, canvases[1][None], x[None]))
            probs.append(F.softmax(model(batch).double(), 1)[:, target])
    if normalize and full <= 0:
        raise ValueError("the model gives the target probability 0 on the full image; "
                         "cannot normalise (use normalize=False)")
    p = torch.cat(probs).cpu().view(m, 2, points)
    fractions = counts.cpu().double() / hw
    out = []
    for ins, dele in p:
        areas = (float(torch.trapezoid(ins, fractions)), float(torch.trapezoid(dele, fractions)))
        scaled = [a / full if full > 0 else math.nan for a in areas]
        curves = (ins / full, dele / full) if normalize else (ins, dele)
        shown = scaled if normalize else areas
        out.append(FidelityCurves(fractions, *curves, full, *shown, target, *areas, *scaled))
    return out


def insertion_deletion_curves(
    model: nn.Module, image: Tensor, saliency_2d: Tensor, target: int | None = None,
    steps: int | None = None, baseline: str | None = None, normalize: bool = True,
    batch_size: int = 64, blur_sigma: float | None = None, *,
    insertion_canvas: str | float | Tensor | None = None,
    deletion_canvas: str | float | Tensor | None = None, blur_size: int | None = None,
) -> FidelityCurves:
    """Insertion and deletion curves of one map (Petsiuk et al. 2018; the paper's Table J.18).

    :func:`insertion_deletion_batch` for one map ``saliency_2d`` ``[H, W]`` (or ``[1, H, W]``);
    see there for the protocol and the parameters. By default insertion starts from Petsiuk's
    blur and deletion ends at 0, and ``target`` is the model's prediction.

    ``baseline`` (``"zero"`` or ``"blur"``, the earlier interface) sets both canvases at once;
    ``insertion_canvas`` / ``deletion_canvas`` given explicitly win over it.
    """
    x, s = _check_curve_image(image, saliency_2d, "saliency_2d")
    s = s[0] if s.dim() == 3 and s.shape[0] == 1 else s
    if s.shape != x.shape[1:]:
        raise ValueError(f"saliency map shape {tuple(saliency_2d.shape)} does not match the "
                         f"image's {tuple(x.shape[1:])}")
    if baseline is not None and baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; allowed: {', '.join(BASELINES)}")
    if insertion_canvas is None:
        insertion_canvas = "blur" if baseline is None else baseline
    if deletion_canvas is None:
        deletion_canvas = 0.0 if baseline is None else baseline
    return _curves(model, x, s[None], target, steps, insertion_canvas, deletion_canvas,
                   normalize, batch_size, blur_size, blur_sigma)[0]


def insertion_deletion(
    model: nn.Module, image: Tensor, saliency_2d: Tensor, target: int | None = None,
    steps: int | None = None, baseline: str | None = None, normalize: bool = True,
    batch_size: int = 64, blur_sigma: float | None = None, **canvases: Any,
) -> tuple[float, float]:
    """``(insertion_auc, deletion_auc)`` of one map; see :func:`insertion_deletion_curves`
    (``**canvases``: its keyword-only ``insertion_canvas``, ``deletion_canvas``, ``blur_size``).

    Higher insertion and lower deletion are better; normalised by the full image's probability
    unless ``normalize=False``.
    """
    curves = insertion_deletion_curves(model, image, saliency_2d, target, steps=steps,
                                       baseline=baseline, normalize=normalize,
                                       batch_size=batch_size, blur_sigma=blur_sigma, **canvases)
    return curves.insertion_auc, curves.deletion_auc
