"""Preconditions of the saliency methods, found before any work, and their completeness checks.

One forward pass of a private copy of the network (:func:`census`) shows what the module types do
not: activations applied as functions (refused by DeepLift and the guided methods, whose rules
reach activation modules only), an activation module run twice (DeepLift keeps one input and
output per module) and additions of two branches computed from the input (residual connections,
which LRP must canonize). After the work, methods whose map should sum to a score change record how
far it misses (:func:`completeness`) and warn beyond their tolerance (:func:`warn_incomplete`,
:class:`CompletenessWarning`).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from spade_lib.models import device_of

__all__ = [
    "GRADIENT_SHAP_Z", "IG_COMPLETENESS_RTOL", "Census", "CompletenessWarning", "census",
    "completeness", "deeplift_check", "guided_check", "module_label", "private_copy",
    "refuse_functional", "warn_incomplete",
]


def private_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with frozen parameters: hooks, canonizers and mode
    changes of the methods stay on it."""
    work = copy.deepcopy(model).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    return work


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
class Census:
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

    def __init__(self, census: Census, stack: list[tuple[str, nn.Module]]) -> None:
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


def census(model: nn.Module, images: Tensor, canonizers: list[Any] | None = None) -> Census:
    """Run a private copy of ``model`` once on ``images`` ``[N, C, H, W]`` and record what ran.

    In the pass only the input requires grad (the copy's parameters are frozen, also after the
    canonizers), so an addition of two tensors that both require it merges two branches computed
    from the input.
    ``canonizers`` (zennit's) are applied to the copy first. ``model`` is not changed.
    """
    from zennit.canonizers import CompositeCanonizer

    work = private_copy(model)
    seen, stack = Census(), []

    def enter(name: str, module: nn.Module) -> None:
        seen.calls[name] = seen.calls.get(name, 0) + 1
        stack.append((name, module))

    def leave(module: nn.Module, inputs: Any, output: Any) -> None:
        stack.pop()

    handles = [h for name, module in work.named_modules() for h in (
        module.register_forward_pre_hook(lambda m, i, name=name: enter(name, m)),
        module.register_forward_hook(leave))]
    instances = CompositeCanonizer(canonizers).apply(work) if canonizers else []
    for p in work.parameters():  # zennit's merge gives bias-free layers a new, trainable bias
        p.requires_grad_(False)
    x = images.detach().to(device_of(work, images.device)).requires_grad_(True).clone()
    try:
        with torch.enable_grad(), _Recorder(seen, stack):
            work(x)
    finally:
        for handle in [*handles, *instances]:
            handle.remove()
    return seen


def module_label(name: str) -> str:
    """How messages name a module: ``module 'layers.0'``, or the model's own forward for the
    root module (name ``""``)."""
    return f"module {name!r}" if name else "the model's own forward"


def refuse_functional(method: str, seen: Census,
                      handled: Callable[[str, nn.Module | None], bool], why: str,
                      allowed: str) -> None:
    """``ValueError`` naming the first activation function the method does not handle:
    ``handled(function, module)`` says whether ``module`` applying ``function`` is fine."""
    calls = [(f, w) for f, w, m in seen.activations if not handled(f, m)]
    if calls:
        (function, module), n = calls[0], len(calls)
        raise ValueError(f"{method} cannot run on this model: it applies the activation function "
                         f"{function} outside an activation module ({n} such call(s), the first "
                         f"in {module_label(module)}); {why}. Allowed: {allowed}.")


def deeplift_check(model: nn.Module, images: Tensor | None) -> None:
    """DeepLift's check: every activation function runs inside a torch activation module (Captum's
    rescale rule reaches modules only), and no module Captum's DeepLift hooks runs twice in one
    pass (it keeps one input and output per module, and would fail only after the work).
    Activation modules it has no rule for (GELU, ReLU6) pass: their error shows in the
    completeness gap."""
    from captum.attr._core.deep_lift import SUPPORTED_NON_LINEAR

    if images is None:
        return
    seen = census(model, images)
    refuse_functional("DeepLift", seen,
                      lambda f, m: type(m).__module__ == "torch.nn.modules.activation",
                      "Captum's DeepLift applies its rule only to activation modules, so the "
                      "map would not sum to f(x) - f(baseline)",
                      "activations as modules (nn.ReLU(), ...) attributes of the model")
    modules = dict(model.named_modules())
    for name, count in seen.calls.items():
        if count > 1 and type(modules[name]) in SUPPORTED_NON_LINEAR:
            raise ValueError(f"DeepLift cannot run on this model: {module_label(name)} "
                             f"({type(modules[name]).__name__}) runs {count} times in one forward "
                             f"pass, and Captum's DeepLift keeps one input and output per "
                             f"activation module. Allowed: one activation module per use "
                             f"(spade_lib.models.make_attribution_safe rewires torchvision's "
                             f"ResNet blocks).")


def guided_check(method: str) -> Callable[[nn.Module, Tensor | None], None]:
    """The guided methods' check: no ReLU applied outside an ``nn.ReLU`` module."""

    def check(model: nn.Module, images: Tensor | None) -> None:
        if images is not None:
            refuse_functional(method, census(model, images),
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

GRADIENT_SHAP_Z = 5.0
"""GradientShap's tolerance on the mean of its per-sample completeness gaps, in standard errors of
that mean: with ``n_samples`` 25 a sound network exceeds it with probability about 4e-5 (Student's
t, 24 degrees of freedom; 4e-3 with 6 samples)."""


def completeness(model: nn.Module, x: Tensor, t: Tensor, attr: Tensor, gap: Tensor,
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


def warn_incomplete(method: str, info: Mapping[str, Any]) -> None:
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
