"""Scores of saliency maps: Trojan ROC-AUC, the Pointing Game, insertion and deletion.

A Trojan patch is the ground truth of where a backdoored prediction comes from, so a good map for
the Trojan target puts its mass on the patch. :func:`trojan_auc` is the pixel-level ROC-AUC of a
2-D map against the patch mask, and :func:`pointing_game` asks whether the map's maximum lies on
the patch. Maps ``[C, H, W]`` become 2-D by one of two channel aggregations (:func:`aggregate`):
the signed sum or the absolute sum over channels. Both are scored (:func:`trojan_scores`); the paper
reports, per method, the better of the two means (:func:`best_of_aggregations`).

Degenerate cases (a constant map, an empty mask, a mask covering the whole image) have no
meaningful score: they give NaN and a :class:`DegenerateScoreWarning`, never a silent 0.5 or hit.

:func:`insertion_deletion` measures fidelity (Table J.18): the target probability as pixels are
inserted into a blank image, or deleted from the image, in order of saliency.
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
    "AGGREGATIONS", "BASELINES", "SCORE_COLUMNS", "TIES", "DegenerateScoreWarning",
    "FidelityCurves", "aggregate", "best_of_aggregations", "insertion_deletion",
    "insertion_deletion_curves", "pointing_game", "pointing_game_batch", "trojan_auc",
    "trojan_auc_batch", "trojan_scores",
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


@dataclass
class FidelityCurves:
    """Insertion and deletion curves of one map.

    Attributes
    ----------
    fractions
        ``[steps + 1]`` fraction of pixels inserted / deleted at each point, 0 to 1.
    insertion, deletion
        ``[steps + 1]`` target probability on each image (divided by ``full_probability`` when
        normalised).
    full_probability
        Target probability on the unmodified image.
    insertion_auc, deletion_auc
        Trapezoidal area under each curve over ``fractions``; higher insertion and lower deletion
        mean a more faithful map.
    """

    fractions: Tensor
    insertion: Tensor
    deletion: Tensor
    full_probability: float
    insertion_auc: float
    deletion_auc: float



def _blur(image: Tensor, sigma: float) -> Tensor:
    from torchvision.transforms.functional import gaussian_blur

    side = min(image.shape[-2:])
    size = min(2 * math.ceil(3 * sigma) + 1, side - (1 - side % 2))
    return gaussian_blur(image, [size, size], [sigma, sigma])


def insertion_deletion_curves(
    model: nn.Module, image: Tensor, saliency_2d: Tensor, target: int, steps: int = 32,
    baseline: str = "zero", normalize: bool = True, batch_size: int = 64,
    blur_sigma: float | None = None,
) -> FidelityCurves:
    """Insertion and deletion curves (Petsiuk et al. 2018; the paper's Table J.18).

    Pixels are ranked by ``saliency_2d`` (descending, ties in raster order). Insertion starts from
    the baseline image and puts back the top-ranked pixels; deletion starts from the image and
    replaces the top-ranked pixels by the baseline. At ``steps + 1`` evenly spaced pixel counts the
    model's softmax probability of ``target`` is recorded; all images are built at once and run
    in batches of ``batch_size``.

    Parameters
    ----------
    model
        Classifier returning logits; run in eval mode without gradients, its flags restored. The
        image is moved to the model's device.
    image
        ``[C, H, W]`` (or ``[1, C, H, W]``).
    saliency_2d
        ``[H, W]`` (or ``[1, H, W]``); a 2-D aggregation of the map.
    target
        Class whose probability is tracked.
    steps
        Number of intervals of the curve (1 to ``H * W``).
    baseline
        ``"zero"`` (a black image, as in the paper) or ``"blur"`` (a Gaussian blur of the image,
        Petsiuk's insertion canvas).
    normalize
        Divide the curves by the probability on the full image (the paper's normalisation).
    batch_size
        Images per forward pass.
    blur_sigma
        Blur width in pixels; default ``max(1, side / 45)`` (Petsiuk's 5 px at 224 px).
    """
    for name, value in (("image", image), ("saliency_2d", saliency_2d)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    x = image[0] if image.dim() == 4 and image.shape[0] == 1 else image
    s = saliency_2d[0] if saliency_2d.dim() == 3 and saliency_2d.shape[0] == 1 else saliency_2d
    if x.dim() != 3:
        raise ValueError(f"image must be [C, H, W], got {tuple(image.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"image must be a float tensor, got {x.dtype}")
    if s.shape != x.shape[1:]:
        raise ValueError(f"saliency map shape {tuple(saliency_2d.shape)} does not match the "
                         f"image's {tuple(x.shape[1:])}")
    if not torch.isfinite(s).all() or not torch.isfinite(x).all():
        raise ValueError("image and saliency map must be finite")
    hw = s.numel()
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= hw:
        raise ValueError(f"steps must be an int in 1..{hw} (pixels), got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; allowed: {', '.join(BASELINES)}")
    if isinstance(target, bool) or not isinstance(target, int | np.integer):
        raise ValueError(f"target must be an int, got {target!r}")
    device = device_of(model, x.device)
    x = x.detach().to(device)
    if baseline == "zero":
        base = torch.zeros_like(x)
    else:
        sigma = max(1.0, min(x.shape[1:]) / 45) if blur_sigma is None else float(blur_sigma)
        if sigma <= 0:
            raise ValueError(f"blur_sigma must be > 0, got {blur_sigma}")
        base = _blur(x, sigma)
    order = torch.argsort(s.detach().flatten().to(x.device), descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(hw, device=x.device)
    rank = rank.view(1, 1, *s.shape)
    counts = torch.round(torch.arange(steps + 1, device=x.device) * hw / steps).long()

    probs: list[Tensor] = []
    with eval_mode(model), torch.no_grad():
        logits = model(x[None])
        if logits.dim() != 2 or not 0 <= int(target) < logits.shape[1]:
            raise ValueError(f"target {target} out of range for logits of shape "
                             f"{tuple(logits.shape)}")
        full = float(F.softmax(logits.double(), 1)[0, int(target)])
        for start in range(0, 2 * (steps + 1), batch_size):
            idx = torch.arange(start, min(start + batch_size, 2 * (steps + 1)), device=x.device)
            revealed = rank < counts[idx % (steps + 1)].view(-1, 1, 1, 1)
            insert = idx < steps + 1
            keep_image = torch.where(insert.view(-1, 1, 1, 1), revealed, ~revealed)
            batch = torch.where(keep_image, x[None], base[None])
            probs.append(F.softmax(model(batch).double(), 1)[:, int(target)])
    p = torch.cat(probs).cpu()
    ins, dele = p[:steps + 1], p[steps + 1:]
    if normalize:
        if full <= 0:
            raise ValueError("the model gives the target probability 0 on the full image; "
                             "cannot normalise (use normalize=False)")
        ins, dele = ins / full, dele / full
    fractions = counts.cpu().double() / hw
    return FidelityCurves(fractions, ins, dele, full, float(torch.trapezoid(ins, fractions)),
                          float(torch.trapezoid(dele, fractions)))


def insertion_deletion(
    model: nn.Module, image: Tensor, saliency_2d: Tensor, target: int, steps: int = 32,
    baseline: str = "zero", normalize: bool = True, batch_size: int = 64,
    blur_sigma: float | None = None,
) -> tuple[float, float]:
    """``(insertion_auc, deletion_auc)`` of one map; see :func:`insertion_deletion_curves`.

    Higher insertion and lower deletion are better.
    """
    curves = insertion_deletion_curves(model, image, saliency_2d, target, steps=steps,
                                       baseline=baseline, normalize=normalize,
                                       batch_size=batch_size, blur_sigma=blur_sigma)
    return curves.insertion_auc, curves.deletion_auc
