"""Fidelity of SPADE traces: gradient noise (Appendix E) and mask agreement (Appendix K).

**Gradient noise** (Figure E.5). The paper adds Gaussian noise to a test image 100 times, takes the
gradient of the target logit for every noisy copy, and reports the mean cosine similarity between
every pair of gradients, per layer, for the dense model and for the SPADE trace (0.7355 -> 0.7721
on average). :func:`gradient_noise` does this for one image and network: the copies run in
batches, and forward hooks (:func:`recorded_outputs`) keep every named layer's output so that one
backward pass gives each copy's gradient with respect to the input and to those outputs.
:func:`mean_pairwise_cosine` averages the cosines; :func:`gradient_noise_rows` runs the
evaluation samples (dense and SPADE, the same noise for both), cached per sample, and
:func:`gradient_noise_summary` and :func:`gradient_noise_verdict` read the table.

**Mask agreement** (Figure K.11). SPADE prunes every layer to 0.99 for two inputs, and the
agreement of the two masks (which weights each keeps) is measured per layer.
:func:`trace_masks` gives a trace's masks (a kept weight is a nonzero weight of the pruned copy),
:func:`mask_agreement` compares two of them (overlap over kept weights; the Dice coefficient,
:math:`2|A \\cap B| / (|A| + |B|)`, which is ``overlap / k`` when both keep ``k`` weights), with
the value that independent random masks would reach (the chance line, the keep ratio).
:func:`select_pairs` and :func:`agreement_pairs` draw the three kinds of pairs of the paper
(:data:`AGREEMENT_KINDS`), :func:`mask_agreement_rows` traces every image once (its masks cached)
and :func:`agreement_summary` and :func:`agreement_verdicts` read the table.

The paper's claims are data here (:data:`PAPER_GRADIENT_COSINE`, :data:`PAPER_MASK_AGREEMENT`),
and the verdicts are computed from the numbers at one standard error
(:func:`spade_lib.tables.range_verdict`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from spade_lib import pruning, reproducibility, schedules
from spade_lib.checks import check_image, check_positive_int
from spade_lib.config import Config
from spade_lib.files import atomic_write
from spade_lib.hessians import eval_mode
from spade_lib.models import device_of
from spade_lib.models import fingerprint as model_fingerprint
from spade_lib.samples import Samples, evaluation_samples, sample_seed
from spade_lib.store import ResultStore
from spade_lib.tables import range_verdict
from spade_lib.trace import Trace

__all__ = [
    "AGREEMENT_COLUMNS", "AGREEMENT_KINDS", "ALL_LAYERS", "GRADIENT_COLUMNS",
    "GRADIENT_NOISE_COLUMNS", "INPUT", "MASK_AGREEMENT_COLUMNS", "PAIR_COLUMNS",
    "MIN_PAIRS", "PAPER_COPIES", "PAPER_GRADIENT_COSINE", "PAPER_MASK_AGREEMENT",
    "PAPER_MASK_SPARSITY", "SMOOTHGRAD_NOISE", "agreement_pairs", "agreement_summary",
    "agreement_table", "agreement_verdicts", "default_pairs", "gradient_noise",
    "gradient_noise_key", "gradient_noise_rows", "gradient_noise_summary",
    "gradient_noise_table", "gradient_noise_verdict", "image_masks",
    "mask_agreement", "mask_agreement_rows", "mean_pairwise_cosine", "noisy_copies",
    "recorded_outputs", "select_pairs", "trace_masks", "weight_masks",
]

PAPER_GRADIENT_COSINE = {"dense": 0.7355, "spade": 0.7721}
"""Figure E.5: the mean cosine similarity between the gradients of 100 noisy copies of an image,
averaged over layers and 100 ImageNet images (ResNet-50), dense and through SPADE."""

PAPER_MASK_AGREEMENT = (0.20, 0.60)
"""Appendix K: "masks between two samples agree between 20 and 60% of the time" (ResNet-50,
ImageNet, 0.99 sparsity), highest in earlier layers and for the most similar images."""

PAPER_COPIES = 100
"""Appendix E: noisy copies per image."""

PAPER_MASK_SPARSITY = 0.99
"""Figure K.11: the sparsity of every layer in the traces whose masks are compared."""

MIN_PAIRS = 50
"""Pairs per kind for Figure K.11 when the preset affords it (:func:`default_pairs`)."""

SMOOTHGRAD_NOISE = 0.1
"""Default noise level of :func:`gradient_noise`: the standard deviation as a fraction of the
input range (here [0, 1]). SmoothGrad (Smilkov et al., 2017, Section 4.2) finds 10-20% of
``x_max - x_min`` best; the low end keeps the copies close to the image being explained."""

INPUT = "input"
"""The name of the input's row in the gradient-noise tables (``position`` 0)."""

_VERSION = 1
"""Part of every cache key here: bump it when a computation below changes its numbers."""


# --------------------------------------------------------------------------------------------
# Gradient noise: one image
# --------------------------------------------------------------------------------------------

def _named_modules(model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Module]:
    if isinstance(layers, str) or not isinstance(layers, Sequence):
        raise ValueError(f"layers must be a sequence of module names, got {layers!r}")
    named = dict(model.named_modules())
    bad = [n for n in layers if not isinstance(n, str) or n in ("", INPUT) or n not in named]
    if bad:
        valid = [n for n in named if n]
        raise ValueError(f"unknown layer(s) {bad}; valid module names: {', '.join(valid)}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must be unique, got {list(layers)}")
    return {n: named[n] for n in layers}


@contextlib.contextmanager
def recorded_outputs(model: nn.Module, layers: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Keep the output of each named module while ``model`` runs; hooks removed on exit.

    Yields a dict that each forward pass fills with ``{name: output}`` (clear it between passes).
    The recorded tensor is the module's own output; the network goes on with a copy of it, so a
    later in-place operation (``ReLU(inplace=True)``) cannot change what was recorded and
    ``torch.autograd.grad(y, outputs[name])`` is the gradient with respect to that module's output.

    Raises
    ------
    ValueError
        An unknown or repeated module name (the message lists the valid names).
    RuntimeError
        (while running) A module that runs twice in one pass (its output would be ambiguous) or
        returns something other than one tensor.
    """
    modules = _named_modules(model, layers)
    outputs: dict[str, Tensor] = {}

    def hook_for(name: str) -> Callable[..., Tensor]:
        def hook(module: nn.Module, args: Any, out: Any) -> Tensor:
            if not isinstance(out, Tensor):
                raise RuntimeError(f"layer {name!r} returned {type(out).__name__}, not a tensor")
            if name in outputs:
                raise RuntimeError(f"layer {name!r} ran twice in one forward pass (a reused "
                                   "module); its output is ambiguous. Clear the dict between "
                                   "passes, or name a module that runs once.")
            outputs[name] = out
            return out.clone()
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in modules.items()]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def mean_pairwise_cosine(vectors: Tensor) -> tuple[float, int]:
    """The mean cosine similarity over all pairs ``i < j`` of the rows of ``vectors``.

    Rows that are zero or not finite have no direction; they are left out and counted. The mean
    is computed in float64 as ``(||sum_i u_i||^2 - m) / (m (m - 1))`` over the ``m`` unit rows
    ``u_i``, which equals the mean of the ``m (m - 1) / 2`` pairwise cosines.

    Parameters
    ----------
    vectors
        ``[n, d]``, one vector per row (e.g. one gradient per noisy copy).

    Returns
    -------
    (float, int)
        The mean cosine (NaN when fewer than two rows have a direction) and the number of rows
        left out.
    """
    if not isinstance(vectors, Tensor) or vectors.dim() != 2:
        shape = tuple(vectors.shape) if isinstance(vectors, Tensor) else type(vectors).__name__
        raise ValueError(f"vectors must be a [n, d] tensor, got {shape}")
    v = vectors.detach().to(torch.float64)
    norms = v.norm(dim=1)
    ok = torch.isfinite(v).all(dim=1) & (norms > 0)
    m = int(ok.sum())
    if m < 2:
        return math.nan, int(v.shape[0]) - m
    u = v[ok] / norms[ok, None]
    s = u.sum(dim=0)
    return float(((s @ s) - m) / (m * (m - 1))), int(v.shape[0]) - m


def _check_noise(noise: Any) -> float:
    if isinstance(noise, bool) or not isinstance(noise, numbers.Real) or not (
            math.isfinite(noise) and noise > 0):
        raise ValueError(f"noise must be a positive number (standard deviation as a fraction of "
                         f"the input range [0, 1]), got {noise!r}")
    return float(noise)


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def noisy_copies(image: Tensor, n_copies: int, noise: float = SMOOTHGRAD_NOISE,
                 seed: int = 0) -> Tensor:
    """``n_copies`` copies of ``image`` ``[3, H, W]`` with Gaussian noise, ``[n, 3, H, W]``.

    Copy ``i`` is ``image + noise * eps_i`` with ``eps_i`` standard normal, drawn from a CPU
    generator seeded with ``seed`` (the same copies on every device), not clipped to [0, 1] (the
    SmoothGrad convention). ``noise`` is the standard deviation as a fraction of the input range
    [0, 1] (:data:`SMOOTHGRAD_NOISE`).
    """
    std, seed = _check_noise(noise), _check_seed(seed)
    n_copies = check_positive_int(n_copies, "n_copies")
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn((n_copies, *image.shape), generator=gen, dtype=torch.float32)
    return image.detach().cpu()[None] + eps.mul_(std).to(image.dtype)


GRADIENT_NOISE_COLUMNS = ("layer", "position", "size", "cosine", "n_copies", "n_degenerate",
                          "target_kept")
"""Columns of :func:`gradient_noise` (one row per layer)."""


def gradient_noise(
    model: nn.Module,
    image: Tensor,
    target: int,
    layers: Sequence[str] = (),
    n_copies: int = PAPER_COPIES,
    noise: float = SMOOTHGRAD_NOISE,
    seed: int = 0,
    batch_size: int = 100,
) -> pd.DataFrame:
    """Gradient noise of one image (Appendix E): the mean pairwise cosine of the gradients of
    ``n_copies`` noisy copies, for the input and for the output of each named layer.

    The copies are :func:`noisy_copies` (``image + noise * eps_i``, not clipped). The gradient
    of the ``target`` logit is taken with respect to the copy and to each layer's output
    (:func:`recorded_outputs`); a batch of copies is one forward and one backward pass, which
    gives each copy its own gradient because the network runs in eval mode (no statistic mixes
    the copies). The network's parameters, gradients and train/eval flags are
    left as they were.

    Parameters
    ----------
    model
        The classifier (dense or a SPADE trace), returning logits ``[N, K]``.
    image
        ``[3, H, W]`` or ``[1, 3, H, W]``, float in [0, 1].
    target
        The class whose logit is differentiated (for a Trojan sample: the Trojan target).
    layers
        Module names whose outputs get a row each, after the input's row (:data:`INPUT`).
    n_copies
        Noisy copies (the paper: 100); at least 2.
    noise
        Standard deviation of the noise as a fraction of the input range [0, 1]
        (:data:`SMOOTHGRAD_NOISE`).
    seed
        Seeds the noise: the same seed gives the same copies for any network of this image's
        shape, so a dense network and its trace see the same copies.
    batch_size
        Copies per forward/backward pass.

    Returns
    -------
    pandas.DataFrame
        One row per layer (:data:`GRADIENT_NOISE_COLUMNS`): ``layer``, ``position`` (0 for the
        input, then the order of ``layers``), ``size`` (elements of one copy's gradient),
        ``cosine`` (mean pairwise cosine; NaN when fewer than two copies have a nonzero, finite
        gradient), ``n_copies``, ``n_degenerate`` (copies left out) and ``target_kept`` (share of
        copies whose prediction is ``target``; the same on every row).

    Raises
    ------
    ValueError
        A bad image, target, layer name, ``n_copies`` (< 2), ``noise`` or ``seed``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    image = check_image(image, dtype)
    n_copies = check_positive_int(n_copies, "n_copies")
    if n_copies < 2:
        raise ValueError(f"n_copies must be at least 2 (a pair), got {n_copies}")
    batch_size = check_positive_int(batch_size, "batch_size")
    std, seed = _check_noise(noise), _check_seed(seed)
    if isinstance(target, bool) or not isinstance(target, numbers.Integral) or target < 0:
        raise ValueError(f"target must be a non-negative class index, got {target!r}")
    _named_modules(model, layers)
    device = device_of(model)
    copies = noisy_copies(image, n_copies, std, seed)
    names = [INPUT, *layers]
    grads: dict[str, list[Tensor]] = {n: [] for n in names}
    hits = 0
    with eval_mode(model), torch.enable_grad(), recorded_outputs(model, layers) as outputs:
        for start in range(0, n_copies, batch_size):
            outputs.clear()
            x = copies[start:start + batch_size].to(device).requires_grad_(True)
            logits = model(x)
            if logits.dim() != 2 or not target < logits.shape[1]:
                raise ValueError(f"target {target} is not a class of the model's output "
                                 f"{tuple(logits.shape)}; allowed: 0..{logits.shape[-1] - 1}")
            hits += int((logits.argmax(1) == target).sum())
            wrt = [x, *(outputs[n] for n in layers)]
            found = torch.autograd.grad(logits[:, target].sum(), wrt, allow_unused=True)
            for name, tensor, g in zip(names, wrt, found, strict=True):
                g = torch.zeros_like(tensor) if g is None else g
                grads[name].append(g.detach().flatten(1).to(torch.float64))
    rows = []
    for position, name in enumerate(names):
        stack = torch.cat(grads[name])
        cosine, degenerate = mean_pairwise_cosine(stack)
        rows.append({"layer": name, "position": position, "size": int(stack.shape[1]),
                     "cosine": cosine, "n_copies": n_copies, "n_degenerate": degenerate,
                     "target_kept": hits / n_copies})
    return pd.DataFrame(rows, columns=list(GRADIENT_NOISE_COLUMNS))


# --------------------------------------------------------------------------------------------
# Cached per-item tables
# --------------------------------------------------------------------------------------------

class _RowStore(ResultStore):
    """A :class:`~spade_lib.store.ResultStore` of any table (one Parquet file per item)."""

    def read(self, samples: Sequence[int] | None = None) -> pd.DataFrame:
        ids = sorted(self.done()) if samples is None else [int(s) for s in samples]
        return pd.concat([pd.read_parquet(self.file(s)) for s in ids], ignore_index=True)


def _hash(blob: Mapping[str, Any]) -> str:
    text = json.dumps(blob, sort_keys=True, default=str).encode()
    return hashlib.sha256(text).hexdigest()[:16]


_TRACE_KEYS = ("seed", "dataset", "scene", "image_size", "train_size", "test_size", "rules",
               "trojan_fraction", "patch_scale", "patch_alpha", "pruner", "n_augmentations",
               "augment")
"""Config keys that change the images and the traces (those of
:data:`spade_lib.results.RESULT_KEYS`, which the runner's traces share)."""


# --------------------------------------------------------------------------------------------
# Gradient noise: the evaluation samples
# --------------------------------------------------------------------------------------------

GRADIENT_COLUMNS = ("sample", "rule_name", "target", "variant", *GRADIENT_NOISE_COLUMNS,
                    "config_hash")
"""Columns of :func:`gradient_noise_rows` (one row per sample, variant and layer)."""


def _pruned_layers(model: nn.Module, sparsity: schedules.SparsitySpec) -> list[str]:
    return [n for n, s in schedules.resolve_sparsity(model, sparsity).items() if s > 0]


def gradient_noise_key(cfg: Config, model: nn.Module, n_copies: int, noise: float,
                       rules: Sequence[str] = ()) -> str:
    """The hash that names a gradient-noise run's store: the trace settings of ``cfg`` (with
    ``sparsity``), the model's weights, the poisoned set's rule names, ``n_copies`` and
    ``noise``."""
    return _hash({"what": "gradient-noise", "version": _VERSION,
                  "config": cfg.digest((*_TRACE_KEYS, "sparsity")),
                  "model": model_fingerprint(model), "rules": list(rules),
                  "n_copies": int(n_copies), "noise": float(noise)})


def _gradient_sample(cfg: Config, model: nn.Module, samples: Samples, position: int,
                     layers: Sequence[str], n_copies: int, noise: float, key: str) -> pd.DataFrame:
    from spade_lib.results import Variant, variant_network

    info = samples.table.iloc[position]
    sample, target = int(info["sample"]), int(info["target"])
    image = samples.poisoned.float_images([sample])[0]
    seed = sample_seed(cfg.seed, sample)
    spade = variant_network(cfg, model, samples, position, Variant("spade", cfg.sparsity))[0]
    parts = []
    for variant, net in (("dense", model), ("spade", spade)):
        part = gradient_noise(net, image, target, layers, n_copies, noise, seed)
        part.insert(0, "variant", variant)
        parts.append(part)
    rows = pd.concat(parts, ignore_index=True)
    rows.insert(0, "sample", sample)
    rows.insert(1, "rule_name", str(info["rule_name"]))
    rows.insert(2, "target", target)
    rows["config_hash"] = key
    return rows[list(GRADIENT_COLUMNS)]


def gradient_noise_rows(
    cfg: Config,
    model: nn.Module,
    samples: Samples,
    n_copies: int = PAPER_COPIES,
    noise: float = SMOOTHGRAD_NOISE,
    store: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """Figure E.5's numbers: :func:`gradient_noise` of every sample, dense and through SPADE.

    SPADE is the runner's trace (:func:`spade_lib.results.variant_network` with
    ``cfg.sparsity``, ``cfg.pruner``, ``cfg.n_augmentations``, ``cfg.augment`` and the seed
    :func:`spade_lib.samples.sample_seed`), so it is the network chapter B explains. The layers
    are the input and every layer ``cfg.sparsity`` prunes; the target is the Trojan target; both
    networks see the same noisy copies (seeded by the sample's seed).

    Parameters
    ----------
    cfg, model
        The preset and its trained model (not changed).
    samples
        Evaluation samples (:func:`spade_lib.samples.evaluation_samples`).
    n_copies, noise
        See :func:`gradient_noise`.
    store
        Keep each sample's rows in ``cfg.cache_path("fidelity", "gradient-noise", KEY)``
        (:func:`gradient_noise_key`), one file per sample: a rebuild recomputes nothing, an
        interrupted run continues. ``False``: compute everything, keep nothing.
    progress
        Show a progress bar over samples.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`GRADIENT_COLUMNS`, ordered by sample (as in ``samples``), variant
        (dense, spade) and position.
    """
    if not isinstance(samples, Samples) or len(samples) == 0:
        raise ValueError(f"samples must be a non-empty Samples object, got {samples!r}")
    n_copies = check_positive_int(n_copies, "n_copies")
    noise = _check_noise(noise)
    layers = _pruned_layers(model, cfg.sparsity)
    key = gradient_noise_key(cfg, model, n_copies, noise, [r.name for r in samples.poisoned.rules])
    target = _RowStore(cfg.cache_path("fidelity", "gradient-noise", key, "meta.json").parent) \
        if store else None
    if target is not None and target.read_meta() is None:
        target.write_meta({"key": key, "config": cfg.to_dict(), "n_copies": n_copies,
                           "noise": noise, "layers": layers, "model": model_fingerprint(model),
                           "numerics": reproducibility.settings()})
    done = target.done() if target is not None else set()
    ids = samples.ids
    fresh: dict[int, pd.DataFrame] = {}
    todo = [i for i, s in enumerate(ids) if s not in done]
    with tqdm(total=len(ids), initial=len(ids) - len(todo), desc="samples",
              disable=not progress) as bar:
        for position in todo:
            rows = _gradient_sample(cfg, model, samples, position, layers, n_copies, noise, key)
            if target is not None:
                target.write(ids[position], rows)
            else:
                fresh[ids[position]] = rows
            bar.update(1)
    if target is not None:
        return target.read(ids)
    return pd.concat([fresh[s] for s in ids], ignore_index=True)


def _spread(values: pd.Series) -> dict[str, float]:
    v = values.dropna()
    n = len(v)
    std = float(v.std(ddof=1)) if n > 1 else math.nan
    return {"mean": float(v.mean()) if n else math.nan, "std": std,
            "se": std / math.sqrt(n) if n > 1 else math.nan, "n": n,
            "n_nan": int(values.isna().sum())}


ALL_LAYERS = "all layers"
"""The label of the row that averages over layers (per sample or pair, then over them)."""


def _layer_means(rows: pd.DataFrame, unit: Sequence[str], group: str, value: str) -> pd.DataFrame:
    """Per unit (sample or pair) and group (variant or kind): the mean of ``value`` over layers
    (NaN when any layer is NaN: an average over fewer layers is not comparable)."""
    return (rows.groupby([group, *unit], sort=False)[value]
            .agg(lambda v: v.mean(skipna=False)).rename(value).reset_index())


def gradient_noise_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Figure E.5's bars: per variant and layer, the mean over samples of the mean pairwise
    cosine, its standard deviation (the paper's error bars), standard error and counts.

    The last rows (layer :data:`ALL_LAYERS`) average each sample's layers first (NaN where a
    layer is NaN, counted in ``n_nan``). Columns: ``variant``, ``layer``, ``position``, ``mean``,
    ``std``, ``se``, ``n``, ``n_nan``.
    """
    _need(rows, ("sample", "variant", "layer", "position", "cosine"), "gradient_noise_rows()")
    out = []
    for (variant, layer, position), part in rows.groupby(["variant", "layer", "position"],
                                                          sort=False):
        out.append({"variant": variant, "layer": layer, "position": position,
                    **_spread(part["cosine"])})
    last = int(rows["position"].max()) + 1
    for variant, part in _layer_means(rows, ["sample"], "variant", "cosine").groupby(
            "variant", sort=False):
        out.append({"variant": variant, "layer": ALL_LAYERS, "position": last,
                    **_spread(part["cosine"])})
    return pd.DataFrame(out).sort_values(["position", "variant"], kind="stable").reset_index(
        drop=True)


def gradient_noise_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Figure E.5 as a table: per layer (in order, then :data:`ALL_LAYERS`), the mean cosine of
    dense and SPADE over samples with their standard deviations, and the mean of the per-sample
    difference (SPADE minus dense) with its standard error over the ``n`` samples that have both.

    Columns: ``dense``, ``dense_std``, ``spade``, ``spade_std``, ``delta``, ``se``, ``n``.
    """
    summary = gradient_noise_summary(rows)
    per = rows.set_index(["sample", "layer", "variant"])["cosine"].unstack("variant")
    whole = _layer_means(rows, ["sample"], "variant", "cosine").pivot(
        index="sample", columns="variant", values="cosine")
    out = []
    for layer in dict.fromkeys(summary["layer"]):
        pick = whole if layer == ALL_LAYERS else per.xs(layer, level="layer")
        mine = summary[summary["layer"] == layer].set_index("variant")
        diff = _spread(pick["spade"] - pick["dense"])
        out.append({"layer": layer, "dense": mine.loc["dense", "mean"],
                    "dense_std": mine.loc["dense", "std"], "spade": mine.loc["spade", "mean"],
                    "spade_std": mine.loc["spade", "std"], "delta": diff["mean"],
                    "se": diff["se"], "n": diff["n"]})
    return pd.DataFrame(out).set_index("layer")


def _need(rows: pd.DataFrame, columns: Sequence[str], source: str) -> None:
    if not isinstance(rows, pd.DataFrame):
        raise ValueError(f"expected the table of {source}, got {type(rows).__name__}")
    missing = [c for c in columns if c not in rows.columns]
    if missing:
        raise ValueError(f"the table lacks columns {missing}; pass the table of {source}")


def gradient_noise_verdict(rows: pd.DataFrame,
                           paper: Mapping[str, float] = PAPER_GRADIENT_COSINE) -> dict[str, Any]:
    """Does SPADE make the gradients of noisy copies more alike, as in Figure E.5?

    The claim tested is the paper's direction, ``spade > dense`` for the mean cosine averaged
    over layers (the levels depend on the network and the noise scale; the paper's are
    ``paper["dense"] -> paper["spade"]``). ``delta`` is the mean over samples of the per-sample
    difference (SPADE minus dense, each averaged over layers), ``se`` its standard error; the
    verdict: "holds" when ``delta - se > 0``, "fails" when ``delta + se < 0``, else
    "inconclusive" ("not comparable" when no sample has every layer). The same test per layer gives
    ``layers_higher`` / ``layers_lower`` (layers where SPADE is above / below dense beyond one
    standard error) out of ``layers``.

    Returns
    -------
    dict
        ``dense``, ``spade``, ``delta``, ``se``, ``n``, ``verdict``, ``layers_higher``,
        ``layers_lower``, ``layers``, ``paper_dense``, ``paper_spade``, ``target_kept_dense``
        and ``target_kept_spade`` (share of noisy copies still predicting the target; NaN
        without that column), ``sentence`` (Markdown).
    """
    _need(rows, ("sample", "variant", "layer", "cosine"), "gradient_noise_rows()")
    variants = set(rows["variant"])
    if not {"dense", "spade"} <= variants:
        raise ValueError(f"the table needs variants 'dense' and 'spade', has {sorted(variants)}")
    per = rows.set_index(["sample", "layer", "variant"])["cosine"].unstack("variant")
    diff = (per["spade"] - per["dense"]).rename("delta").reset_index()
    means = _layer_means(rows, ["sample"], "variant", "cosine").pivot(
        index="sample", columns="variant", values="cosine")
    total = _spread(means["spade"] - means["dense"])
    verdict = _above(total["mean"], total["se"])
    higher = lower = 0
    for _, part in diff.groupby("layer", sort=False):
        s = _spread(part["delta"])
        v = _above(s["mean"], s["se"])
        higher += v == "holds"
        lower += v == "fails"
    kept = rows.drop_duplicates(["sample", "variant"]).groupby("variant")["target_kept"].mean() \
        if "target_kept" in rows else pd.Series(math.nan, index=["dense", "spade"])
    out = {"dense": float(means["dense"].mean()), "spade": float(means["spade"].mean()),
           "target_kept_dense": float(kept["dense"]), "target_kept_spade": float(kept["spade"]),
           "delta": total["mean"], "se": total["se"], "n": total["n"], "verdict": verdict,
           "layers_higher": int(higher), "layers_lower": int(lower),
           "layers": int(diff["layer"].nunique()), "paper_dense": float(paper["dense"]),
           "paper_spade": float(paper["spade"])}
    out["sentence"] = _gradient_sentence(out)
    return out


def _above(delta: float, se: float) -> str:
    """Whether ``delta > 0`` at one standard error: "holds" when ``delta - se > 0``, "fails" when
    ``delta + se < 0``, else "inconclusive" (a difference of exactly 0 with no spread, e.g. a
    layer equal by construction, holds nothing); NaN as :func:`spade_lib.tables.range_verdict`."""
    verdict = range_verdict(delta, se, 0.0, math.inf)
    return "inconclusive" if verdict == "holds" and not delta - se > 0 else verdict


def _gradient_sentence(v: Mapping[str, Any]) -> str:
    start = (f"The paper: with SPADE the mean cosine similarity rises from {v['paper_dense']:.4f} "
             f"to {v['paper_spade']:.4f}, at every layer. Here (averaged over layers, "
             f"{v['n']} samples): dense {v['dense']:.4f}, SPADE {v['spade']:.4f}, difference "
             f"**{v['delta']:+.4f} +- {v['se']:.4f}**")
    meaning = {
        "holds": "SPADE's gradients are more alike at one standard error: the claim **holds**",
        "fails": "SPADE's gradients are less alike at one standard error: the claim **fails**",
        "inconclusive": "one standard error reaches across zero: **inconclusive**",
        "not comparable": "no sample has a cosine at every layer: **not comparable**",
    }[v["verdict"]]
    text = (f"{start}; {meaning}. Per layer, SPADE is higher beyond one standard error at "
            f"{v['layers_higher']} of {v['layers']} layers and lower at {v['layers_lower']}.")
    if not math.isnan(v["target_kept_dense"]):
        text += (f" The noisy copies keep the target prediction {v['target_kept_dense']:.0%} of "
                 f"the time on the dense model and {v['target_kept_spade']:.0%} through SPADE.")
    return text


# --------------------------------------------------------------------------------------------
# Masks and their agreement
# --------------------------------------------------------------------------------------------

def weight_masks(model: nn.Module, layers: Sequence[str]) -> dict[str, Tensor]:
    """``{name: weight != 0}`` (bool, on the CPU) for the named layers of ``model``."""
    modules = _named_modules(model, layers)
    out = {}
    for name, m in modules.items():
        w = getattr(m, "weight", None)
        if not isinstance(w, Tensor):
            raise ValueError(f"layer {name!r} ({type(m).__name__}) has no weight tensor")
        out[name] = (w.detach() != 0).cpu()
    return out


def trace_masks(result: Trace) -> dict[str, Tensor]:
    """The masks of a SPADE trace: per pruned layer (the rows of ``result.report``), a bool
    tensor of the weight's shape, True where the pruned copy's weight is nonzero (kept).

    Weights that were exactly zero in the dense model: the solvers score a weight by
    ``w^2 / [H^-1]_jj``, so such a weight is usually among the first removed, but FastOBC chooses
    a group's mask after the errors of earlier columns were pushed onto it, so it may keep such a
    weight with a nonzero value: the pruned copy then uses a connection the dense model did not
    have, and it counts as kept here. A weight zero in both carries nothing and counts as removed
    (also where the solver's mask kept it). So the masks say which connections each pruned copy
    uses, and the candidates of the chance line (:func:`mask_agreement`) are all weights;
    :func:`mask_agreement_rows` reports the dense model's zeros per layer beside it.
    """
    if not isinstance(result, Trace):
        raise ValueError(f"result must be a spade_lib.trace.Trace, got {type(result).__name__}")
    return weight_masks(result.model, list(result.report["layer"]))


MASK_AGREEMENT_COLUMNS = ("layer", "position", "weights", "kept_a", "kept_b", "overlap",
                          "agreement", "chance")
"""Columns of :func:`mask_agreement` (one row per layer)."""


def mask_agreement(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> pd.DataFrame:
    """The agreement of two sets of masks, per layer (Figure K.11).

    ``agreement = 2 * overlap / (kept_a + kept_b)``: the overlap of the kept weights divided by
    the kept weights (the Dice coefficient). When both keep ``k`` weights it is ``overlap / k``,
    the paper's "dot product of the masks scaled by the inverse keep ratio": 1 for identical
    masks, 0 for disjoint ones, and the keep ratio ``k / n`` on average for independent random
    masks. ``chance`` is that expectation for masks of the same sizes drawn independently and
    uniformly from the layer's ``weights``: ``E[overlap] = kept_a * kept_b / weights``, so
    ``chance = 2 * kept_a * kept_b / (weights * (kept_a + kept_b))``.

    Parameters
    ----------
    a, b
        ``{layer: bool tensor}`` with the same layers and shapes (e.g. :func:`trace_masks`).

    Returns
    -------
    pandas.DataFrame
        One row per layer of ``a`` (:data:`MASK_AGREEMENT_COLUMNS`); ``agreement`` and
        ``chance`` are NaN where neither mask keeps a weight.
    """
    if list(a) != list(b):
        raise ValueError(f"the two sets of masks have different layers: {list(a)} vs {list(b)}")
    rows = []
    for position, name in enumerate(a):
        ma, mb = a[name], b[name]
        for what, m in (("a", ma), ("b", mb)):
            if not isinstance(m, Tensor) or m.dtype != torch.bool:
                raise ValueError(f"masks {what}[{name!r}] must be a bool tensor, got "
                                 f"{getattr(m, 'dtype', type(m).__name__)}")
        if ma.shape != mb.shape:
            raise ValueError(f"layer {name!r}: mask shapes differ, {tuple(ma.shape)} vs "
                             f"{tuple(mb.shape)}")
        n = ma.numel()
        ka, kb = int(ma.sum()), int(mb.sum())
        overlap = int((ma & mb).sum())
        kept = ka + kb
        rows.append({"layer": name, "position": position, "weights": n, "kept_a": ka,
                     "kept_b": kb, "overlap": overlap,
                     "agreement": 2 * overlap / kept if kept else math.nan,
                     "chance": 2 * ka * kb / (n * kept) if kept and n else math.nan})
    return pd.DataFrame(rows, columns=list(MASK_AGREEMENT_COLUMNS))


# --------------------------------------------------------------------------------------------
# Pairs of images
# --------------------------------------------------------------------------------------------

AGREEMENT_KINDS = ("random", "same Trojan", "same Trojan and class")
"""The paper's three kinds of pairs, from least to most alike: (a) two clean test images of
different classes, (b) two Trojan samples of the same rule and different true classes, (c) two
Trojan samples of the same rule and the same true class."""

PAIR_COLUMNS = ("kind", "pair", "source_a", "index_a", "label_a", "source_b", "index_b",
                "label_b", "rule_name")
"""Columns of :func:`select_pairs`. ``source`` is ``"test"`` (``index``: a clean test image) or
``"poisoned"`` (``index``: a sample id in the poisoned set); ``label`` the true class;
``rule_name`` the shared Trojan ("" for random pairs)."""


def _match(items: Sequence[int], labels: Mapping[int, int], rng: np.random.Generator,
           same: bool) -> list[tuple[int, int]]:
    """Disjoint pairs from ``items`` in a random order: equal labels (``same``) or different."""
    order = [items[i] for i in rng.permutation(len(items))]
    if same:
        groups: dict[int, list[int]] = {}
        for i in order:
            groups.setdefault(labels[i], []).append(i)
        return [(g[j], g[j + 1]) for g in groups.values() for j in range(0, len(g) - 1, 2)]
    pairs, waiting = [], []
    for i in order:
        partner = next((w for w in waiting if labels[w] != labels[i]), None)
        if partner is None:
            waiting.append(i)
        else:
            waiting.remove(partner)
            pairs.append((partner, i))
    return pairs


def _take(pairs: list[tuple[int, int]], n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """``n`` of ``pairs`` drawn at random (all if fewer), in their order."""
    return [pairs[i] for i in sorted(rng.permutation(len(pairs))[:n])]


def _turns(per_rule: Sequence[list[tuple[int, int]]], n: int,
           rng: np.random.Generator) -> list[tuple[int, tuple[int, int]]]:
    """Up to ``n`` ``(rule, pair)``: the rules take turns giving a random one of their pairs, so
    every rule gives ``n // rules`` where it can and the rest come from those that have more."""
    queues = [[pairs[i] for i in rng.permutation(len(pairs))] for pairs in per_rule]
    out: list[tuple[int, tuple[int, int]]] = []
    while len(out) < n and any(queues):
        for k, queue in enumerate(queues):
            if queue and len(out) < n:
                out.append((k, queue.pop(0)))
    return out


def select_pairs(samples: Samples, n_pairs: int, seed: int = 0) -> pd.DataFrame:
    """Draw ``n_pairs`` pairs of each kind of :data:`AGREEMENT_KINDS`, seeded.

    The Trojan kinds come from ``samples`` (the Trojan pool), the random kind from the clean test
    images of ``samples.test``. Within a kind the pairs are disjoint, and no image (nor the clean
    original of a Trojan sample) is in two pairs of any kinds, so every pair's agreement is
    independent of the others and a standard error over pairs is honest.

    Random pairs and "same Trojan" pairs have different true classes: the paper draws ImageNet
    images, which share a class 1 time in 1000, while here 1 in 10 would. So each kind adds one
    likeness to the one before it (the Trojan, then the class). Both Trojan kinds come from the
    same rules, those whose samples have several classes (a source-conditional rule's samples
    all share its source class, so it cannot give a "same Trojan" pair), and the rules take
    turns giving pairs (first "same Trojan", then "same Trojan and class" from the images left):
    the two kinds then have the same mix of Trojans and differ only in the class.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`PAIR_COLUMNS`, ordered by kind and pair. Fewer than ``n_pairs`` of a kind
        (with a warning) when the pool does not hold enough.
    """
    if not isinstance(samples, Samples) or len(samples) == 0:
        raise ValueError(f"samples must be a non-empty Samples object, got {samples!r}")
    n_pairs = check_positive_int(n_pairs, "n_pairs")
    rng = np.random.default_rng(np.random.SeedSequence([_check_seed(seed), 0xA9EE]))
    table = samples.table
    labels = dict(zip(table["sample"].astype(int), table["clean_label"].astype(int), strict=True))
    by_rule = {r: [int(s) for s in part["sample"]] for r, part in table.groupby("rule_name")}
    mixed = [r for r in sorted(by_rule) if len({labels[s] for s in by_rule[r]}) > 1]
    used: set[int] = set()
    rows = []
    for kind, same in ((AGREEMENT_KINDS[1], False), (AGREEMENT_KINDS[2], True)):
        found = [_match([s for s in by_rule[r] if s not in used], labels, rng, same)
                 for r in mixed]
        for i, (k, (a, b)) in enumerate(_turns(found, n_pairs, rng)):
            used.update((a, b))
            rows.append((kind, i, "poisoned", a, labels[a], "poisoned", b, labels[b], mixed[k]))
    test = samples.test
    originals = set(table["test_index"].astype(int))
    clean = [int(i) for i in np.flatnonzero(test.rule.numpy() == -1) if int(i) not in originals]
    test_labels = dict(zip(clean, test.clean_labels[clean].tolist(), strict=True))
    for i, (a, b) in enumerate(_take(_match(clean, test_labels, rng, False), n_pairs, rng)):
        rows.append((AGREEMENT_KINDS[0], i, "test", a, test_labels[a], "test", b,
                     test_labels[b], ""))
    pairs = pd.DataFrame(rows, columns=list(PAIR_COLUMNS))
    pairs["kind"] = pd.Categorical(pairs["kind"], categories=AGREEMENT_KINDS, ordered=True)
    pairs = pairs.sort_values(["kind", "pair"], kind="stable").reset_index(drop=True)
    pairs["kind"] = pairs["kind"].astype(object)
    short = {k: int((pairs["kind"] == k).sum()) for k in AGREEMENT_KINDS}
    short = {k: c for k, c in short.items() if c < n_pairs}
    if short:
        warnings.warn(f"the pool of {len(samples)} samples gives fewer than {n_pairs} pairs of "
                      f"kind(s) {short}", UserWarning, stacklevel=2)
    return pairs


def agreement_pairs(cfg: Config, model: nn.Module, n_pairs: int, seed: int | None = None,
                    store: bool = True) -> tuple[pd.DataFrame, Samples]:
    """Pairs for Figure K.11 from the preset's Trojan evaluation samples and test scenes.

    The Trojan pool is :func:`spade_lib.samples.evaluation_samples` of ``cfg`` with ``samples``
    raised until :func:`select_pairs` finds ``n_pairs`` of each kind (it starts at
    ``max(cfg.samples, 4 * n_pairs)`` and doubles; a larger request selects a superset, so the
    evaluation samples are part of the pool) or the filter passes no more candidates. The pool is
    balanced over all rules, but only the rules whose samples have several classes give pairs
    (:func:`select_pairs`), so it is larger than the pairs need.

    Parameters
    ----------
    seed
        Seeds :func:`select_pairs` (default ``cfg.seed``).
    store
        Keep the pool's sample ids in ``cfg.cache_path("fidelity", "pairs", KEY + ".json")``
        (keyed by the data and trace settings, ``samples``, the model's weights, ``n_pairs`` and
        ``seed``), so that a rebuild does not run the filter again.

    Returns
    -------
    (pandas.DataFrame, Samples)
        The pairs (:func:`select_pairs`) and the pool their ``poisoned`` indices refer to.
    """
    from spade_lib import data

    n_pairs = check_positive_int(n_pairs, "n_pairs")
    seed = _check_seed(cfg.seed if seed is None else seed)
    path = cfg.cache_path("fidelity", "pairs", _hash({
        "what": "pairs", "version": _VERSION, "config": cfg.digest((*_TRACE_KEYS, "samples")),
        "model": model_fingerprint(model), "n_pairs": n_pairs, "seed": seed}) + ".json")
    if store and path.exists():
        _, test = data.load_scenes(cfg)
        poisoned = data.poisoned_test(test, cfg.rules, seed=cfg.seed)
        pool = Samples.from_ids(poisoned, test, json.loads(path.read_text())["pool"])
        return select_pairs(pool, n_pairs, seed), pool
    size = max(cfg.samples, 4 * n_pairs)
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            pool = evaluation_samples(cfg.replace(samples=size), model)
            counts = select_pairs(pool, n_pairs, seed)["kind"].value_counts()
        if all(counts.get(k, 0) >= n_pairs for k in AGREEMENT_KINDS) or len(pool) < size:
            break
        size *= 2
    if store:
        blob = json.dumps({"pool": pool.ids}).encode()
        atomic_write(path, lambda fh: fh.write(blob))
    return select_pairs(pool, n_pairs, seed), pool


# --------------------------------------------------------------------------------------------
# Mask agreement: the pairs
# --------------------------------------------------------------------------------------------

AGREEMENT_COLUMNS = ("kind", "pair", "rule_name", "label_a", "label_b",
                     *MASK_AGREEMENT_COLUMNS, "flagged", "dense_zeros")
"""Columns of :func:`mask_agreement_rows` (one row per pair and layer). ``flagged``: the layer is
off its target in either trace (kept weights by rounding, above target or empty; see
:attr:`spade_lib.trace.Trace.report`), which ``kept_a``/``kept_b`` and ``chance`` show.
``dense_zeros``: the layer's weights that are exactly zero in the dense model (see
:func:`trace_masks`)."""


def _image_seed(seed: int, source: str, index: int) -> int:
    """A Trojan sample's seed is the runner's (:func:`spade_lib.samples.sample_seed`); a clean
    test image gets its own stream."""
    if source == "poisoned":
        return sample_seed(seed, index)
    return int(np.random.SeedSequence([int(seed), int(index), 0xC1EA]).generate_state(1)[0])


def _masks_key(cfg: Config, model: nn.Module, sparsity: schedules.SparsitySpec,
               rules: Sequence[str]) -> str:
    return _hash({"what": "masks", "version": _VERSION, "config": cfg.digest(_TRACE_KEYS),
                  "model": model_fingerprint(model), "rules": list(rules),
                  "sparsity": schedules.resolve_sparsity(model, sparsity)})


def _save_masks(path: Any, masks: Mapping[str, Tensor], flagged: Mapping[str, bool]) -> None:
    arrays = {}
    for i, m in enumerate(masks.values()):
        arrays[f"bits{i}"] = np.packbits(m.numpy().ravel())
        arrays[f"shape{i}"] = np.asarray(m.shape, dtype=np.int64)
    arrays["names"] = np.asarray(list(masks), dtype=str)
    arrays["flagged"] = np.asarray([flagged[n] for n in masks], dtype=bool)
    atomic_write(path, lambda fh: np.savez(fh, **arrays))


def _load_masks(path: Any) -> tuple[dict[str, Tensor], dict[str, bool]]:
    with np.load(path) as f:
        names = [str(n) for n in f["names"]]
        masks, flagged = {}, {}
        for i, name in enumerate(names):
            shape = tuple(int(s) for s in f[f"shape{i}"])
            bits = np.unpackbits(f[f"bits{i}"], count=int(np.prod(shape))).astype(bool)
            masks[name] = torch.from_numpy(bits.reshape(shape))
            flagged[name] = bool(f["flagged"][i])
    return masks, flagged


def image_masks(cfg: Config, model: nn.Module, samples: Samples, source: str, index: int,
                sparsity: schedules.SparsitySpec = PAPER_MASK_SPARSITY,
                store: bool = True) -> tuple[dict[str, Tensor], dict[str, bool]]:
    """The SPADE masks (:func:`trace_masks`) of one image of a pair, cached.

    The image is traced with ``sparsity`` (default 0.99 on every layer of
    :func:`spade_lib.schedules.default_layers`), ``cfg.pruner``, ``cfg.n_augmentations``,
    ``cfg.augment`` and the image's own seed (a Trojan sample's is the runner's,
    :func:`spade_lib.samples.sample_seed`).

    Parameters
    ----------
    source, index
        ``"poisoned"`` and a sample id of ``samples.poisoned``, or ``"test"`` and an index of
        ``samples.test``.
    store
        Keep the masks (bit-packed) in ``cfg.cache_path("fidelity", "masks", KEY)``, keyed by the
        trace settings, the model's weights, the rules and the sparsity.

    Returns
    -------
    (dict, dict)
        ``{layer: bool mask}`` and ``{layer: flagged}`` (off its target, see
        :data:`AGREEMENT_COLUMNS`).
    """
    from spade_lib.results import TRACE_BATCH
    from spade_lib.trace import trace

    if source not in ("poisoned", "test"):
        raise ValueError(f"unknown source {source!r}; allowed: poisoned, test")
    images = samples.poisoned if source == "poisoned" else samples.test
    if not 0 <= int(index) < len(images):
        raise ValueError(f"{source} index {index} is outside [0, {len(images)})")
    path = None
    if store:
        key = _masks_key(cfg, model, sparsity, [r.name for r in samples.poisoned.rules])
        path = cfg.cache_path("fidelity", "masks", key, f"{source}-{int(index):07d}.npz")
        if path.exists():
            try:
                return _load_masks(path)
            except (OSError, ValueError, KeyError) as e:
                warnings.warn(f"mask file {str(path)!r} is damaged ({e}); tracing again",
                              UserWarning, stacklevel=2)
    with warnings.catch_warnings():
        # reported per layer in the rows (``flagged``, the kept counts and the chance line)
        warnings.simplefilter("ignore", pruning.SparsityTargetWarning)
        result = trace(model, images.float_images([int(index)])[0], sparsity=sparsity,
                       pruner=cfg.pruner, n_augmentations=cfg.n_augmentations,
                       recipe=cfg.augment, batch_size=TRACE_BATCH,
                       seed=_image_seed(cfg.seed, source, int(index)))
    masks = trace_masks(result)
    report = result.report.set_index("layer")
    flagged = {n: bool(report.loc[n, "empty"] or report.loc[n, "excess"] > 0
                       or report.loc[n, "spared"] > 0) for n in masks}
    if path is not None:
        _save_masks(path, masks, flagged)
    return masks, flagged


def mask_agreement_rows(cfg: Config, model: nn.Module, samples: Samples, pairs: pd.DataFrame,
                        sparsity: schedules.SparsitySpec = PAPER_MASK_SPARSITY, store: bool = True,
                        progress: bool = True) -> pd.DataFrame:
    """Figure K.11's numbers: :func:`mask_agreement` of every pair (each image traced once,
    :func:`image_masks`), with the dense model's zero weights per layer beside them.

    Parameters
    ----------
    samples, pairs
        The pool and its pairs (:func:`agreement_pairs`).
    sparsity
        The trace's sparsity (default 0.99 on every default layer, as in the paper).
    store, progress
        Cache each image's masks; show a progress bar over pairs.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`AGREEMENT_COLUMNS`, ordered as ``pairs``, then by layer.
    """
    _need(pairs, PAIR_COLUMNS, "select_pairs() or agreement_pairs()")
    dense = weight_masks(model, _pruned_layers(model, sparsity))
    zeros = {name: int((~m).sum()) for name, m in dense.items()}
    if store:
        key = _masks_key(cfg, model, sparsity, [r.name for r in samples.poisoned.rules])
        meta = _RowStore(cfg.cache_path("fidelity", "masks", key, "meta.json").parent)
        if meta.read_meta() is None:
            meta.write_meta({"key": key, "config": cfg.to_dict(), "model": model_fingerprint(model),
                             "sparsity": schedules.resolve_sparsity(model, sparsity),
                             "numerics": reproducibility.settings()})
    parts = []
    for pair in tqdm(pairs.itertuples(index=False), total=len(pairs), desc="pairs",
                     disable=not progress):
        ma, fa = image_masks(cfg, model, samples, pair.source_a, pair.index_a, sparsity, store)
        mb, fb = image_masks(cfg, model, samples, pair.source_b, pair.index_b, sparsity, store)
        part = mask_agreement(ma, mb)
        part["flagged"] = [fa[n] or fb[n] for n in part["layer"]]
        part["dense_zeros"] = [zeros[n] for n in part["layer"]]
        for col in ("kind", "pair", "rule_name", "label_a", "label_b"):
            part.insert(0, col, getattr(pair, col))
        parts.append(part)
    return pd.concat(parts, ignore_index=True)[list(AGREEMENT_COLUMNS)]


def agreement_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Figure K.11's bars: per kind and layer, the mean agreement over pairs with its standard
    deviation, standard error and counts, and the mean chance line and kept share.

    The last rows per kind (layer :data:`ALL_LAYERS`) average each pair's layers first. Columns:
    ``kind``, ``layer``, ``position``, ``mean``, ``std``, ``se``, ``n``, ``n_nan``, ``chance``,
    ``kept`` (mean of ``(kept_a + kept_b) / (2 weights)``), ``flagged`` (pairs with the layer off
    its target).
    """
    _need(rows, AGREEMENT_COLUMNS, "mask_agreement_rows()")
    rows = rows.assign(kept=(rows["kept_a"] + rows["kept_b"]) / (2 * rows["weights"]))
    out = []
    for (kind, layer, position), part in rows.groupby(["kind", "layer", "position"], sort=False):
        out.append({"kind": kind, "layer": layer, "position": position,
                    **_spread(part["agreement"]), "chance": float(part["chance"].mean()),
                    "kept": float(part["kept"].mean()), "flagged": int(part["flagged"].sum())})
    last = int(rows["position"].max()) + 1
    means = {c: _layer_means(rows, ["pair"], "kind", c) for c in ("agreement", "chance", "kept")}
    for kind, part in means["agreement"].groupby("kind", sort=False):
        pick = {c: m.loc[m["kind"] == kind, c] for c, m in means.items()}
        out.append({"kind": kind, "layer": ALL_LAYERS, "position": last,
                    **_spread(part["agreement"]), "chance": float(pick["chance"].mean()),
                    "kept": float(pick["kept"].mean()),
                    "flagged": int(rows.loc[rows["kind"] == kind].groupby("pair")["flagged"]
                                   .any().sum())})
    order = {k: i for i, k in enumerate(AGREEMENT_KINDS)}
    out = pd.DataFrame(out)
    rank = out["kind"].map(order).fillna(len(order))
    return out.assign(_rank=rank).sort_values(["_rank", "position"], kind="stable").drop(
        columns="_rank").reset_index(drop=True)


def agreement_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Figure K.11 as a table: per layer (in order, then :data:`ALL_LAYERS`), the mean agreement
    and its standard error for each kind, the chance line, the kept share and the pairs with the
    layer off its target, all from :func:`agreement_summary`.

    Columns are two-level: ``("mean", kind)`` and ``("se", kind)`` for each kind of
    :data:`AGREEMENT_KINDS` present, then ``("chance", "")``, ``("kept", "")``, ``("flagged", "")``
    (the chance line and kept share averaged over every pair, the flags summed).
    """
    summary = agreement_summary(rows)
    kinds = [k for k in AGREEMENT_KINDS if k in set(summary["kind"])]
    layers = list(dict.fromkeys(summary.sort_values("position", kind="stable")["layer"]))
    wide = summary.pivot(index="layer", columns="kind").reindex(layers)
    out = pd.concat({"mean": wide["mean"][kinds], "se": wide["se"][kinds]}, axis=1)
    n = summary.pivot(index="layer", columns="kind", values="n").reindex(layers)[kinds]
    for stat in ("chance", "kept"):
        out[(stat, "")] = (wide[stat][kinds] * n).sum(axis=1) / n.sum(axis=1)
    out[("flagged", "")] = wide["flagged"][kinds].sum(axis=1).astype(int)
    out.index.name = "layer"
    return out


def default_pairs(cfg: Config) -> int:
    """Pairs per kind for the preset: :data:`MIN_PAIRS`, or half the preset's ``samples`` where
    that is fewer (the ``smoke`` preset: 2), at least 2."""
    return max(2, min(MIN_PAIRS, cfg.samples // 2))


def agreement_verdicts(rows: pd.DataFrame,
                       paper: tuple[float, float] = PAPER_MASK_AGREEMENT) -> pd.DataFrame:
    """The paper's claims on mask agreement, each with a verdict at one standard error.

    * per kind: the agreement averaged over layers lies in ``paper`` (20-60%):
      :func:`spade_lib.tables.range_verdict` of the mean over pairs;
    * "highest for the most similar images": each kind above the one before it in
      :data:`AGREEMENT_KINDS`, and the most alike above the least (difference of the means;
      standard error ``sqrt(se_1^2 + se_2^2)``, the pairs being independent);
    * "highest in earlier layers": per pair, the mean over the first third of the layers minus
      the mean over the last third, averaged over every pair of every kind; it holds when that
      difference is positive beyond one standard error.

    Returns
    -------
    pandas.DataFrame
        ``claim``, ``value``, ``se``, ``n``, ``verdict``; ``attrs["sentence"]`` says it in one
        Markdown paragraph.
    """
    _need(rows, AGREEMENT_COLUMNS, "mask_agreement_rows()")
    low, high = paper
    means = _layer_means(rows, ["pair"], "kind", "agreement")
    kinds = [k for k in AGREEMENT_KINDS if k in set(means["kind"])]
    spread = {k: _spread(means.loc[means["kind"] == k, "agreement"]) for k in kinds}
    out = []
    for k in kinds:
        s = spread[k]
        out.append({"claim": f"{k}: agreement in [{low:.0%}, {high:.0%}]", "value": s["mean"],
                    "se": s["se"], "n": s["n"],
                    "verdict": range_verdict(s["mean"], s["se"], low, high)})
    steps = list(zip(kinds, kinds[1:], strict=False))
    if len(kinds) > 2:
        steps.append((kinds[0], kinds[-1]))
    for lo, hi in steps:
        a, b = spread[lo], spread[hi]
        delta, se = b["mean"] - a["mean"], math.sqrt(a["se"] ** 2 + b["se"] ** 2)
        out.append({"claim": f"{hi} above {lo}", "value": delta, "se": se,
                    "n": min(a["n"], b["n"]), "verdict": _above(delta, se)})
    positions = sorted(set(rows["position"]))
    third = max(1, len(positions) // 3)
    first, last = positions[:third], positions[-third:]

    def part_mean(pos: Sequence[int]) -> pd.Series:
        pick = rows[rows["position"].isin(pos)]
        return pick.groupby(["kind", "pair"])["agreement"].agg(lambda v: v.mean(skipna=False))

    s = _spread(part_mean(first) - part_mean(last))
    out.append({"claim": f"first {third} layers above last {third}", "value": s["mean"],
                "se": s["se"], "n": s["n"], "verdict": _above(s["mean"], s["se"])})
    table = pd.DataFrame(out, columns=["claim", "value", "se", "n", "verdict"])
    table.attrs["sentence"] = _agreement_sentence(table, paper)
    return table


def _agreement_sentence(table: pd.DataFrame, paper: tuple[float, float]) -> str:
    held = int((table["verdict"] == "holds").sum())
    failed = [c for c, v in zip(table["claim"], table["verdict"], strict=True) if v == "fails"]
    open_ = [c for c, v in zip(table["claim"], table["verdict"], strict=True)
             if v not in ("holds", "fails")]
    text = (f"The paper: masks of two inputs agree between {paper[0]:.0%} and {paper[1]:.0%}, "
            f"most in earlier layers and for the most similar images. Here **{held} of "
            f"{len(table)}** of these claims hold at one standard error")
    if failed:
        text += f"; **fails**: {'; '.join(failed)}"
    if open_:
        text += f"; inconclusive: {'; '.join(open_)}"
    return text + "."
