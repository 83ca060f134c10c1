"""Layer-wise relevance propagation through zennit, with the canonizers the paper's networks need.

LRP runs with a box rule on the first layer, z-plus on the other convolutions and epsilon on dense
layers (:func:`lrp_composite`); every BatchNorm is merged into the preceding convolution and every
residual addition made an explicit module (:func:`lrp_canonizers`). Networks outside those rules
(other activations than ReLU, layer or group norms, residual additions it cannot canonize) are
refused before any work (:func:`check_lrp_supported`). :mod:`spade_lib.attribution` registers it
as the method ``"LRP"``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from spade_lib.preconditions import census, completeness, module_label

__all__ = ["LRP_COMPLETENESS_RTOL", "check_lrp_supported", "lrp", "lrp_canonizers",
           "lrp_composite", "lrp_relevance"]

LRP_COMPLETENESS_RTOL = 0.01
"""LRP's (``zero_bias=True``) tolerance on ``completeness_gap``: its rules conserve relevance up to
their stabilisers, except that z-plus passes nothing on from a neuron without positive input. That
loss has no bound known before the pass; on random ResNets with weights of both signs it stays well
under 1% (``test_lrp_conservation_on_general_weights``), while a layer the rules do not cover is
of order 1 (a missed residual addition doubles the relevance). 1% separates the two; it is a
choice, not a bound."""


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
    additions = census(model, images, lrp_canonizers()).additions
    if additions:
        module = dict(model.named_modules())[additions[0]]
        raise ValueError(
            f"LRP cannot run on this model: {module_label(additions[0])} "
            f"({type(module).__name__}) adds two branches computed from the input "
            f"({len(additions)} such addition(s) in the model), which lrp_canonizers() does not "
            f"turn into a Sum module, so its relevance would go in full to both branches. "
            f"Allowed residual blocks: spade_lib.models.BasicBlock, torchvision's BasicBlock and "
            f"Bottleneck; or use another method.")


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


def lrp(model: nn.Module, x: Tensor, t: Tensor,
        o: Mapping[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """LRP maps ``[N, C, H, W]`` of images ``x`` for targets ``t`` ``[N]`` and their info.

    ``o`` holds the options of :func:`lrp_composite` (``low``, ``high``, ``epsilon``,
    ``stabilizer``, ``zero_bias``). Info: ``output_relevance`` ``[N]`` (the target logits); with
    ``zero_bias`` also the completeness entries (:func:`spade_lib.preconditions.completeness`,
    tolerance :data:`LRP_COMPLETENESS_RTOL`). ``model`` is changed while it runs: pass a copy.
    """
    composite = lrp_composite(o["low"], o["high"], o["epsilon"], o["stabilizer"],
                              bool(o["zero_bias"]))
    relevance, start = lrp_relevance(model, x, t, composite)
    info = {"output_relevance": start}
    if o["zero_bias"]:
        gap = relevance.detach().flatten(1).sum(1) - start
        info.update(completeness(model, x, t, relevance, gap,
                                 LRP_COMPLETENESS_RTOL * start.abs(), fx=start))
    return relevance, info
