"""The nine Captum methods of the paper's Table A.1, and the automatic values of their options.

Each method is a function ``(model, images [N, C, H, W], targets [N], options) -> (map
[N, C, H, W], info)`` that reads its resolved options and never changes them; options whose value
depends on the network or the images (the Grad-CAM layer, the occlusion window, how many images
per pass) are filled in before the call by the ``*_option(s)`` functions.
:mod:`spade_lib.attribution` registers them, with their defaults and descriptions, and runs them
on a private copy of the network; see its docstring for the choices made.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from spade_lib.checks import check_positive_int
from spade_lib.preconditions import GRADIENT_SHAP_Z, IG_COMPLETENESS_RTOL, completeness

__all__ = [
    "IMAGES_PER_PASS", "cam_layer_option", "deeplift", "default_cam_layer", "gradient_shap",
    "gradient_shap_baselines", "grid_segments", "guided_backprop", "guided_grad_cam", "ig_options",
    "input_x_gradient", "integrated_gradients", "lime", "occlusion", "occlusion_options",
    "occlusion_window", "saliency", "superpixels",
]

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


def _check_positive_ints(options: Mapping[str, Any], *names: str) -> None:
    for name in names:
        check_positive_int(options[name], f"option {name}")


# --------------------------------------------------------------------------------------------
# Gradient methods
# --------------------------------------------------------------------------------------------

def saliency(model: nn.Module, x: Tensor, t: Tensor, o: Mapping[str, Any]) -> tuple[Tensor, dict]:
    """Saliency: the signed (``abs=False``) or absolute gradient of the target logit."""
    from captum.attr import Saliency

    return Saliency(model).attribute(x, target=t, abs=bool(o["abs"])), {}


def input_x_gradient(model: nn.Module, x: Tensor, t: Tensor,
                     o: Mapping[str, Any]) -> tuple[Tensor, dict]:
    """InputXGradient: the gradient times the input."""
    from captum.attr import InputXGradient

    return InputXGradient(model).attribute(x, target=t), {}


def deeplift(model: nn.Module, x: Tensor, t: Tensor, o: Mapping[str, Any]) -> tuple[Tensor, dict]:
    """DeepLift from a constant ``baseline`` image, with its completeness entries."""
    from captum.attr import DeepLift

    attr, delta = DeepLift(model).attribute(x, target=t, baselines=float(o["baseline"]),
                                            return_convergence_delta=True)
    return attr, completeness(model, x, t, attr, delta, torch.zeros_like(delta))


def _relu_count(model: nn.Module) -> int:
    """How many ``nn.ReLU`` modules Captum's guided methods modify (0: plain gradients)."""
    return sum(isinstance(m, nn.ReLU) for m in model.modules())


def guided_backprop(model: nn.Module, x: Tensor, t: Tensor,
                    o: Mapping[str, Any]) -> tuple[Tensor, dict]:
    """GuidedBackprop; info ``guided_relus``, the ``nn.ReLU`` modules guided."""
    from captum.attr import GuidedBackprop

    return GuidedBackprop(model).attribute(x, target=t), {"guided_relus": _relu_count(model)}


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


def cam_layer_option(model: nn.Module, x: Tensor, o: Mapping[str, Any]) -> dict[str, Any]:
    """GuidedGradCam's ``layer``: :func:`default_cam_layer` where None, checked."""
    name = default_cam_layer(model, x) if o["layer"] is None else o["layer"]
    if not isinstance(name, str) or name not in dict(model.named_modules()) or not name:
        tops = ", ".join(n for n, _ in model.named_children())
        raise ValueError(f"GuidedGradCam: no submodule named {name!r}; use a dotted module name, "
                         f"e.g. one of the top-level modules {tops}")
    return {**o, "layer": name}


def guided_grad_cam(model: nn.Module, x: Tensor, t: Tensor,
                    o: Mapping[str, Any]) -> tuple[Tensor, dict]:
    """GuidedGradCam on the module ``layer`` (resolved by :func:`cam_layer_option`)."""
    from captum.attr import GuidedGradCam

    if o["interpolate_mode"] not in ("nearest", "bilinear", "bicubic", "area"):
        raise ValueError(f"GuidedGradCam: interpolate_mode must be nearest, bilinear, bicubic or "
                         f"area, got {o['interpolate_mode']!r}")
    attr = GuidedGradCam(model, dict(model.named_modules())[o["layer"]]).attribute(
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


def lime(model: nn.Module, x: Tensor, t: Tensor, o: Mapping[str, Any]) -> tuple[Tensor, dict]:
    """Lime on SLIC superpixels (or a grid), seeded per image; info ``n_superpixels`` and
    ``segmentation`` per image."""
    from captum._utils.models.linear_model import SkLearnLasso
    from captum.attr import Lime

    _check_positive_ints(o, "n_samples", "n_segments", "perturbations_per_eval")
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


def occlusion_options(model: nn.Module, x: Tensor, o: Mapping[str, Any]) -> dict[str, Any]:
    """Occlusion's ``window`` and ``stride`` (:func:`occlusion_window`) and
    ``perturbations_per_eval`` (:data:`IMAGES_PER_PASS` images per pass) where None, checked."""
    window, stride = occlusion_window(x.shape[2], x.shape[3])
    per_eval = max(1, IMAGES_PER_PASS // x.shape[0])
    o = {**o, "window": window if o["window"] is None else o["window"],
         "stride": stride if o["stride"] is None else o["stride"],
         "perturbations_per_eval": (per_eval if o["perturbations_per_eval"] is None
                                    else o["perturbations_per_eval"])}
    _check_positive_ints(o, "window", "stride", "perturbations_per_eval")
    if o["window"] > min(x.shape[2:]):
        raise ValueError(f"Occlusion window {o['window']} is larger than the image "
                         f"{tuple(x.shape[2:])}")
    return o


def occlusion(model: nn.Module, x: Tensor, t: Tensor, o: Mapping[str, Any]) -> tuple[Tensor, dict]:
    """Occlusion with the resolved ``window``, ``stride`` (:func:`occlusion_options`)."""
    from captum.attr import Occlusion

    c = x.shape[1]
    attr = Occlusion(model).attribute(
        x, target=t, sliding_window_shapes=(c, o["window"], o["window"]),
        strides=(c, o["stride"], o["stride"]), baselines=float(o["baseline"]),
        perturbations_per_eval=int(o["perturbations_per_eval"]))
    return attr, {}


def ig_options(model: nn.Module, x: Tensor, o: Mapping[str, Any]) -> dict[str, Any]:
    """IntegratedGradients' ``internal_batch_size`` (:data:`IMAGES_PER_PASS`) where None,
    checked with ``n_steps``."""
    size = o["internal_batch_size"]
    o = {**o, "internal_batch_size": IMAGES_PER_PASS if size is None else size}
    _check_positive_ints(o, "n_steps", "internal_batch_size")
    return o


def integrated_gradients(model: nn.Module, x: Tensor, t: Tensor,
                         o: Mapping[str, Any]) -> tuple[Tensor, dict]:
    """IntegratedGradients; info ``convergence_delta`` and the completeness entries."""
    from captum.attr import IntegratedGradients

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
    info = completeness(model, x, t, attr, delta, IG_COMPLETENESS_RTOL * change.abs())
    return attr, {"convergence_delta": delta.detach(), **info}


def gradient_shap_baselines(like: Tensor, n_noise: int, seed: int) -> Tensor:
    """GradientShap's references: a black image and ``n_noise`` uniform-noise images in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand((n_noise, *like.shape[1:]), generator=gen, dtype=like.dtype)
    return torch.cat([torch.zeros_like(like[:1]), noise.to(like.device)])


def gradient_shap(model: nn.Module, x: Tensor, t: Tensor,
                  o: Mapping[str, Any]) -> tuple[Tensor, dict]:
    """GradientShap from :func:`gradient_shap_baselines`, seeded per image, with the
    completeness entries of the mean gap."""
    from captum.attr import GradientShap

    _check_positive_ints(o, "n_samples")
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
    return attr, completeness(model, x, t, attr, gap, allowance)
