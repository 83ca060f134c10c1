"""Preconditions of the user's network: each case below used to give a wrong or empty map
silently. Methods refuse networks they cannot run on (before any work, also before SPADE's
pruning), completeness gaps are measured and warned about, LRP's BatchNorm merge is an identity,
and Lime falls back to a grid where SLIC returns one superpixel."""

from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from nets import Tiny
from torch import nn
from zennit.canonizers import CompositeCanonizer

from spade_lib.attribution import (
    IG_COMPLETENESS_RTOL,
    LRP_COMPLETENESS_RTOL,
    CompletenessWarning,
    attribute,
    grid_segments,
    lrp_canonizers,
    supported_methods,
)
from spade_lib.models import build_model, make_attribution_safe

pytestmark = pytest.mark.usefixtures("one_thread")

U = 2.0 ** -24
"""float32 unit roundoff."""


class TwoConv(nn.Module):
    """The issue's 2-conv classifier: ReLUs applied as functions in ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class ReusedReLU(TwoConv):
    """One ``nn.ReLU`` module applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv2(self.act(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class PlainBlock(nn.Module):
    """A residual block that is neither spade_lib's nor torchvision's."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + x)


class PlainResNet(nn.Module):
    def __init__(self, blocks: int = 4, c: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(*[PlainBlock(c) for _ in range(blocks)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def _images(n: int = 1, side: int = 12, seed: int = 0) -> torch.Tensor:
    """Smooth colour images in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=gen)
    return F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)


def _shifted_resnet(eps: float = 1e-5) -> nn.Module:
    """A random ResNet-20 (width 4) with BatchNorm statistics and shifts of a trained one, so its
    logits are no longer a homogeneous function of the input."""
    torch.manual_seed(0)
    model = build_model("resnet20", width=4, image_size=16).eval()
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = eps
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=gen))
    model.fc.weight.data.mul_(10.0)
    return model


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def _logits(model: nn.Module, x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``f(x)`` and ``f(0)`` (black image) of the target logit, ``[N]`` each, in float64."""
    with torch.no_grad():
        return model(x)[:, t].double(), model(torch.zeros_like(x))[:, t].double()


def _assert_gap(model: nn.Module, attr: object, fx: torch.Tensor, fb: torch.Tensor) -> None:
    """``info["completeness_gap"]`` is ``(sum(map) - D) / |D|`` with ``D = f(x) - f(b)``, up to
    float32 rounding as bounded in ``attribute``'s docstring: ``2 (L + ceil(log2 n)) u
    (sum|map| + |f(x)| + |f(b)|) / |D|``."""
    total = attr.map.double().flatten(1)
    change = fx - fb
    depth = sum(1 for m in model.modules() if next(m.children(), None) is None)
    k = 2 * (depth + math.ceil(math.log2(total.shape[1])))
    rounding = k * U * (total.abs().sum(1) + fx.abs() + fb.abs()) / change.abs()
    expected = (total.sum(1) - change) / change.abs()
    assert ((attr.info["completeness_gap"].double() - expected).abs() <= rounding).all()


def _no_pruning(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("pruning started before the method's check")

    # spade_lib.trace is also the name of the function spade_lib exports
    monkeypatch.setattr(importlib.import_module("spade_lib.trace"), "trace", fail)
    monkeypatch.setattr(importlib.import_module("spade_lib.pruning"), "prune_layer", fail)


# --------------------------------------------------------------------------------------------
# 3. Functional activations, reused activation modules, completeness
# --------------------------------------------------------------------------------------------

@pytest.mark.usefixtures("seeded")
def test_deeplift_refuses_functional_relus() -> None:
    model, x = TwoConv().eval(), torch.rand(1, 3, 12, 12)
    before = _params(model)
    with pytest.raises(ValueError, match=r"DeepLift cannot run on this model: it applies the "
                       r"activation function relu outside an activation module \(2 such"):
        attribute(model, x, 0, "DeepLift")
    assert _unchanged(model, before)


@pytest.mark.parametrize("method", ["GuidedBackprop", "GuidedGradCam"])
def test_guided_methods_refuse_functional_relus(method: str, tiny: nn.Module) -> None:
    model = tiny.eval()
    before = _params(model)
    with pytest.raises(ValueError, match=f"{method} cannot run on this model: .* relu .*"
                       "Allowed: ReLUs as nn.ReLU"):
        attribute(model, _images(), 0, method)
    assert _unchanged(model, before)


@pytest.mark.usefixtures("seeded")
def test_guided_methods_accept_relu_subclasses() -> None:
    """Captum guides every ``nn.ReLU`` instance, subclasses included."""

    class MyReLU(nn.ReLU):
        pass

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), MyReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3)).eval()
    attr = attribute(model, _images(), 0, "GuidedBackprop")
    assert attr.info["guided_relus"] == 1


def test_supported_methods_with_images_sees_functional_relus(model: nn.Module) -> None:
    gradients = ["Saliency", "DeepLift", "GuidedBackprop", "GuidedGradCam"]
    assert supported_methods(Tiny(), gradients, images=_images()) == ["Saliency"]
    assert supported_methods(model, gradients, images=_images()) == gradients


def test_deeplift_completeness_is_measured(model: nn.Module) -> None:
    """Exact on a network of ReLU modules (rounding only); a GELU network misses it and warns."""
    x, t = _images(2, side=16), 3
    attr = attribute(model, x, t, "DeepLift")
    _assert_gap(model, attr, *_logits(model, x, t))
    assert (attr.info["completeness_gap"].abs() <= attr.info["completeness_tolerance"]).all()
    torch.manual_seed(0)
    gelu = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    with pytest.warns(CompletenessWarning, match="DeepLift: a map misses the score change"):
        attribute(gelu, x, 1, "DeepLift")


def test_integrated_gradients_warns_with_too_few_steps() -> None:
    model, x, t = _shifted_resnet(), _images(1, side=16, seed=1), 5
    with pytest.warns(CompletenessWarning, match="IntegratedGradients.*raise n_steps"):
        few = attribute(model, x, t, "IntegratedGradients", n_steps=2)
    _assert_gap(model, few, *_logits(model, x, t))
    assert (few.info["completeness_tolerance"] >= IG_COMPLETENESS_RTOL).all()
    many = attribute(model, x, t, "IntegratedGradients", n_steps=64)
    assert (many.info["completeness_gap"].abs() <= many.info["completeness_tolerance"]).all()


class Detached(nn.Module):
    """A network whose forward hides a branch from autograd: gradients miss its share (10 times
    the image mean, against a black reference)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + 10.0 * x.mean((1, 2, 3))[:, None].detach()


@pytest.mark.usefixtures("seeded")
def test_gradient_shap_expectation_gap() -> None:
    model, x = Detached().eval(), _images(1, side=12)
    before = _params(model)
    with pytest.warns(CompletenessWarning, match="GradientShap.*detached"):
        bad = attribute(model, x, 0, "GradientShap", n_noise_baselines=0)
    assert _unchanged(model, before)
    _assert_gap(model, bad, *_logits(model, x, 0))  # the black image is the only reference
    assert bad.info["completeness_gap"].abs().item() > 0.5
    sound = attribute(model.net, x, 0, "GradientShap", n_noise_baselines=0)
    gap, tol = sound.info["completeness_gap"], sound.info["completeness_tolerance"]
    assert (gap.abs() <= tol).all()


@pytest.mark.usefixtures("seeded")
def test_make_attribution_safe_rewires_torchvision_basic_blocks() -> None:
    """torchvision's ResNet-18 applies each block's ReLU twice: DeepLift refuses it; rewired, the
    function is the same and DeepLift and LRP run and sum to the score (change)."""
    raw = torchvision.models.resnet18(num_classes=10).eval()
    x = _images(1, side=32, seed=5)
    with pytest.raises(ValueError, match=r"module 'layer1.0.relu' \(ReLU\) runs 2 times"):
        attribute(raw, x, 0, "DeepLift")
    fixed = make_attribution_safe(copy.deepcopy(raw)).eval()
    before = _params(fixed)
    with torch.no_grad():
        torch.testing.assert_close(fixed(x), raw(x), atol=0, rtol=0)
    for method, options in (("DeepLift", {}), ("LRP", {"zero_bias": True})):
        attr = attribute(fixed, x, 3, method, **options)
        assert (attr.info["completeness_gap"].abs() <= attr.info["completeness_tolerance"]).all()
    assert _unchanged(fixed, before)


# --------------------------------------------------------------------------------------------
# 4. LRP on residual additions it does not canonize
# --------------------------------------------------------------------------------------------

@pytest.mark.usefixtures("seeded")
def test_lrp_refuses_a_residual_block_it_cannot_canonize(monkeypatch: pytest.MonkeyPatch) -> None:
    model = PlainResNet().eval()
    before = _params(model)
    match = (r"LRP cannot run on this model: module 'blocks.0' \(PlainBlock\) adds two branches "
             r".*\(4 such addition")
    with pytest.raises(ValueError, match=match):
        attribute(model, _images(), 0, "LRP", zero_bias=True)
    _no_pruning(monkeypatch)
    with pytest.raises(ValueError, match=match):
        attribute(model, _images(), 0, "LRP", spade={"sparsity": 0.5, "n_augmentations": 4})
    assert _unchanged(model, before)
    assert "LRP" not in supported_methods(model, images=_images())


def test_lrp_records_its_conservation_gap(model: nn.Module) -> None:
    x = _images(2, side=16, seed=2)
    with torch.no_grad():
        target = model(x).argmax(1)
    attr = attribute(model, x, target, "LRP", zero_bias=True)
    start = attr.info["output_relevance"].double()
    _assert_gap(model, attr, start, torch.zeros_like(start))  # D = f(x): LRP starts from it
    assert (attr.info["completeness_tolerance"] >= LRP_COMPLETENESS_RTOL).all()
    assert "completeness_gap" not in attribute(model, x, target, "LRP").info  # biases absorb


# --------------------------------------------------------------------------------------------
# 5. LRP's BatchNorm merge
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.1])
def test_merged_batch_norm_keeps_the_logits(eps: float) -> None:
    """The canonized network computes the model's logits up to float32 rounding: a few (4) unit
    roundoffs per leaf module, times the logits' magnitude."""
    model = _shifted_resnet(eps)
    x = _images(2, side=16, seed=3)
    with torch.no_grad():
        reference = model(x)
        work = copy.deepcopy(model)
        instances = CompositeCanonizer(lrp_canonizers()).apply(work)
        canonized = work(x)
    for instance in instances:
        instance.remove()
    depth = sum(1 for m in model.modules() if next(m.children(), None) is None)
    atol = 4 * depth * U * float(reference.abs().max())
    torch.testing.assert_close(canonized, reference, atol=atol, rtol=0)
    assert _unchanged(model, _params(work))  # zennit's remove restores every parameter


# --------------------------------------------------------------------------------------------
# 7. Lime on tiny noisy images
# --------------------------------------------------------------------------------------------

def test_lime_falls_back_to_a_grid_on_noise(model: nn.Module) -> None:
    noise = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    # a weak Lasso: alpha=0.01 zeroes this random network's small effects (about 0.01) anyway
    attr = attribute(model, noise, 1, "Lime", n_samples=40, n_segments=12, alpha=1e-4)
    assert attr.map.unique().numel() > 1  # SLIC's single superpixel gave a constant map
    assert attr.info["segmentation"] == ["grid"] and attr.info["n_superpixels"] == [12]
    labels = grid_segments(16, 16, 12)
    for k in range(12):
        assert attr.map[0, 0][labels == k].unique().numel() == 1
    smooth = attribute(model, _images(1, side=16, seed=4), 1, "Lime", n_samples=40,
                       n_segments=12)
    assert smooth.info["segmentation"] == ["slic"]


def test_grid_segments() -> None:
    labels = grid_segments(12, 12, 50)
    assert labels.shape == (12, 12) and int(labels.max()) + 1 == 49  # 7 x 7 cells
    assert torch.equal(labels.unique(), torch.arange(49))
    wide = grid_segments(4, 16, 8)
    assert int(wide.max()) + 1 == 8 and wide[:, :2].unique().numel() == 1  # 2 x 4, 2x4-px cells
    assert int(grid_segments(3, 3, 50).max()) + 1 == 9  # at most one cell per pixel
    assert math.isclose(float(grid_segments(10, 20, 1).max()), 0.0)


# --------------------------------------------------------------------------------------------
# 8. Checks before SPADE's pruning
# --------------------------------------------------------------------------------------------

@pytest.mark.usefixtures("seeded")
def test_deeplift_refuses_a_reused_relu_before_pruning(monkeypatch: pytest.MonkeyPatch) -> None:
    model = ReusedReLU().eval()
    before = _params(model)
    _no_pruning(monkeypatch)
    match = (r"DeepLift cannot run on this model: module 'act' \(ReLU\) runs 2 times in one "
             r"forward pass.*Allowed: one activation module per use")
    with pytest.raises(ValueError, match=match):
        attribute(model, _images(2), [0, 1], "DeepLift", spade={"sparsity": 0.5})
    with pytest.raises(ValueError, match=match):
        attribute(model, _images(2), [0, 1], "DeepLift")
    assert _unchanged(model, before)


def test_guided_backprop_refuses_functional_relus_before_pruning(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _no_pruning(monkeypatch)
    with pytest.raises(ValueError, match="GuidedBackprop cannot run on this model"):
        attribute(Tiny(), _images(), 0, "GuidedBackprop", spade=True)


def test_spade_keeps_every_image_s_info(model: nn.Module) -> None:
    """Per-image info of the pruned copies is joined, not taken from the last image only."""
    spade = {"sparsity": 0.5, "n_augmentations": 4}
    attr = attribute(model, _images(2, side=16), [1, 4], "IntegratedGradients", spade=spade,
                     n_steps=64)
    assert attr.info["completeness_gap"].shape == attr.info["convergence_delta"].shape == (2,)
    lime = attribute(model, _images(2, side=16), [1, 4], "Lime", spade=spade, n_samples=20)
    assert lime.info["segmentation"] == ["slic", "slic"] and len(lime.info["n_superpixels"]) == 2


@pytest.mark.parametrize(("target", "match"), [
    (10, r"target \[10\] out of range; the model has 10"), ([1, 2, 3], "one int or 2 ints")])
def test_spade_checks_the_targets_before_pruning(model: nn.Module, monkeypatch: pytest.MonkeyPatch,
                                                 target: object, match: str) -> None:
    _no_pruning(monkeypatch)
    with pytest.raises(ValueError, match=match):
        attribute(model, _images(2, side=16), target, "Saliency", spade=True)
