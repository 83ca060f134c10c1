"""SPADE traces: a copy of the network pruned for one input, with a per-layer report.

:func:`trace` augments the sample (:mod:`spade_lib.augment`), collects every chosen layer's input
Hessian from the DENSE network on the augmented batch (:mod:`spade_lib.hessians`), prunes each
layer to its target sparsity (:mod:`spade_lib.schedules`) with an OBS-family solver
(:mod:`spade_lib.pruning`) and returns the pruned copy. The caller's network is never changed.
:func:`trace_batch` does the same for many samples with batched solves; :func:`trace` is the
batched path for one sample. :func:`trace_images` takes the Hessians from a set of images instead
of augmented views of one (the "many samples" ablation of Table D.11).
"""

from __future__ import annotations

import copy
import functools
import numbers
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from spade_lib import hessians, pruning, schedules
from spade_lib.augment import (  # noqa: F401 (augment re-exported from here)
    RECIPES,
    augment,
    augmented_batches,
    check_recipe,
)
from spade_lib.checks import check_image, check_images  # noqa: F401 (trace.check_image)
from spade_lib.models import device_of

__all__ = ["REPORT_COLUMNS", "Trace", "trace", "trace_batch", "trace_images"]

Views = Callable[[], Iterator[Tensor]]
"""Makes the batches one sample's Hessians are taken on (augmented views, or plain images)."""


@dataclass
class Trace:
    """A network pruned for one sample.

    Attributes
    ----------
    model
        The pruned deep copy (eval mode); interpret the sample on it.
    report
        One row per pruned layer (:data:`REPORT_COLUMNS`): ``layer``, ``shape``, ``target`` and
        ``sparsity`` (achieved), ``rel_error`` (``||(W - W_hat) X||^2 / ||W X||^2`` on the
        augmented batch, from the Hessian), ``damp`` (relative damping used), ``seconds``
        (solver time), and the flags: ``excess`` (zero weights beyond the rounding of the target,
        e.g. inputs dead on every augmentation: the layer is above its target), ``spared``
        (weights kept because rounding may not empty a mask group) and ``empty`` (every weight
        zero). :func:`trace` warns (:class:`spade_lib.pruning.SparsityTargetWarning`) naming
        every layer with one of them.
    timings
        Seconds spent in ``augment``, ``hessians``, ``solve`` and ``total`` (per sample).
    """

    model: nn.Module
    report: pd.DataFrame
    timings: dict[str, float] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock:
    """Wall-clock seconds per phase, synchronising the device so GPU work is counted."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {"augment": 0.0, "hessians": 0.0, "solve": 0.0}

    def start(self) -> float:
        _sync(self.device)
        return time.perf_counter()

    def stop(self, phase: str, start: float) -> None:
        _sync(self.device)
        self.seconds[phase] += time.perf_counter() - start


def _timed(batches: Iterator[Tensor], clock: _Clock) -> Iterator[Tensor]:
    """``batches`` unchanged, the time spent making each one added to the clock's ``augment``."""
    while True:
        t = clock.start()
        try:
            batch = next(batches)
        except StopIteration:
            return
        clock.stop("augment", t)
        yield batch


def _dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter (what its inputs must have)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _plan(model: nn.Module, sparsity: schedules.SparsitySpec, pruner: str,
          layers: Sequence[str] | str | None, n_augmentations: int, recipe: str,
          batch_size: int, seed: int, options: dict[str, Any]) -> dict[str, float]:
    """Validate everything before work starts; returns the layers to prune and their targets."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if "augment" in options:
        raise ValueError("the augmentation recipe is passed as recipe=, not augment= (renamed; "
                         "the config key is still 'augment')")
    pruning.check_method(pruner, options)
    check_recipe(recipe)
    for name, value in (("n_augmentations", n_augmentations), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an int, got {seed!r}")
    chosen = None if layers is None else schedules.select_layers(model, layers)
    targets = schedules.resolve_sparsity(model, sparsity, chosen)
    return {name: s for name, s in targets.items() if s > 0}


REPORT_COLUMNS = ("layer", "shape", "target", "sparsity", "rel_error", "damp", "seconds",
                  "excess", "spared", "empty")
"""Columns of :attr:`Trace.report`."""


def _report(model: nn.Module, targets: dict[str, float],
            infos: dict[str, pruning.PruneInfo]) -> pd.DataFrame:
    modules = dict(model.named_modules())
    rows = [{"layer": name, "shape": tuple(modules[name].weight.shape), "target": targets[name],
             "sparsity": infos[name].sparsity, "rel_error": infos[name].rel_error,
             "damp": infos[name].damp, "seconds": infos[name].seconds,
             "excess": infos[name].excess, "spared": infos[name].spared,
             "empty": infos[name].empty} for name in targets]
    return pd.DataFrame(rows, columns=list(REPORT_COLUMNS))


def _flagged(report: pd.DataFrame) -> list[str]:
    """One phrase per flagged layer of a report: empty, above target, or kept by rounding."""
    out = []
    for row in report.itertuples(index=False):
        if row.empty:
            out.append(f"{row.layer} is empty (every weight zero; target {row.target:g})")
        elif row.excess > 0:
            out.append(f"{row.layer} is above its target {row.target:g} by {row.excess} "
                       f"weights beyond rounding (sparsity {row.sparsity:.4f}; dead inputs)")
        elif row.spared > 0:
            out.append(f"{row.layer} keeps {row.spared} weights that rounding would remove, so "
                       f"that no group is emptied (sparsity {row.sparsity:.4f}, target "
                       f"{row.target:g})")
    return out


def _warn_flagged(reports: Sequence[pd.DataFrame]) -> None:
    """One :class:`spade_lib.pruning.SparsityTargetWarning` naming the flagged layers."""
    flags = [(i, f) for i, report in enumerate(reports) for f in _flagged(report)]
    if not flags:
        return
    many = len(reports) > 1
    text = "; ".join(f"sample {i}: {f}" if many else f for i, f in flags)
    # stack: _warn_flagged, _traces, trace or trace_batch, torch.no_grad's wrapper, the caller
    warnings.warn(f"pruned layers off their target: {text}", pruning.SparsityTargetWarning,
                  stacklevel=5)


def _statistics(nets: Sequence[nn.Module], views: Sequence[Views], names: list[str],
                clock: _Clock) -> dict[str, list[Tensor]]:
    """Hessians of the layers ``names``: sample ``i`` on ``nets[i]``, batches from ``views[i]()``.

    Returns ``{name: [H_0, H_1, ...]}``, one ``[n, n]`` per sample. The time spent making views is
    counted under ``augment``, not ``hessians``.
    """
    stats: dict[str, list[Tensor]] = {name: [] for name in names}
    for net, make in zip(nets, views, strict=True):
        batches = _timed(make(), clock)
        before = clock.seconds["augment"]
        t = clock.start()
        for name, h in hessians.layer_hessians(net, batches, names).items():
            stats[name].append(h)
        clock.stop("hessians", t)
        clock.seconds["hessians"] -= clock.seconds["augment"] - before
    return stats


def _install(solved: dict[str, tuple[Tensor, list[pruning.PruneInfo]]],
             modules: Sequence[dict[str, nn.Module]],
             infos: Sequence[dict[str, pruning.PruneInfo]]) -> None:
    """Copy each sample's pruned weights into its copy of the model and keep the reports."""
    for name, (new, layer_infos) in solved.items():
        for i, named in enumerate(modules):
            named[name].weight.copy_(new[i])
            infos[i][name] = layer_infos[i]


def _traces(model: nn.Module, views: Sequence[Views], targets: dict[str, float], pruner: str,
            sequential: bool, progress: bool, options: dict[str, Any]) -> list[Trace]:
    """The batched path behind :func:`trace`, :func:`trace_batch` and :func:`trace_images`.

    ``views[i]()`` yields sample ``i``'s batches (on the model's device). Every sample's Hessians
    come from the dense copy in one pass (or, with ``sequential``, layer by layer from that
    sample's partially pruned copy); the layers are then solved for all samples at once with
    :func:`spade_lib.pruning.prune_layers` (FastOBC batches the layers of equal width too). One
    sample prunes the dense copy itself, which is exactly what a single trace does.
    """
    samples = len(views)
    clock = _Clock(device_of(model, default=None))
    begin = clock.start()
    dense = copy.deepcopy(model).eval()
    copies = [dense] if samples == 1 else [copy.deepcopy(dense) for _ in range(samples)]
    modules = [dict(c.named_modules()) for c in copies]
    dense_weights = {name: dict(dense.named_modules())[name].weight for name in targets}
    if not sequential and targets:
        stats = _statistics([dense] * samples, views, list(targets), clock)
    infos: list[dict[str, pruning.PruneInfo]] = [{} for _ in range(samples)]
    if sequential:
        for name in tqdm(targets, desc="pruning layers", disable=not progress):
            layer = torch.stack(_statistics(copies, views, [name], clock)[name])
            t = clock.start()
            solved = pruning.prune_layers({name: (dense_weights[name], layer, targets[name])},
                                          pruner, **options)
            _install(solved, modules, infos)
            clock.stop("solve", t)
    elif targets:
        layers = {name: (dense_weights[name], torch.stack(stats.pop(name)), targets[name])
                  for name in targets}
        t = clock.start()
        _install(pruning.prune_layers(layers, pruner, progress=progress, **options), modules,
                 infos)
        clock.stop("solve", t)
    clock.seconds["total"] = time.perf_counter() - begin
    per_sample = {k: v / samples for k, v in clock.seconds.items()}
    reports = [_report(copies[i], targets, infos[i]) for i in range(samples)]
    _warn_flagged(reports)
    return [Trace(copies[i], reports[i], dict(per_sample)) for i in range(samples)]


@torch.no_grad()
def trace(
    model: nn.Module,
    image: Tensor,
    sparsity: schedules.SparsitySpec = 0.9,
    pruner: str = "fastobc",
    n_augmentations: int = 1024,
    recipe: str = "default",
    batch_size: int = 256,
    seed: int = 0,
    layers: Sequence[str] | str | None = None,
    sequential: bool = False,
    progress: bool = False,
    **pruner_options: Any,
) -> Trace:
    """Prune a copy of ``model`` for ``image`` (SPADE); the caller's model is not changed.

    Parameters
    ----------
    model
        The dense classifier. Its parameters stay bit-identical and its train/eval flags are kept;
        statistics are taken from a copy in eval mode.
    image
        ``[3, H, W]`` or ``[1, 3, H, W]``, float in [0, 1], finite.
    sparsity
        A float, a dict of layer names, :func:`spade_lib.schedules.linear`,
        :func:`spade_lib.schedules.only` or a config string; see
        :func:`spade_lib.schedules.resolve_sparsity`. Layers whose target is 0 are left as they
        are.
    pruner
        A solver of :data:`spade_lib.pruning.SOLVERS`: ``"fastobc"``, ``"obc"`` or
        ``"magnitude"``.
    n_augmentations, recipe, batch_size, seed
        Size and recipe (:data:`spade_lib.augment.RECIPES`; the config key ``augment``) of the
        augmented batch, forward batch size, and the seed that makes the trace reproducible
        (the views are :func:`spade_lib.augment.augmented_batches` for ``seed``).
    layers
        Layer names or fnmatch patterns (default: :func:`spade_lib.schedules.default_layers`).
    sequential
        Recompute each layer's Hessian on the partially pruned copy (an ablation); by default all
        layers use the dense model's statistics, as in the paper.
    progress
        Show a progress bar over layers.
    **pruner_options
        Passed to :func:`spade_lib.pruning.prune_layer` (``damp``, ``mask_group``, ...).

    Returns
    -------
    Trace
        The pruned copy, its per-layer report and the timings.

    Warns
    -----
    spade_lib.pruning.SparsityTargetWarning
        Naming every layer that is empty, above its target beyond rounding (``excess``) or kept
        weights so that rounding does not empty a group (``spared``); see :attr:`Trace.report`.
    """
    targets = _plan(model, sparsity, pruner, layers, n_augmentations, recipe, batch_size, seed,
                    pruner_options)
    image = check_image(image, _dtype(model)).to(device_of(model, default=None))
    views = [functools.partial(augmented_batches, image, n_augmentations, recipe, seed, batch_size)]
    (out,) = _traces(model, views, targets, pruner, sequential, progress, pruner_options)
    return out


@torch.no_grad()
def trace_batch(
    model: nn.Module,
    images: Tensor,
    sparsity: schedules.SparsitySpec = 0.9,
    pruner: str = "fastobc",
    n_augmentations: int = 1024,
    recipe: str = "default",
    batch_size: int = 256,
    seed: int = 0,
    layers: Sequence[str] | str | None = None,
    progress: bool = False,
    **pruner_options: Any,
) -> list[Trace]:
    """:func:`trace` for several samples ``[S, 3, H, W]`` at once (independent layers).

    Each sample gets its own augmentations (seeded ``seed + i``, so sample ``i`` matches
    ``trace(model, images[i], seed=seed + i)`` up to float rounding) and its own Hessians; each
    layer is then solved for all samples together (batched Cholesky and column sweep), which
    raises throughput where the solver is bound by per-step overhead. Timings are per sample.
    """
    targets = _plan(model, sparsity, pruner, layers, n_augmentations, recipe, batch_size, seed,
                    pruner_options)
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[0] == 0:
        shape = list(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a [S, 3, H, W] tensor with S >= 1, got {shape}")
    for i, img in enumerate(images):
        try:
            check_image(img, _dtype(model))
        except ValueError as e:
            raise ValueError(f"images[{i}]: {e}") from None
    images = images.to(device_of(model, default=None))
    views = [functools.partial(augmented_batches, img, n_augmentations, recipe, seed + i,
                               batch_size) for i, img in enumerate(images)]
    return _traces(model, views, targets, pruner, False, progress, pruner_options)


@torch.no_grad()
def trace_images(
    model: nn.Module,
    images: Tensor,
    sparsity: schedules.SparsitySpec = 0.9,
    pruner: str = "fastobc",
    batch_size: int = 256,
    layers: Sequence[str] | str | None = None,
    progress: bool = False,
    **pruner_options: Any,
) -> Trace:
    """Prune a copy of ``model`` with Hessians from a set of images as they are (no augmentation).

    The "many samples" sources of Table D.11 (MST, MSC, MSD): the statistics come from ``images``
    instead of augmented views of one input; otherwise this is :func:`trace` (same solvers,
    schedules, report and warnings; ``timings["augment"]`` is the time spent batching).

    Parameters
    ----------
    model
        The dense classifier; never changed.
    images
        ``[N, 3, H, W]``, float in [0, 1], finite, N >= 1.
    sparsity, pruner, layers, progress, **pruner_options
        As in :func:`trace`.
    batch_size
        Images per forward pass (int >= 1).
    """
    targets = _plan(model, sparsity, pruner, layers, 1, "default", batch_size, 0, pruner_options)
    images = check_images(images, "images", channels=3, unit_range=True)
    images = images.to(device_of(model, default=None), _dtype(model) or images.dtype)
    views = [lambda: iter(images.split(batch_size))]
    (out,) = _traces(model, views, targets, pruner, False, progress, pruner_options)
    return out
