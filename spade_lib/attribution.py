"""Saliency maps: the ten methods of the paper's Table A.1 behind one call.

:func:`attribute` looks a method up by name in a registry (:data:`METHODS`, :func:`get_method`),
runs it on a private copy of the network and returns an :class:`Attribution`: the map with the
input's shape ``[N, C, H, W]`` and its two channel aggregations ``[N, H, W]`` (signed sum and
absolute sum), which the Trojan scores in :mod:`spade_lib.metrics` compare.

Nine methods come from Captum; LRP comes from zennit with a box rule on the first layer, z-plus on
the other convolutions, epsilon on dense layers, BatchNorm merged into the preceding convolution and
every residual addition made an explicit module (:func:`lrp_canonizers`); the machinery lives in
:mod:`spade_lib.lrp`. LRP is refused on networks with other activations than ReLU, as in the paper.

Before any work, a method's check (:class:`Method`) refuses a network it cannot run on, found in one
forward pass of a private copy: activations applied as functions (DeepLift, the guided methods), an
activation module run twice (DeepLift), residual additions LRP cannot canonize. Methods whose map
should sum to a score change (DeepLift, IntegratedGradients, GradientShap in expectation, LRP with
``zero_bias=True``) record how far it misses and warn (:class:`CompletenessWarning`). Both live in
:mod:`spade_lib.preconditions`.

The caller's network is never changed: every method runs on a deep copy in eval mode, so hooks,
canonizers and ``requires_grad`` changes never reach the original. Seeded methods (Lime,
GradientShap) draw their randomness inside a forked RNG state, per sample, so a sample's map depends
on the seed only, not on the global RNG or on the other samples of the batch.

Choices (defaults; every one is an option of :func:`attribute`):

- Scores are logits. Saliency is the raw, signed gradient (``abs=False``): Captum's default
  absolute gradient would make the two aggregations identical, and the ``"abs"`` aggregation of
  the signed gradient is exactly Captum's default map.
- DeepLift and IntegratedGradients start from a black image; IntegratedGradients uses 50
  Gauss-Legendre steps.
- GuidedGradCam uses the output of the last convolutional stage (:func:`default_cam_layer`),
  upsampled by nearest neighbour (Captum's default), or any module named by ``layer=``.
- Lime: SLIC superpixels (``n_segments=50``, ``compactness=10``) from scikit-image, or a grid of
  about as many cells where SLIC returns fewer than a quarter of them (:func:`grid_segments`),
  200 samples, switched-off superpixels set to 0, Captum's Lasso (``alpha=0.01``) and similarity
  kernel.
- Occlusion: a black square of side ``max(2, side // 8)`` over all channels, stride half of it
  (4 and 2 at 32 px, 28 and 14 at 224 px). Occlusion and IntegratedGradients run about
  :data:`IMAGES_PER_PASS` images per forward pass (options ``perturbations_per_eval`` and
  ``internal_batch_size``), which bounds memory and does not change the result.
- GradientShap: references are a black image and 3 uniform-noise images, 25 samples, no input
  noise.
- LRP: see :func:`lrp_composite` and :func:`lrp_canonizers`. Biases keep their share of relevance
  (zennit's default), so the input relevance sums to the logit only when biases are zero or
  ``zero_bias=True``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from spade_lib.captum_methods import (  # noqa: F401 (public helpers, re-exported)
    IMAGES_PER_PASS,
    cam_layer_option,
    deeplift,
    default_cam_layer,
    gradient_shap,
    gradient_shap_baselines,
    grid_segments,
    guided_backprop,
    guided_grad_cam,
    ig_options,
    input_x_gradient,
    integrated_gradients,
    lime,
    occlusion,
    occlusion_options,
    occlusion_window,
    saliency,
    superpixels,
)
from spade_lib.checks import check_images
from spade_lib.lrp import (  # noqa: F401 (LRP's public names, re-exported)
    LRP_COMPLETENESS_RTOL,
    check_lrp_supported,
    lrp,
    lrp_canonizers,
    lrp_composite,
    lrp_relevance,
)
from spade_lib.metrics import AGGREGATIONS, aggregate
from spade_lib.models import device_of
from spade_lib.preconditions import (  # noqa: F401 (public names, re-exported)
    GRADIENT_SHAP_Z,
    IG_COMPLETENESS_RTOL,
    CompletenessWarning,
    deeplift_check,
    guided_check,
    private_copy,
    warn_incomplete,
)

__all__ = [
    "DESCRIPTIONS", "GROUPS", "GROUP_NAMES", "IMAGES_PER_PASS", "METHODS", "Attribution", "Method",
    "CompletenessWarning", "IG_COMPLETENESS_RTOL", "LRP_COMPLETENESS_RTOL", "attribute",
    "available", "check_lrp_supported", "default_cam_layer", "get_method",
    "gradient_shap_baselines", "grid_segments", "lrp_canonizers", "lrp_composite",
    "lrp_relevance", "methods_table", "occlusion_window", "register", "superpixels",
]

GROUP_NAMES = ("gradient", "perturbation", "mixed")

MethodFn = Callable[[nn.Module, Tensor, Tensor, Mapping[str, Any]], tuple[Tensor, dict[str, Any]]]
AutoFn = Callable[[nn.Module, Tensor, Mapping[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Method:
    """One registered saliency method.

    Attributes
    ----------
    name
        Registry key, as in Table A.1 (``"IntegratedGradients"``).
    group
        ``"gradient"``, ``"perturbation"`` or ``"mixed"``: the paper's grouping in Table A.1.
    description
        One sentence on what the method computes.
    library
        Where the implementation comes from (``"captum"`` or ``"zennit"``).
    defaults
        Every option the method accepts, with its default value.
    seeded
        Whether the method is random; it then takes a ``seed`` option.
    fn
        ``fn(model, images, targets, options) -> (map [N, C, H, W], info)``; ``options`` are the
        resolved ones (:meth:`resolve`), which it reads and never changes.
    check
        Optional test of the network, ``check(model, images)``, run before any work (raises
        ``ValueError``); ``images`` ``[N, C, H, W]`` (on the model's device) lets it run one
        forward pass on a private copy, ``None`` restricts it to the modules' types.
    auto
        Optional ``auto(model, images, options) -> options``: a new dict with the options whose
        value depends on the network or the images (default ``None``) filled in and checked,
        e.g. the Grad-CAM layer or the occlusion window.
    """

    name: str
    group: str
    description: str
    library: str
    defaults: Mapping[str, Any]
    seeded: bool
    fn: MethodFn
    check: Callable[[nn.Module, Tensor | None], None] | None = None
    auto: AutoFn | None = None

    def resolve(self, options: Mapping[str, Any], model: nn.Module | None = None,
                images: Tensor | None = None) -> dict[str, Any]:
        """Every option the method runs with, as a new dict (``options`` is not changed).

        The defaults updated with ``options``; given the network ``model`` and the images
        ``[N, C, H, W]``, also the automatic values (see ``auto``). An unknown option name, or a
        bad value found by ``auto``, is a ``ValueError``.
        """
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            allowed = ", ".join(sorted(self.defaults)) or "none"
            raise ValueError(f"{self.name} has no option {', '.join(map(repr, unknown))}; "
                             f"allowed: {allowed}")
        resolved = {**self.defaults, **options}
        if self.auto is not None and model is not None and images is not None:
            resolved = self.auto(model, images, resolved)
        return resolved


_REGISTRY: dict[str, Method] = {}


def register(name: str, group: str, description: str, library: str = "captum",
             seeded: bool = False,
             check: Callable[[nn.Module, Tensor | None], None] | None = None,
             auto: AutoFn | None = None, **defaults: Any) -> Callable[[MethodFn], MethodFn]:
    """Decorator that adds a method function to the registry under ``name``.

    Parameters
    ----------
    name, group, description, library, seeded, check, auto
        See :class:`Method`.
    **defaults
        The method's options and their defaults; ``seed=0`` is added for seeded methods.
    """
    if group not in GROUP_NAMES:
        raise ValueError(f"unknown group {group!r}; allowed: {', '.join(GROUP_NAMES)}")
    if seeded:
        defaults.setdefault("seed", 0)

    def wrap(fn: MethodFn) -> MethodFn:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        _REGISTRY[name] = Method(name, group, description, library, dict(defaults), seeded, fn,
                                 check, auto)
        return fn

    return wrap


def get_method(name: str) -> Method:
    """The registered method called ``name``; an unknown name lists the valid ones."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown attribution method {name!r}; valid: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def available() -> tuple[str, ...]:
    """Every registered method name: the paper's ten (:data:`METHODS`) and any added later."""
    return tuple(_REGISTRY)


def supported_methods(model: nn.Module, methods: Sequence[str] | None = None,
                      images: Tensor | None = None) -> list[str]:
    """The methods (default :data:`METHODS`) whose network check accepts ``model``.

    Without ``images`` only the module types are checked: LRP needs a network of plain ReLUs (the
    paper leaves it out for MobileNetV2 and ConvNeXt). With ``images`` ``[N, C, H, W]`` one
    forward pass also finds functional activations (refused by DeepLift and the guided methods),
    reused activation modules (DeepLift) and residual additions LRP cannot canonize.
    """
    names = list(METHODS if methods is None else methods)
    out = []
    for name in names:
        check = get_method(name).check
        if check is None:
            out.append(name)
            continue
        try:
            check(model, images)
        except ValueError:
            continue
        out.append(name)
    return out


def methods_table() -> pd.DataFrame:
    """Table A.1 as a data frame, in the paper's order: group, method, description, library,
    seeded, options (with defaults)."""
    names = [*METHODS, *(n for n in _REGISTRY if n not in METHODS)]
    rows = [{"group": m.group, "method": m.name, "description": m.description,
             "library": m.library, "seeded": m.seeded,
             "options": ", ".join(f"{k}={v!r}" for k, v in m.defaults.items())}
            for m in map(_REGISTRY.__getitem__, names)]
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------

@dataclass
class Attribution:
    """Saliency maps of a batch, with both channel aggregations.

    Attributes
    ----------
    map
        The attribution, shape of the input ``[N, C, H, W]``, on the network's device.
    method
        Registry name of the method.
    target
        The explained class per sample, ``[N]`` (int64).
    options
        Every option the method ran with (defaults filled in, automatic values resolved, e.g. the
        Grad-CAM layer or the occlusion window).
    info
        Method-specific by-products: LRP's ``output_relevance`` per sample (the target logits
        it started from), Lime's ``n_superpixels`` and ``segmentation`` (``"slic"`` or
        ``"grid"``) per sample, IntegratedGradients' ``convergence_delta``, the guided methods'
        ``guided_relus`` (number of ``nn.ReLU`` modules Captum modified; 0 on ReLU6/GELU
        networks, where the guided methods reduce to plain gradients), and
        ``completeness_gap`` and ``completeness_tolerance`` ``[N]`` of the methods whose map
        should sum to a score change (see :func:`attribute`).
    seconds
        Wall time of the call.
    """

    map: Tensor
    method: str
    target: Tensor
    options: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def aggregate(self, how: str = "sum") -> Tensor:
        """The 2-D maps ``[N, H, W]``: ``"sum"`` (signed channel sum) or ``"abs"``."""
        return aggregate(self.map, how)

    @property
    def sum2d(self) -> Tensor:
        """Signed sum over channels, ``[N, H, W]``."""
        return self.aggregate("sum")

    @property
    def abs2d(self) -> Tensor:
        """Sum of absolute values over channels, ``[N, H, W]``."""
        return self.aggregate("abs")

    def maps2d(self) -> dict[str, Tensor]:
        """Both aggregations, keyed by name (see :data:`spade_lib.metrics.AGGREGATIONS`)."""
        return {how: self.aggregate(how) for how in AGGREGATIONS}

    def __len__(self) -> int:
        return self.map.shape[0]


def _check_target(target: Any, n: int, num_classes: int, device: torch.device) -> Tensor:
    allowed = int | np.integer | Tensor | Sequence | np.ndarray
    if isinstance(target, bool | str) or not isinstance(target, allowed):
        raise ValueError(f"target must be an int or a sequence/tensor of {n} ints, got {target!r}")
    t = torch.as_tensor(target)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"target must hold integers, got dtype {t.dtype}")
    if t.dim() == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"target must be one int or {n} ints (one per image), got shape "
                         f"{tuple(t.shape)}")
    bad = t[(t < 0) | (t >= num_classes)]
    if bad.numel():
        raise ValueError(f"target {sorted(set(bad.tolist()))} out of range; the model has "
                         f"{num_classes} classes (0..{num_classes - 1})")
    return t.to(device=device, dtype=torch.long)


_CAPTUM_NOTICES = ("Setting .*hooks", "Input Tensor .* did not already require",
                   "You are providing multiple inputs for Lime")
"""Captum warnings that are expected here (hooks on activations, inputs without grad)."""


# --------------------------------------------------------------------------------------------
# The registry: Table A.1
# --------------------------------------------------------------------------------------------

register("Saliency", "gradient", "The gradient of the class score with respect to each input "
         "pixel: how much a small change of the pixel moves the score.", abs=False)(saliency)

register("InputXGradient", "gradient", "The gradient multiplied by the input: a first-order "
         "estimate of each pixel's contribution to the class score.")(input_x_gradient)

register("DeepLift", "gradient", "Compares each neuron's activation with its activation on a "
         "reference image (black here) and propagates the differences back to the pixels.",
         check=deeplift_check, baseline=0.0)(deeplift)

register("GuidedBackprop", "gradient", "Backpropagates only positive gradients through each "
         "ReLU, which removes much of the plain gradient's noise.",
         check=guided_check("GuidedBackprop"))(guided_backprop)

register("LRP", "gradient", "Layer-wise relevance propagation: the class score is redistributed "
         "layer by layer onto the inputs, each neuron passing its relevance to the neurons that "
         "contributed to it (box rule on the first layer, z-plus on convolutions, epsilon on "
         "dense layers).", library="zennit", check=check_lrp_supported,
         low=0.0, high=1.0, epsilon=1e-6, stabilizer=1e-6, zero_bias=False)(lrp)

register("GuidedGradCam", "perturbation", "Guided backpropagation multiplied by Grad-CAM, the "
         "class-gradient-weighted activation map of the last convolutional stage upsampled to the "
         "input.", check=guided_check("GuidedGradCam"), auto=cam_layer_option, layer=None,
         interpolate_mode="nearest")(guided_grad_cam)

register("Lime", "perturbation", "Switches random sets of superpixels off, fits a sparse linear "
         "model of the class score on which superpixels were kept, and reads each superpixel's "
         "importance from its weight.", seeded=True,
         n_samples=200, n_segments=50, compactness=10.0, baseline=0.0, alpha=0.01,
         perturbations_per_eval=64)(lime)

register("Occlusion", "mixed", "Slides a black square over the image and records how much the "
         "class score drops when each region is hidden.", auto=occlusion_options,
         window=None, stride=None, baseline=0.0, perturbations_per_eval=None)(occlusion)

register("IntegratedGradients", "mixed", "Averages gradients along the straight path from a "
         "black image to the input and multiplies by the difference, so the map sums to the "
         "change of the class score.", auto=ig_options,
         n_steps=50, baseline=0.0, method="gausslegendre",
         internal_batch_size=None)(integrated_gradients)

register("GradientShap", "mixed", "Expected gradients: gradients at random points between the "
         "input and random reference images, times the input-reference difference, averaged; an "
         "approximation of SHAP values.", seeded=True,
         n_samples=25, n_noise_baselines=3, stdevs=0.0)(gradient_shap)

# --------------------------------------------------------------------------------------------
# The call
# --------------------------------------------------------------------------------------------

METHODS: tuple[str, ...] = (
    "Saliency", "InputXGradient", "DeepLift", "LRP", "GuidedBackprop", "GuidedGradCam", "Lime",
    "Occlusion", "IntegratedGradients", "GradientShap",
)
"""The paper's ten method names in the order of Table A.1."""

GROUPS: dict[str, str] = {name: _REGISTRY[name].group for name in METHODS}
"""Method name -> ``"gradient"``, ``"perturbation"`` or ``"mixed"``, as grouped in Table A.1."""

DESCRIPTIONS: dict[str, str] = {name: _REGISTRY[name].description for name in METHODS}
"""Method name -> one sentence on what it computes."""


def attribute(model: nn.Module, images: Tensor, target: int | Sequence[int] | Tensor,
              method: str = "IntegratedGradients",
              spade: bool | Mapping[str, Any] | None = None, **options: Any) -> Attribution:
    """Saliency maps of ``model``'s class ``target`` on a batch of images.

    Parameters
    ----------
    model
        A classifier returning logits ``[N, K]``. It is never changed: the method runs on a deep
        copy in eval mode (BatchNorm uses running statistics; hooks and canonizers touch only the
        copy). Scores are the logits, not probabilities.
    images
        ``[N, C, H, W]`` float tensor (batch in dim 0), finite; moved to the model's device.
    target
        One class for all images, or one class per image (sequence or tensor of ``N`` ints).
    method
        A name in :data:`METHODS`; see :func:`methods_table` for each one's options.
    **options
        Method options, e.g. ``n_steps`` (IntegratedGradients), ``n_samples`` and ``seed`` (Lime,
        GradientShap), ``layer`` (GuidedGradCam), ``window``/``stride`` (Occlusion),
        ``abs`` (Saliency, default False: raw signed gradients, so the ``"abs"`` aggregation equals
        Captum's default absolute saliency and the ``"sum"`` one keeps the sign).
    spade
        Interpret through SPADE: ``True`` (defaults of :func:`spade_lib.trace.trace`) or a mapping
        of its options (``sparsity``, ``pruner``, ``n_augmentations``, ...). Each image gets its
        own pruned copy of ``model``; the maps are read as maps of the dense model's decision and
        ``info["traces"]`` holds the per-image layer reports. ``None``/``False``: dense.

    Returns
    -------
    Attribution
        ``.map`` ``[N, C, H, W]``; ``.sum2d`` and ``.abs2d`` ``[N, H, W]``.

    Raises
    ------
    ValueError
        Unknown method or option, bad images or target, or a network the method cannot run on,
        all before any work: LRP on a non-ReLU network or on residual additions it cannot
        canonize; DeepLift on activations applied as functions or on an activation module run
        twice; the guided methods on ReLUs applied as functions.

    Warns
    -----
    CompletenessWarning
        DeepLift, IntegratedGradients, GradientShap and LRP with ``zero_bias=True`` record in
        ``info["completeness_gap"]`` (``[N]``) how far each map's sum misses the score change it
        should add up to, relative to that change: ``(sum(map) - D) / |D|`` with ``D = f(x) -
        f(baseline)`` for the target logit ``f`` (GradientShap: its mean over the drawn
        references and noisy inputs; LRP: ``D = f(x)``). ``info["completeness_tolerance"]``
        (``[N]``) is float32 rounding (see :func:`spade_lib.preconditions.completeness`) plus the
        method's own error: none for DeepLift, :data:`IG_COMPLETENESS_RTOL` of ``|D|`` for
        IntegratedGradients, :data:`GRADIENT_SHAP_Z` standard errors of the mean for
        GradientShap, :data:`LRP_COMPLETENESS_RTOL` of ``|D|`` for LRP. A gap beyond it warns.
    """
    if spade:
        return _attribute_spade(model, images, target, method, spade, options)
    spec = get_method(method)
    spec.resolve(options)  # an unknown option fails first
    x = check_images(images)
    x = x.to(device_of(model, x.device))
    if spec.check is not None:
        spec.check(model, x[:1])
    start = time.perf_counter()
    work = private_copy(model)
    t = _logit_targets(work, x, target)
    opts = spec.resolve(options, work, x)
    with torch.enable_grad(), warnings.catch_warnings():
        for message in _CAPTUM_NOTICES:
            warnings.filterwarnings("ignore", message=message)
        attr, info = spec.fn(work, x, t, opts)
    if attr.shape != x.shape:
        raise RuntimeError(f"{spec.name} returned shape {tuple(attr.shape)}, expected "
                           f"{tuple(x.shape)}")
    warn_incomplete(spec.name, info)
    return Attribution(map=attr.detach(), method=spec.name, target=t, options=opts, info=info,
                       seconds=time.perf_counter() - start)


def _logit_targets(work: nn.Module, x: Tensor, target: Any) -> Tensor:
    """The checked targets ``[N]`` (int64, on ``x``'s device) of images ``x`` ``[N, C, H, W]``
    for a network ``work`` (a private copy) that must return logits ``[N, K]``."""
    with torch.no_grad():
        out = work(x[:1])
    if out.dim() != 2:
        raise ValueError(f"the model must return logits [N, K], got shape {tuple(out.shape)}")
    return _check_target(target, x.shape[0], out.shape[1], x.device)


def _attribute_spade(model: nn.Module, images: Tensor, target: int | Sequence[int] | Tensor,
                     method: str, spade: bool | Mapping[str, Any],
                     options: Mapping[str, Any]) -> Attribution:
    """SPADE: prune a copy of ``model`` for each image, then attribute on that copy.

    The method's check and the targets' check run on the dense ``model`` before any pruning
    (pruning keeps the network's structure). Per-image info entries are joined: tensors
    concatenated, lists extended, other values kept from the last image.
    """
    from spade_lib.trace import trace

    spec = get_method(method)
    spec.resolve(options)
    x = check_images(images)
    if spade is not True and not isinstance(spade, Mapping):
        raise TypeError(f"spade must be None, False, True or a mapping of trace options, got "
                        f"{spade!r}")
    kwargs = {} if spade is True else dict(spade)
    device = device_of(model, x.device)
    if spec.check is not None:
        spec.check(model, x[:1].to(device))
    targets = _logit_targets(private_copy(model), x.to(device), target)
    start = time.perf_counter()
    maps, reports, infos, last = [], [], [], None
    for i in range(x.shape[0]):
        tr = trace(model, x[i], **kwargs)
        last = attribute(tr.model, x[i:i + 1], int(targets[i]), method, **options)
        maps.append(last.map)
        reports.append(tr.report)
        infos.append(last.info)
    assert last is not None
    return Attribution(map=torch.cat(maps), method=last.method, target=targets.to(last.target),
                       options={**last.options, "spade": kwargs},
                       info={**_join_infos(infos), "traces": reports},
                       seconds=time.perf_counter() - start)


def _join_infos(infos: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One info from per-image ones: tensors concatenated (0-d ones stacked), lists extended,
    other values taken from the last."""
    out: dict[str, Any] = {}
    for key, value in infos[-1].items():
        values = [info[key] for info in infos]
        if isinstance(value, Tensor):
            out[key] = torch.cat([v.reshape(-1, *v.shape[1:]) for v in values])
        elif isinstance(value, list):
            out[key] = [item for v in values for item in v]
        else:
            out[key] = value
    return out
