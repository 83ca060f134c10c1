"""Saliency maps: the ten methods of the paper's Table A.1 behind one call.

:func:`attribute` looks a method up by name in a registry (:data:`METHODS`, :func:`get_method`),
runs it on a private copy of the network and returns an :class:`Attribution`: the map with the
input's shape ``[N, C, H, W]`` and its two channel aggregations ``[N, H, W]`` (signed sum and
absolute sum), which the Trojan scores in :mod:`spade_lib.metrics` compare.

Nine methods come from Captum; LRP comes from zennit with a box rule on the first layer, z-plus on
the other convolutions, epsilon on dense layers, BatchNorm merged into the preceding convolution and
every residual addition made an explicit module (:func:`lrp_canonizers`). LRP is refused on networks
with other activations than ReLU, as in the paper.

Before any work, a method's check (:class:`Method`) refuses a network it cannot run on, found in one
forward pass of a private copy: activations applied as functions (DeepLift, the guided methods), an
activation module run twice (DeepLift), residual additions LRP cannot canonize. Methods whose map
should sum to a score change (DeepLift, IntegratedGradients, GradientShap in expectation, LRP with
``zero_bias=True``) record how far it misses and warn (:class:`CompletenessWarning`).

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

import copy
import functools
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from spade_lib.metrics import AGGREGATIONS, aggregate

__all__ = [
    "DESCRIPTIONS", "GROUPS", "GROUP_NAMES", "IMAGES_PER_PASS", "METHODS", "Attribution", "Method",
    "CompletenessWarning", "attribute", "available", "check_lrp_supported", "default_cam_layer",
    "get_method", "gradient_shap_baselines", "grid_segments", "lrp_canonizers", "lrp_composite",
    "lrp_relevance", "methods_table", "occlusion_window", "register", "superpixels",
]

GROUP_NAMES = ("gradient", "perturbation", "mixed")

MethodFn = Callable[[nn.Module, Tensor, Tensor, dict[str, Any]], tuple[Tensor, dict[str, Any]]]


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
        ``fn(model, images, targets, options) -> (map [N, C, H, W], info)``.
    check
        Optional test of the network, ``check(model, images)``, run before any work (raises
        ``ValueError``); ``images`` ``[N, C, H, W]`` (on the model's device) lets it run one
        forward pass on a private copy, ``None`` restricts it to the modules' types.
    """

    name: str
    group: str
    description: str
    library: str
    defaults: Mapping[str, Any]
    seeded: bool
    fn: MethodFn
    check: Callable[[nn.Module, Tensor | None], None] | None = None

    def resolve(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The defaults updated with ``options``; an unknown option name is a ``ValueError``."""
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            allowed = ", ".join(sorted(self.defaults)) or "none"
            raise ValueError(f"{self.name} has no option {', '.join(map(repr, unknown))}; "
                             f"allowed: {allowed}")
        return {**self.defaults, **options}


_REGISTRY: dict[str, Method] = {}


def register(name: str, group: str, description: str, library: str = "captum",
             seeded: bool = False,
             check: Callable[[nn.Module, Tensor | None], None] | None = None,
             **defaults: Any) -> Callable[[MethodFn], MethodFn]:
    """Decorator that adds a method function to the registry under ``name``.

    Parameters
    ----------
    name, group, description, library, seeded, check
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
                                 check)
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


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def _device(model: nn.Module, fallback: torch.device) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return fallback


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch (CPU and the current CUDA device) and numpy; restore both afterwards.

    Captum's GradientShap draws from numpy's global RNG, Lime from torch's.
    """
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    else:
        cuda = []
    state = np.random.get_state()
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(state)


def _check_images(images: Any) -> Tensor:
    if not isinstance(images, Tensor):
        raise ValueError(f"images must be a torch.Tensor [N, C, H, W], got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images must have shape [N, C, H, W] (batch in dim 0; use image[None] "
                         f"for one image), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a float tensor, got {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf")
    return images.detach()


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


def _check_positive_int(options: Mapping[str, Any], *names: str) -> None:
    for name in names:
        value = options[name]
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"option {name} must be a positive int, got {value!r}")


_CAPTUM_NOTICES = ("Setting .*hooks", "Input Tensor .* did not already require",
                   "You are providing multiple inputs for Lime")
"""Captum warnings that are expected here (hooks on activations, inputs without grad)."""


# --------------------------------------------------------------------------------------------
# Preconditions: what one forward pass shows of the network
# --------------------------------------------------------------------------------------------

_ACTIVATION_FUNCTIONS = frozenset({
    "relu", "relu_", "relu6", "elu", "elu_", "selu", "selu_", "celu", "celu_", "leaky_relu",
    "leaky_relu_", "prelu", "rrelu", "rrelu_", "gelu", "silu", "mish", "sigmoid", "sigmoid_",
    "tanh", "tanh_", "softplus", "softsign", "hardtanh", "hardtanh_", "hardswish",
    "hardsigmoid", "logsigmoid", "threshold", "threshold_", "glu",
})
"""Names of the torch functions (``torch.relu``, ``F.relu``, ``Tensor.relu``, ...) that apply an
activation; called from a module other than the activation module a method handles, it is a
functional activation."""

_BRANCH_OPS = frozenset({"add", "add_", "__add__", "__radd__", "__iadd__",
                         "sub", "sub_", "__sub__", "__rsub__", "__isub__"})
"""Element-wise additions and subtractions: with two input-dependent operands, a merge of two
branches (a residual connection)."""


@dataclass
class _Census:
    """What one forward pass ran.

    Attributes
    ----------
    calls
        Module name -> number of times the module ran.
    activations
        ``(function, module name, module)`` of every activation function applied (see
        :data:`_ACTIVATION_FUNCTIONS`), with the innermost running module, which called it.
    additions
        Name of the module whose own forward added or subtracted two tensors that both depend
        on the input, once per such operation.
    """

    calls: dict[str, int] = field(default_factory=dict)
    activations: list[tuple[str, str, nn.Module | None]] = field(default_factory=list)
    additions: list[str] = field(default_factory=list)


class _Recorder(torch.overrides.TorchFunctionMode):
    """Records activation functions and branch merges with the innermost running module."""

    def __init__(self, census: _Census, stack: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.census, self.stack = census, stack

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        where, module = self.stack[-1] if self.stack else ("", None)
        if name in _ACTIVATION_FUNCTIONS:
            self.census.activations.append((name, where, module))
        elif name in _BRANCH_OPS and sum(isinstance(a, Tensor) and a.requires_grad
                                         for a in args[:2]) == 2:
            self.census.additions.append(where)
        return func(*args, **(kwargs or {}))


def _census(model: nn.Module, images: Tensor, canonizers: list[Any] | None = None) -> _Census:
    """Run a private copy of ``model`` once on ``images`` ``[N, C, H, W]`` and record what ran.

    In the pass only the input requires grad (the copy's parameters are frozen, also after the
    canonizers), so an addition of two tensors that both require it merges two branches computed
    from the input.
    ``canonizers`` (zennit's) are applied to the copy first. ``model`` is not changed.
    """
    from zennit.canonizers import CompositeCanonizer

    work = _private_copy(model)
    census, stack = _Census(), []

    def enter(name: str, module: nn.Module) -> None:
        census.calls[name] = census.calls.get(name, 0) + 1
        stack.append((name, module))

    def leave(module: nn.Module, inputs: Any, output: Any) -> None:
        stack.pop()

    handles = [h for name, module in work.named_modules() for h in (
        module.register_forward_pre_hook(lambda m, i, name=name: enter(name, m)),
        module.register_forward_hook(leave))]
    instances = CompositeCanonizer(canonizers).apply(work) if canonizers else []
    for p in work.parameters():  # zennit's merge gives bias-free layers a new, trainable bias
        p.requires_grad_(False)
    x = images.detach().to(_device(work, images.device)).requires_grad_(True).clone()
    try:
        with torch.enable_grad(), _Recorder(census, stack):
            work(x)
    finally:
        for handle in [*handles, *instances]:
            handle.remove()
    return census


def _where(name: str) -> str:
    return f"module {name!r}" if name else "the model's own forward"


def _refuse_functional(method: str, census: _Census,
                       handled: Callable[[str, nn.Module | None], bool], why: str,
                       allowed: str) -> None:
    """``ValueError`` naming the first activation function the method does not handle:
    ``handled(function, module)`` says whether ``module`` applying ``function`` is fine."""
    calls = [(f, w) for f, w, m in census.activations if not handled(f, m)]
    if calls:
        (function, where), n = calls[0], len(calls)
        raise ValueError(f"{method} cannot run on this model: it applies the activation function "
                         f"{function} outside an activation module ({n} such call(s), the first "
                         f"in {_where(where)}); {why}. Allowed: {allowed}.")


def _deeplift_check(model: nn.Module, images: Tensor | None) -> None:
    """DeepLift's check: every activation function runs inside a torch activation module (Captum's
    rescale rule reaches modules only), and no module Captum's DeepLift hooks runs twice in one
    pass (it keeps one input and output per module, and would fail only after the work).
    Activation modules it has no rule for (GELU, ReLU6) pass: their error shows in the
    completeness gap."""
    from captum.attr._core.deep_lift import SUPPORTED_NON_LINEAR

    if images is None:
        return
    census = _census(model, images)
    _refuse_functional("DeepLift", census,
                       lambda f, m: type(m).__module__ == "torch.nn.modules.activation",
                       "Captum's DeepLift applies its rule only to activation modules, so the "
                       "map would not sum to f(x) - f(baseline)",
                       "activations as modules (nn.ReLU(), ...) attributes of the model")
    modules = dict(model.named_modules())
    for name, count in census.calls.items():
        if count > 1 and type(modules[name]) in SUPPORTED_NON_LINEAR:
            raise ValueError(f"DeepLift cannot run on this model: {_where(name)} "
                             f"({type(modules[name]).__name__}) runs {count} times in one forward "
                             f"pass, and Captum's DeepLift keeps one input and output per "
                             f"activation module. Allowed: one activation module per use "
                             f"(spade_lib.models.make_attribution_safe rewires torchvision's "
                             f"ResNet blocks).")


def _guided_check(method: str) -> Callable[[nn.Module, Tensor | None], None]:
    """The guided methods' check: no ReLU applied outside an ``nn.ReLU`` module."""

    def check(model: nn.Module, images: Tensor | None) -> None:
        if images is not None:
            _refuse_functional(method, _census(model, images),
                               lambda f, m: f not in ("relu", "relu_") or isinstance(m, nn.ReLU),
                               "Captum guides only nn.ReLU modules, so that ReLU would pass "
                               "plain gradients", "ReLUs as nn.ReLU() attributes of the model")

    return check


# --------------------------------------------------------------------------------------------
# Completeness: a map that should sum to f(x) - f(baseline)
# --------------------------------------------------------------------------------------------

class CompletenessWarning(UserWarning):
    """A map's sum misses the score change it should add up to by more than the tolerance of its
    method (see :func:`attribute`, info ``completeness_gap``)."""


_UNIT_ROUNDOFF = 2.0 ** -24
"""Unit roundoff of float32."""

IG_COMPLETENESS_RTOL = 0.05
"""IntegratedGradients' tolerance on ``completeness_gap``: Sundararajan et al. (2017), "Axiomatic
Attribution for Deep Networks", choose the number of steps so that the attributions add up to
within 5% of the score change."""

LRP_COMPLETENESS_RTOL = 0.01
"""LRP's (``zero_bias=True``) tolerance on ``completeness_gap``: its rules conserve relevance up to
their stabilisers, except that z-plus passes nothing on from a neuron without positive input. That
loss has no bound known before the pass; on random ResNets with weights of both signs it stays well
under 1% (``test_lrp_conservation_on_general_weights``), while a layer the rules do not cover is
of order 1 (a missed residual addition doubles the relevance). 1% separates the two; it is a
choice, not a bound."""

GRADIENT_SHAP_Z = 5.0
"""GradientShap's tolerance on the mean of its per-sample completeness gaps, in standard errors of
that mean: with ``n_samples`` 25 a sound network exceeds it with probability about 4e-5 (Student's
t, 24 degrees of freedom; 4e-3 with 6 samples)."""


def _completeness(model: nn.Module, x: Tensor, t: Tensor, attr: Tensor, gap: Tensor,
                  allowance: Tensor, fx: Tensor | None = None) -> dict[str, Tensor]:
    """Completeness entries of a method's info, per image ``[N]``.

    Parameters
    ----------
    x, t, attr
        Images ``[N, C, H, W]``, targets ``[N]`` and the map ``[N, C, H, W]``.
    gap
        ``sum(map) - D`` per image ``[N]``, where ``D`` is the score change the map should sum
        to (``f(x) - f(baseline)`` for the target logit ``f``).
    allowance
        What the method may miss ``D`` by, absolute, ``[N]``.
    fx
        The target logits ``f(x)`` ``[N]`` if known; computed with ``model`` otherwise.

    Returns
    -------
    dict
        ``completeness_gap``: ``gap / |D|``; ``completeness_tolerance``: ``(allowance + r) /
        |D|``, where ``r = 2 (L + ceil(log2 n)) u (sum|map| + |f(x)| + |f(x) - D|)`` bounds
        float32 rounding (``u = 2**-24``; each of the ``L`` leaf modules rounds every term once
        forward and once backward, summing ``n = C H W`` values adds ``log2 n`` roundings).
    """
    if fx is None:
        with torch.no_grad():
            fx = model(x).gather(1, t[:, None])[:, 0]
    fx = fx.detach().double()
    gap, total = gap.detach().double(), attr.detach().double().flatten(1)
    change = total.sum(1) - gap
    depth = sum(1 for m in model.modules() if next(m.children(), None) is None)
    k = 2 * (depth + math.ceil(math.log2(total.shape[1])))
    rounding = k * _UNIT_ROUNDOFF * (total.abs().sum(1) + fx.abs() + (fx - change).abs())
    scale = change.abs()
    relative = torch.where(gap == 0, torch.zeros_like(gap), gap / scale)
    return {"completeness_gap": relative.to(x.dtype),
            "completeness_tolerance": ((allowance.double() + rounding) / scale).to(x.dtype)}


_COMPLETENESS_HINTS = {
    "DeepLift": "the network has operations Captum's DeepLift passes gradients through "
                "(activations other than ReLU, ELU, LeakyReLU, Sigmoid, Tanh, Softplus; norms; "
                "products of branches)",
    "IntegratedGradients": "raise n_steps (the quadrature error falls about as 1/n_steps)",
    "GradientShap": "the gradients do not integrate to the score (e.g. a detached or "
                    "non-differentiable operation in the forward pass), or raise n_samples",
    "LRP": "relevance is created or lost on its way; look for residual additions or layers "
           "without an LRP rule",
}


def _warn_incomplete(method: str, info: Mapping[str, Any]) -> None:
    """Warn (:class:`CompletenessWarning`) if an image's gap exceeds its tolerance.

    The message is the same for every call of a method (the numbers are in ``info``), so the
    default warning filter shows it once per call site, not once per image of a loop.
    """
    if "completeness_gap" not in info:
        return
    if not (info["completeness_gap"].abs() <= info["completeness_tolerance"]).all():
        warnings.warn(f"{method}: a map misses the score change it should sum to by more than its "
                      f"tolerance (see info['completeness_gap'] and "
                      f"info['completeness_tolerance']); {_COMPLETENESS_HINTS.get(method, '')}",
                      CompletenessWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------
# Gradient methods
# --------------------------------------------------------------------------------------------

@register("Saliency", "gradient", "The gradient of the class score with respect to each input "
          "pixel: how much a small change of the pixel moves the score.", abs=False)
def _saliency(model: nn.Module, x: Tensor, t: Tensor, o: dict[str, Any]) -> tuple[Tensor, dict]:
    from captum.attr import Saliency

    return Saliency(model).attribute(x, target=t, abs=bool(o["abs"])), {}


@register("InputXGradient", "gradient", "The gradient multiplied by the input: a first-order "
          "estimate of each pixel's contribution to the class score.")
def _input_x_gradient(model: nn.Module, x: Tensor, t: Tensor,
                      o: dict[str, Any]) -> tuple[Tensor, dict]:
    from captum.attr import InputXGradient

    return InputXGradient(model).attribute(x, target=t), {}


@register("DeepLift", "gradient", "Compares each neuron's activation with its activation on a "
          "reference image (black here) and propagates the differences back to the pixels.",
          check=_deeplift_check, baseline=0.0)
def _deeplift(model: nn.Module, x: Tensor, t: Tensor, o: dict[str, Any]) -> tuple[Tensor, dict]:
    from captum.attr import DeepLift

    attr, delta = DeepLift(model).attribute(x, target=t, baselines=float(o["baseline"]),
                                            return_convergence_delta=True)
    return attr, _completeness(model, x, t, attr, delta, torch.zeros_like(delta))


def _relu_count(model: nn.Module) -> int:
    """How many ``nn.ReLU`` modules Captum's guided methods modify (0: plain gradients)."""
    return sum(isinstance(m, nn.ReLU) for m in model.modules())


@register("GuidedBackprop", "gradient", "Backpropagates only positive gradients through each "
          "ReLU, which removes much of the plain gradient's noise.",
          check=_guided_check("GuidedBackprop"))
def _guided_backprop(model: nn.Module, x: Tensor, t: Tensor,
                     o: dict[str, Any]) -> tuple[Tensor, dict]:
    from captum.attr import GuidedBackprop

    return GuidedBackprop(model).attribute(x, target=t), {"guided_relus": _relu_count(model)}


# LRP --------------------------------------------------------------------------------------------

_LRP_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def check_lrp_supported(model: nn.Module, images: Tensor | None = None) -> None:
    """Raise ``ValueError`` unless LRP's rules cover ``model``.

    Every activation must be an ``nn.ReLU``: the z-plus rule assumes non-negative activations
    from ReLUs, and layer or group norms have no LRP rule here; the paper runs LRP only on its
    ResNet. With ``images`` ``[N, C, H, W]``, one forward pass of a canonized private copy also
    finds additions of two branches left in a module's forward (residual blocks of other kinds
    than those in :func:`lrp_canonizers`): each would hand its full relevance to both branches,
    doubling it, so the module is named in the error.
    """
    from zennit.types import Activation

    bad = sorted({type(m).__name__ for m in model.modules()
                  if (isinstance(m, Activation) and type(m) is not nn.ReLU)
                  or isinstance(m, _LRP_NORMS)})
    if bad:
        raise ValueError(f"LRP needs a ReLU network with BatchNorm only (the paper excludes LRP "
                         f"elsewhere); this model has {', '.join(bad)}. Use another method.")
    if images is None:
        return
    additions = _census(model, images, lrp_canonizers()).additions
    if additions:
        module = dict(model.named_modules())[additions[0]]
        raise ValueError(
            f"LRP cannot run on this model: {_where(additions[0])} ({type(module).__name__}) adds "
            f"two branches computed from the input ({len(additions)} such addition(s) in the "
            f"model), which lrp_canonizers() does not turn into a Sum module, so its relevance "
            f"would go in full to both branches. Allowed residual blocks: "
            f"spade_lib.models.BasicBlock, torchvision's BasicBlock and Bottleneck; or use "
            f"another method.")


def _basic_block_forward(self: nn.Module, x: Tensor) -> Tensor:
    out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
    out = self.canonizer_sum(torch.stack([self.shortcut(x), out], dim=-1))
    return self.relu2(out)


def _safe_tv_basic_block_forward(self: nn.Module, x: Tensor) -> Tensor:
    identity = x if self.downsample is None else self.downsample(x)
    out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
    return self.relu2(self.canonizer_sum(torch.stack([identity, out], dim=-1)))


def _safe_bottleneck_forward(self: nn.Module, x: Tensor) -> Tensor:
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu1(self.bn1(self.conv1(x)))
    out = self.relu2(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu3(self.canonizer_sum(torch.stack([identity, out], dim=-1)))


@functools.cache
def _exact_merge_batch_norm() -> type:
    """zennit's ``SequentialMergeBatchNorm`` whose merged BatchNorm is an identity for any eps.

    zennit leaves the BatchNorm with mean 0, variance 1, weight 1 and bias 0, which computes
    ``x / sqrt(1 + eps)``: each merged BatchNorm scales its output by about ``1 - eps / 2``
    (4.7% at eps 0.1; a ResNet-20's logits end up 9% off). Here the weight becomes
    ``sqrt(1 + eps)``, so the BatchNorm computes ``x`` up to float rounding, for any eps (a
    variance of ``1 - eps`` would need eps < 1). zennit's ``remove`` restores every parameter.
    """
    from zennit.canonizers import SequentialMergeBatchNorm

    class ExactMergeBatchNorm(SequentialMergeBatchNorm):
        @staticmethod
        def merge_batch_norm(modules: list[nn.Module], batch_norm: nn.Module) -> None:
            SequentialMergeBatchNorm.merge_batch_norm(modules, batch_norm)
            batch_norm.weight.data = torch.full_like(batch_norm.weight.data,
                                                     math.sqrt(1.0 + batch_norm.eps))

    return ExactMergeBatchNorm


def lrp_canonizers() -> list[Any]:
    """The canonizers LRP runs with, in order.

    1. ``SequentialMergeBatchNorm``: every BatchNorm that directly follows a convolution is merged
       into it (the BatchNorm becomes the identity, see :func:`_exact_merge_batch_norm`). This
       relies on modules being registered in forward order, which holds for every network in
       :mod:`spade_lib.models`.
    2. A residual canonizer: the blocks' ``out + shortcut`` becomes a ``zennit.layer.Sum`` module
       over the stacked pair, which gets the proportional (``Norm``) rule, so the relevance of a
       block's output is split between the two branches in proportion to their values. It covers
       :class:`spade_lib.models.BasicBlock`, torchvision's ``BasicBlock`` and ``Bottleneck``
       (including the forms with one ReLU per use made by
       :func:`spade_lib.models.make_attribution_safe`).

    All changes are undone when the zennit composite is removed.
    """
    from zennit.canonizers import AttributeCanonizer
    from zennit.layer import Sum
    from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer

    from spade_lib.models import BasicBlock

    tv = torchvision.models.resnet

    def attribute_map(name: str, module: nn.Module) -> dict[str, Any] | None:
        if isinstance(module, BasicBlock):
            forward = _basic_block_forward
        elif isinstance(module, tv.Bottleneck) and hasattr(module, "relu1"):
            forward = _safe_bottleneck_forward
        elif isinstance(module, tv.Bottleneck):
            forward = ResNetBottleneckCanonizer.forward
        elif isinstance(module, tv.BasicBlock) and hasattr(module, "relu1"):
            forward = _safe_tv_basic_block_forward
        elif isinstance(module, tv.BasicBlock):
            forward = ResNetBasicBlockCanonizer.forward
        else:
            return None
        return {"forward": forward.__get__(module), "canonizer_sum": Sum()}

    return [_exact_merge_batch_norm()(), AttributeCanonizer(attribute_map)]


def lrp_composite(low: float = 0.0, high: float = 1.0, epsilon: float = 1e-6,
                  stabilizer: float = 1e-6, zero_bias: bool = False,
                  canonizers: list[Any] | None = None) -> Any:
    """The zennit composite LRP runs with.

    Box rule (z^B, ``ZBox(low, high)``) on the first convolution, z-plus (``ZPlus``) on every other
    convolution, epsilon (``Epsilon``) on dense layers, the proportional ``Norm`` rule on average
    pooling and on the residual sums, and activations and (merged) BatchNorms passed through.

    Parameters
    ----------
    low, high
        The input box of the first layer: the range of pixel values (0 and 1 here).
    epsilon
        Stabiliser of the epsilon rule.
    stabilizer
        Stabiliser of the other rules' denominators.
    zero_bias
        Leave biases out of every rule. By default (zennit's) a bias takes its share of the
        relevance, so the input relevance falls short of the logit by what the biases absorbed.
    canonizers
        Default :func:`lrp_canonizers`.
    """
    from zennit.composites import SpecialFirstLayerMapComposite, layer_map_base
    from zennit.rules import Epsilon, ZBox, ZPlus
    from zennit.types import Convolution

    if not low < high:
        raise ValueError(f"LRP needs low < high for the box rule, got {low}, {high}")
    zero = ["bias"] if zero_bias else None
    stab = float(stabilizer)
    return SpecialFirstLayerMapComposite(
        layer_map=layer_map_base(stab) + [
            (Convolution, ZPlus(stabilizer=stab, zero_params=zero)),
            (nn.Linear, Epsilon(epsilon=float(epsilon), zero_params=zero)),
        ],
        first_map=[(Convolution, ZBox(low=float(low), high=float(high), stabilizer=stab,
                                      zero_params=zero))],
        canonizers=lrp_canonizers() if canonizers is None else canonizers,
    )


def lrp_relevance(model: nn.Module, x: Tensor, t: Tensor, composite: Any) -> tuple[Tensor, Tensor]:
    """Input relevance ``[N, C, H, W]`` and output relevance ``[N]`` (the target logits).

    Starts from the one-hot target logit and propagates it with ``composite``; the hooks and
    canonizers live only inside this call. ``model`` is changed while it runs: pass a copy.
    """
    from zennit.attribution import Gradient

    start: dict[str, Tensor] = {}

    def output_relevance(out: Tensor) -> Tensor:
        rel = out * F.one_hot(t, out.shape[1]).to(out)
        start["relevance"] = rel.sum(1)
        return rel

    with Gradient(model=model, composite=composite) as attributor:
        _, relevance = attributor(x, output_relevance)
    return relevance, start["relevance"].detach()


@register("LRP", "gradient", "Layer-wise relevance propagation: the class score is redistributed "
          "layer by layer onto the inputs, each neuron passing its relevance to the neurons that "
          "contributed to it (box rule on the first layer, z-plus on convolutions, epsilon on "
          "dense layers).", library="zennit", check=check_lrp_supported,
          low=0.0, high=1.0, epsilon=1e-6, stabilizer=1e-6, zero_bias=False)
def _lrp(model: nn.Module, x: Tensor, t: Tensor, o: dict[str, Any]) -> tuple[Tensor, dict]:
    composite = lrp_composite(o["low"], o["high"], o["epsilon"], o["stabilizer"],
                              bool(o["zero_bias"]))
    relevance, start = lrp_relevance(model, x, t, composite)
    info = {"output_relevance": start}
    if o["zero_bias"]:
        gap = relevance.detach().flatten(1).sum(1) - start
        info.update(_completeness(model, x, t, relevance, gap,
                                  LRP_COMPLETENESS_RTOL * start.abs(), fx=start))
    return relevance, info


# --------------------------------------------------------------------------------------------
# Perturbation methods (the paper's grouping)
# --------------------------------------------------------------------------------------------

_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)


def default_cam_layer(model: nn.Module, images: Tensor) -> str:
    """Name of the module whose output is the last convolutional feature map.

    It is the last module to finish, in one forward pass, whose output is a 4-D map with more
    than one spatial position (pooling layers excluded); of nested modules that return the same
    map it is the outermost: ``layers`` for :class:`spade_lib.models.ResNet` (the output of the
    last stage), ``head`` for MobileNetV2Small, ``stages`` for ConvNeXtSmall, ``layer4`` or
    ``features`` for torchvision networks.
    """
    finished: list[tuple[str, Any]] = []
    handles = []
    for name, module in model.named_modules():
        if name and not isinstance(module, _POOLS):
            handles.append(module.register_forward_hook(
                lambda m, i, out, name=name: finished.append((name, out))))
    try:
        with torch.no_grad():
            model(images[:1])
    finally:
        for handle in handles:
            handle.remove()
    maps = [name for name, out in finished
            if isinstance(out, Tensor) and out.dim() == 4 and out.shape[-1] * out.shape[-2] > 1]
    if not maps:
        raise ValueError("found no module with a 4-D spatial output for Grad-CAM; pass layer=NAME")
    return maps[-1]


@register("GuidedGradCam", "perturbation", "Guided backpropagation multiplied by Grad-CAM, the "
          "class-gradient-weighted activation map of the last convolutional stage upsampled to the "
          "input.", check=_guided_check("GuidedGradCam"), layer=None, interpolate_mode="nearest")
def _guided_grad_cam(model: nn.Module, x: Tensor, t: Tensor,
                     o: dict[str, Any]) -> tuple[Tensor, dict]:
    from captum.attr import GuidedGradCam

    name = o["layer"]
    if name is None:
        name = default_cam_layer(model, x)
    modules = dict(model.named_modules())
    if not isinstance(name, str) or name not in modules or not name:
        tops = ", ".join(n for n, _ in model.named_children())
        raise ValueError(f"GuidedGradCam: no submodule named {name!r}; use a dotted module name, "
                         f"e.g. one of the top-level modules {tops}")
    if o["interpolate_mode"] not in ("nearest", "bilinear", "bicubic", "area"):
        raise ValueError(f"GuidedGradCam: interpolate_mode must be nearest, bilinear, bicubic or "
                         f"area, got {o['interpolate_mode']!r}")
    o["layer"] = name
    attr = GuidedGradCam(model, modules[name]).attribute(
        x, target=t, interpolate_mode=o["interpolate_mode"])
    return attr, {"guided_relus": _relu_count(model)}


def superpixels(image: Tensor, n_segments: int, compactness: float) -> Tensor:
    """SLIC superpixel labels ``[H, W]`` (int64, from 0) of one image ``[C, H, W]`` in [0, 1].

    Three-channel images are segmented in Lab space (scikit-image's default); SLIC is
    deterministic.
    """
    from skimage.segmentation import slic

    array = image.detach().permute(1, 2, 0).double().cpu().numpy()
    labels = slic(array, n_segments=n_segments, compactness=compactness, start_label=0,
                  channel_axis=-1, convert2lab=array.shape[-1] == 3)
    return torch.as_tensor(labels, dtype=torch.long)


def grid_segments(height: int, width: int, n_segments: int) -> Tensor:
    """Labels ``[H, W]`` (int64, from 0) of a grid of about ``n_segments`` near-square cells.

    ``rows = round(sqrt(n H / W))`` and ``cols = round(n / rows)``, each clipped to
    ``[1, side]``; cell ``(r, c)`` has label ``r * cols + c``.
    """
    rows = min(height, max(1, round(math.sqrt(n_segments * height / width))))
    cols = min(width, max(1, round(n_segments / rows)))
    r = torch.arange(height) * rows // height
    c = torch.arange(width) * cols // width
    return r[:, None] * cols + c[None, :]


def _lime_segments(image: Tensor, n_segments: int, compactness: float) -> tuple[Tensor, str]:
    """Lime's features of one image ``[C, H, W]``: SLIC superpixels, or a grid where SLIC
    collapses.

    SLIC seeds a grid of about ``n_segments`` cells; on images with structure it returns about
    half to one and a half times that many superpixels. Fewer than a quarter (at least 2) means its
    clusters merged (noise at a few pixels per cell returns a single superpixel, and Lime's map is
    then flat): :func:`grid_segments` is used instead. Returns the labels ``[H, W]`` and ``"slic"``
    or ``"grid"``.
    """
    labels = superpixels(image, n_segments, compactness)
    if int(labels.max()) + 1 >= max(2, math.ceil(n_segments / 4)):
        return labels, "slic"
    return grid_segments(image.shape[1], image.shape[2], n_segments), "grid"


@register("Lime", "perturbation", "Switches random sets of superpixels off, fits a sparse linear "
          "model of the class score on which superpixels were kept, and reads each superpixel's "
          "importance from its weight.", seeded=True,
          n_samples=200, n_segments=50, compactness=10.0, baseline=0.0, alpha=0.01,
          perturbations_per_eval=64)
def _lime(model: nn.Module, x: Tensor, t: Tensor, o: dict[str, Any]) -> tuple[Tensor, dict]:
    from captum._utils.models.linear_model import SkLearnLasso
    from captum.attr import Lime

    _check_positive_int(o, "n_samples", "n_segments", "perturbations_per_eval")
    if not isinstance(o["alpha"], int | float) or o["alpha"] < 0:
        raise ValueError(f"option alpha (the Lasso penalty) must be a number >= 0, got "
                         f"{o['alpha']!r}")
    lime = Lime(model, interpretable_model=SkLearnLasso(alpha=float(o["alpha"])))
    maps, counts, kinds = [], [], []
    for i in range(x.shape[0]):
        labels, kind = _lime_segments(x[i], int(o["n_segments"]), float(o["compactness"]))
        labels = labels.to(x.device)
        counts.append(int(labels.max()) + 1)
        kinds.append(kind)
        mask = labels[None, None].expand(1, x.shape[1], -1, -1)
        with _seeded(int(o["seed"]), x.device):
            maps.append(lime.attribute(
                x[i:i + 1], target=int(t[i]), feature_mask=mask, baselines=float(o["baseline"]),
                n_samples=int(o["n_samples"]),
                perturbations_per_eval=int(o["perturbations_per_eval"])))
    return torch.cat(maps), {"n_superpixels": counts, "segmentation": kinds}


# --------------------------------------------------------------------------------------------
# Mixed methods (the paper's grouping)
# --------------------------------------------------------------------------------------------

IMAGES_PER_PASS = 128
"""Default number of images per forward pass of Occlusion and IntegratedGradients (memory cap)."""


def occlusion_window(height: int, width: int) -> tuple[int, int]:
    """Default occlusion ``(window, stride)`` for an image: ``max(2, side // 8)`` and half that."""
    window = max(2, min(height, width) // 8)
    return window, max(1, window // 2)


@register("Occlusion", "mixed", "Slides a black square over the image and records how much the "
          "class score drops when each region is hidden.",
          window=None, stride=None, baseline=0.0, perturbations_per_eval=None)
def _occlusion(model: nn.Module, x: Tensor, t: Tensor, o: dict[str, Any]) -> tuple[Tensor, dict]:
    from captum.attr import Occlusion

    window, stride = occlusion_window(x.shape[2], x.shape[3])
    o["window"] = window if o["window"] is None else o["window"]
    o["stride"] = stride if o["stride"] is None else o["stride"]
    if o["perturbations_per_eval"] is None:
        o["perturbations_per_eval"] = max(1, IMAGES_PER_PASS // x.shape[0])
    _check_positive_int(o, "window", "stride", "perturbations_per_eval")
    if o["window"] > min(x.shape[2:]):
        raise ValueError(f"Occlusion window {o['window']} is larger than the image "
                         f"{tuple(x.shape[2:])}")
    c = x.shape[1]
    attr = Occlusion(model).attribute(
        x, target=t, sliding_window_shapes=(c, o["window"], o["window"]),
        strides=(c, o["stride"], o["stride"]), baselines=float(o["baseline"]),
        perturbations_per_eval=int(o["perturbations_per_eval"]))
    return attr, {}


@register("IntegratedGradients", "mixed", "Averages gradients along the straight path from a "
          "black image to the input and multiplies by the difference, so the map sums to the "
          "change of the class score.",
          n_steps=50, baseline=0.0, method="gausslegendre", internal_batch_size=None)
def _integrated_gradients(model: nn.Module, x: Tensor, t: Tensor,
                          o: dict[str, Any]) -> tuple[Tensor, dict]:
    from captum.attr import IntegratedGradients

    if o["internal_batch_size"] is None:
        o["internal_batch_size"] = IMAGES_PER_PASS
    _check_positive_int(o, "n_steps", "internal_batch_size")
    if o["method"] not in ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right",
                           "riemann_middle"):
        raise ValueError(f"IntegratedGradients: unknown method {o['method']!r}; allowed: "
                         "gausslegendre, riemann_trapezoid, riemann_left, riemann_right, "
                         "riemann_middle")
    attr, delta = IntegratedGradients(model).attribute(
        x, target=t, baselines=float(o["baseline"]), n_steps=int(o["n_steps"]),
        method=o["method"], internal_batch_size=max(o["internal_batch_size"], x.shape[0]),
        return_convergence_delta=True)
    change = attr.detach().flatten(1).sum(1) - delta
    info = _completeness(model, x, t, attr, delta, IG_COMPLETENESS_RTOL * change.abs())
    return attr, {"convergence_delta": delta.detach(), **info}


def gradient_shap_baselines(like: Tensor, n_noise: int, seed: int) -> Tensor:
    """GradientShap's references: a black image and ``n_noise`` uniform-noise images in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand((n_noise, *like.shape[1:]), generator=gen, dtype=like.dtype)
    return torch.cat([torch.zeros_like(like[:1]), noise.to(like.device)])


@register("GradientShap", "mixed", "Expected gradients: gradients at random points between the "
          "input and random reference images, times the input-reference difference, averaged; an "
          "approximation of SHAP values.", seeded=True,
          n_samples=25, n_noise_baselines=3, stdevs=0.0)
def _gradient_shap(model: nn.Module, x: Tensor, t: Tensor,
                   o: dict[str, Any]) -> tuple[Tensor, dict]:
    from captum.attr import GradientShap

    _check_positive_int(o, "n_samples")
    if not isinstance(o["n_noise_baselines"], int) or o["n_noise_baselines"] < 0:
        raise ValueError(f"option n_noise_baselines must be an int >= 0, got "
                         f"{o['n_noise_baselines']!r}")
    baselines = gradient_shap_baselines(x, o["n_noise_baselines"], int(o["seed"]))
    shap = GradientShap(model)
    maps, gaps, errors = [], [], []
    for i in range(x.shape[0]):
        with _seeded(int(o["seed"]), x.device):
            attr, delta = shap.attribute(x[i:i + 1], baselines=baselines, target=int(t[i]),
                                         n_samples=int(o["n_samples"]),
                                         stdevs=float(o["stdevs"]), return_convergence_delta=True)
        maps.append(attr)
        gaps.append(delta.mean())
        errors.append(delta.std() / math.sqrt(delta.numel()) if delta.numel() > 1
                      else torch.tensor(math.inf))
    attr = torch.cat(maps)
    gap, allowance = torch.stack(gaps), GRADIENT_SHAP_Z * torch.stack(errors).to(x.device)
    return attr, _completeness(model, x, t, attr, gap, allowance)


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


def _private_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with frozen parameters: hooks, canonizers and mode
    changes of the methods stay on it."""
    work = copy.deepcopy(model).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    return work


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
        (``[N]``) is float32 rounding (see ``_completeness``) plus the method's own error: none
        for DeepLift, :data:`IG_COMPLETENESS_RTOL` of ``|D|`` for IntegratedGradients,
        :data:`GRADIENT_SHAP_Z` standard errors of the mean for GradientShap,
        :data:`LRP_COMPLETENESS_RTOL` of ``|D|`` for LRP. A gap beyond it warns.
    """
    if spade:
        return _attribute_spade(model, images, target, method, spade, options)
    spec = get_method(method)
    opts = spec.resolve(options)
    x = _check_images(images)
    device = _device(model, x.device)
    x = x.to(device)
    if spec.check is not None:
        spec.check(model, x[:1])
    start = time.perf_counter()
    work = _private_copy(model)
    t = _logit_targets(work, x, target)
    with torch.enable_grad(), warnings.catch_warnings():
        for message in _CAPTUM_NOTICES:
            warnings.filterwarnings("ignore", message=message)
        attr, info = spec.fn(work, x, t, opts)
    if attr.shape != x.shape:
        raise RuntimeError(f"{spec.name} returned shape {tuple(attr.shape)}, expected "
                           f"{tuple(x.shape)}")
    _warn_incomplete(spec.name, info)
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
    x = _check_images(images)
    if spade is not True and not isinstance(spade, Mapping):
        raise TypeError(f"spade must be None, False, True or a mapping of trace options, got "
                        f"{spade!r}")
    kwargs = {} if spade is True else dict(spade)
    device = _device(model, x.device)
    if spec.check is not None:
        spec.check(model, x[:1].to(device))
    targets = _logit_targets(_private_copy(model), x.to(device), target)
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
