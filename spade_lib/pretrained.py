"""torchvision's ImageNet weights, offline: where they are, checked, and loaded into our networks.

The full-scale presets with ``pretrained: true`` fine-tune torchvision's ResNet50, MobileNetV2 and
ConvNeXt-T ImageNet weights (Table C.9). Nothing is downloaded: :func:`pretrained_file` says where
torchvision keeps each file, :func:`checked_file` checks it is torchvision's own (the hash in its
name), and :func:`load_pretrained` loads it into :func:`spade_lib.models.build_model`'s network and
folds the ImageNet normalization into its stem (:func:`fold_input_normalization`), so the network
takes images in [0, 1] like every network here.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "checked_file", "fold_input_normalization",
           "load_pretrained", "load_state", "pretrained_file"]

_TORCHVISION = {"tv_resnet50": "resnet50", "tv_mobilenetv2": "mobilenet_v2",
                "tv_convnext_t": "convnext_tiny"}
_HASH = re.compile(r"-([a-f0-9]+)\.")


def pretrained_file(arch: str) -> tuple[Path, str, str]:
    """Where torchvision keeps the ImageNet weights of ``arch``, offline.

    Returns
    -------
    path : Path
        ``<torch hub dir>/checkpoints/<file>`` (``~/.cache/torch/hub/checkpoints`` unless
        ``TORCH_HOME`` says otherwise), where ``torchvision.models.get_model(..., weights=...)``
        stores its download.
    weights : str
        The torchvision weights' name, e.g. ``"ResNet50_Weights.IMAGENET1K_V2"``.
    url : str
        Where torchvision downloads the file from.
    """
    if arch not in _TORCHVISION:
        raise ValueError(f"pretrained weights exist only for {', '.join(_TORCHVISION)}, not "
                         f"{arch!r}")
    weights = torchvision.models.get_model_weights(_TORCHVISION[arch]).DEFAULT
    name = weights.url.rsplit("/", 1)[-1]
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    return path, f"{type(weights).__name__}.{weights.name}", weights.url


def checked_file(arch: str, path: str | os.PathLike | None) -> Path:
    """torchvision's weights file for ``arch`` (``path``, else the hub cache), checked.

    The file must be torchvision's own: its SHA-256 starts with the hash in the file name of the
    download URL (torch.hub's check), so the checkpoint cache key (``pretrained: true``) always
    means the same weights.

    Raises
    ------
    FileNotFoundError
        No file: the message names the exact path to put it at and the torchvision weights.
    ValueError
        The file is not torchvision's (another SHA-256).
    """
    default, weights, url = pretrained_file(arch)
    file = Path(path) if path is not None else default
    if not file.is_file():
        raise FileNotFoundError(
            f"pretrained weights for {arch} ({weights}) not found at {file}. This machine works "
            f"offline: download {url} elsewhere (or run `python -c \"import torchvision; "
            f"torchvision.models.get_model('{_TORCHVISION[arch]}', weights='{weights}')\"` on a "
            f"machine with internet, which stores it in ~/.cache/torch/hub/checkpoints/) and "
            f"copy the file to {default}, or pass --pretrained-path FILE")
    expected = _HASH.search(url.rsplit("/", 1)[-1]).group(1)
    sha = hashlib.sha256()
    with open(file, "rb") as fh:
        while chunk := fh.read(1 << 22):
            sha.update(chunk)
    if not sha.hexdigest().startswith(expected):
        raise ValueError(f"{file} is not torchvision's {weights} file: its SHA-256 starts with "
                         f"{sha.hexdigest()[:len(expected)]}, expected {expected} (from {url})")
    return file


def load_state(arch: str, path: str | os.PathLike | None) -> dict[str, Tensor]:
    """The checked weights of :func:`checked_file`, loaded on the CPU."""
    return torch.load(checked_file(arch, path), map_location="cpu", weights_only=True)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@torch.no_grad()
def fold_input_normalization(model: nn.Module, mean: Sequence[float] = IMAGENET_MEAN,
                             std: Sequence[float] = IMAGENET_STD) -> nn.Module:
    """Make ``model`` take images in [0, 1] that it took normalized, ``(x - mean) / std``.

    The stem convolution ``W`` (the first ``Conv2d``) becomes ``W / std`` (per input channel) and
    the constant ``c = sum W * mean / std`` moves into its bias, or, for a bias-free conv followed
    by BatchNorm (ResNet50, MobileNetV2), into the BatchNorm's running mean. Exact where the
    stem's window lies inside the image (ConvNeXt's 4x4 stride-4 stem has no padding, so exact
    everywhere); on a zero-padded border the folded net sees 0 where the original saw
    ``-mean / std``, a one-pixel difference that fine-tuning absorbs. Changes ``model`` in place
    and returns it.
    """
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs or convs[0].in_channels != len(mean):
        raise ValueError(f"the first Conv2d of {type(model).__name__} must take {len(mean)} "
                         "channels to fold the input normalization into it")
    conv = convs[0]
    scale = torch.tensor(std, dtype=conv.weight.dtype).reshape(1, -1, 1, 1)
    shift = torch.tensor(mean, dtype=conv.weight.dtype).reshape(1, -1, 1, 1)
    conv.weight.div_(scale)
    offset = (conv.weight * shift).sum(dim=(1, 2, 3))
    if conv.bias is not None:
        conv.bias.sub_(offset)
        return model
    modules = list(model.modules())
    after = next((m for m in modules[modules.index(conv) + 1:]
                  if isinstance(m, nn.modules.batchnorm._BatchNorm)), None)
    if after is None or after.running_mean is None:
        raise ValueError(f"the stem conv of {type(model).__name__} has no bias and no BatchNorm "
                         "after it to take the normalization's offset")
    after.running_mean.add_(offset)
    return model


def load_pretrained(model: nn.Module, arch: str, state: dict[str, Tensor]) -> nn.Module:
    """Load torchvision's ImageNet ``state`` into ``model`` (from :func:`build_model` for ``arch``)
    and fold the normalization into its stem (:func:`fold_input_normalization`).

    The classifier head is loaded only when its shape matches (1000 classes); otherwise it keeps
    its fresh (seeded) initialization, as fine-tuning to CelebA's 40 attributes needs. Changes
    ``model`` in place and returns it.

    Raises
    ------
    ValueError
        If any weight other than the head is missing or has another shape.
    """
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(own) - set(usable))
    head = {"tv_resnet50": "fc.", "tv_mobilenetv2": "classifier.1.",
            "tv_convnext_t": "classifier.2."}[arch]
    wrong = [k for k in skipped if not k.startswith(head)]
    if wrong:
        raise ValueError(f"the pretrained {arch} weights do not fit the model: {wrong[:5]} "
                         "missing or of another shape")
    model.load_state_dict(usable, strict=False)
    return fold_input_normalization(model)
