"""Fidelity of a network's explanations, measured on one image: gradient noise (Appendix E) and
mask agreement (Appendix K).

**Gradient noise** (Figure E.5). The paper adds Gaussian noise to a test image 100 times, takes the
gradient of the target logit for every noisy copy, and reports the mean cosine similarity between
every pair of gradients, per layer, for the dense model and for the SPADE trace.
:func:`gradient_noise` does this for one image and network: the copies (:func:`noisy_copies`) run
in batches, and forward hooks (:func:`recorded_outputs`) keep every named layer's output so that
one backward pass gives each copy's gradient with respect to the input and to those outputs.
:func:`mean_pairwise_cosine` averages the cosines.

**Mask agreement** (Figure K.11). SPADE prunes every layer to 0.99 for two inputs, and the
agreement of the two masks (which weights each keeps) is measured per layer.
:func:`trace_masks` gives a trace's masks (a kept weight is a nonzero weight of the pruned copy;
:func:`weight_masks` of any network), :func:`mask_agreement` compares two of them (overlap over
kept weights; the Dice coefficient, :math:`2|A \\cap B| / (|A| + |B|)`, which is ``overlap / k``
when both keep ``k`` weights), with the value that independent random masks would reach (the
chance line, the keep ratio).

The chapters' evaluations over many images, their tables and verdicts against the paper live in
:mod:`spade_lib.gradient_noise` (chapter E) and :mod:`spade_lib.mask_agreement` (chapter K).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from spade_lib.checks import check_image, check_noise, check_positive_int, check_seed
from spade_lib.hessians import eval_mode
from spade_lib.models import device_of
from spade_lib.trace import Trace

__all__ = [
    "GRADIENT_NOISE_COLUMNS", "INPUT", "MASK_AGREEMENT_COLUMNS", "PAPER_COPIES",
    "SMOOTHGRAD_NOISE", "gradient_noise", "mask_agreement", "mean_pairwise_cosine",
    "noisy_copies", "recorded_outputs", "trace_masks", "weight_masks",
]

PAPER_COPIES = 100
"""Appendix E: noisy copies per image."""


SMOOTHGRAD_NOISE = 0.1
"""Default noise level of :func:`gradient_noise`: the standard deviation as a fraction of the
input range (here [0, 1]). SmoothGrad (Smilkov et al., 2017, Section 4.2) finds 10-20% of
``x_max - x_min`` best; the low end keeps the copies close to the image being explained."""

INPUT = "input"
"""The name of the input's row in the gradient-noise tables (``position`` 0)."""

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


def noisy_copies(image: Tensor, n_copies: int, noise: float = SMOOTHGRAD_NOISE,
                 seed: int = 0) -> Tensor:
    """``n_copies`` copies of ``image`` ``[3, H, W]`` with Gaussian noise, ``[n, 3, H, W]``.

    Copy ``i`` is ``image + noise * eps_i`` with ``eps_i`` standard normal, drawn from a CPU
    generator seeded with ``seed`` (the same copies on every device), not clipped to [0, 1] (the
    SmoothGrad convention). ``noise`` is the standard deviation as a fraction of the input range
    [0, 1] (:data:`SMOOTHGRAD_NOISE`).
    """
    std, seed = check_noise(noise), check_seed(seed)
    n_copies = check_positive_int(n_copies, "n_copies")
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn((n_copies, *image.shape), generator=gen, dtype=torch.float32)
    return image.detach().cpu()[None] + eps.mul_(std).to(image.dtype)


GRADIENT_NOISE_COLUMNS = ("layer", "position", "size", "cosine", "n_copies", "n_degenerate",
                          "target_kept")
"""Columns of :func:`gradient_noise` (one row per layer)."""


def _copy_gradients(model: nn.Module, copies: Tensor, target: int, layers: list[str],
                    batch_size: int) -> tuple[dict[str, Tensor], int]:
    """Each copy's gradient of the ``target`` logit, ``{INPUT or layer: [n, size] float64}``, and
    the number of copies predicted as ``target``."""
    device = device_of(model)
    names = [INPUT, *layers]
    grads: dict[str, list[Tensor]] = {n: [] for n in names}
    hits = 0
    with eval_mode(model), torch.enable_grad(), recorded_outputs(model, layers) as outputs:
        for start in range(0, len(copies), batch_size):
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
    return {n: torch.cat(g) for n, g in grads.items()}, hits


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
    std, seed = check_noise(noise), check_seed(seed)
    if isinstance(target, bool) or not isinstance(target, numbers.Integral) or target < 0:
        raise ValueError(f"target must be a non-negative class index, got {target!r}")
    _named_modules(model, layers)
    copies = noisy_copies(image, n_copies, std, seed)
    grads, hits = _copy_gradients(model, copies, int(target), list(layers), batch_size)
    rows = []
    for position, name in enumerate(grads):
        stack = grads[name]
        cosine, degenerate = mean_pairwise_cosine(stack)
        rows.append({"layer": name, "position": position, "size": int(stack.shape[1]),
                     "cosine": cosine, "n_copies": n_copies, "n_degenerate": degenerate,
                     "target_kept": hits / n_copies})
    return pd.DataFrame(rows, columns=list(GRADIENT_NOISE_COLUMNS))


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
    :func:`spade_lib.mask_agreement.mask_agreement_rows` reports the dense model's zeros per layer
    beside it.
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


