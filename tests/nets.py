"""Tiny networks and network helpers shared by the tests (pruning, trace, attribution, LRP)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Float32 gradients carry a relative error of a few units of 2^-24 per operation; a cosine of
# vectors with relative error e moves by O(e). 1e-5 leaves a factor of ~100 for the depth of
# these nets and the different summation order of a batch against one copy.
COS_TOL = 1e-5
"""Tolerance of a mean pairwise cosine of float32 gradients (gradient-noise tests)."""


class Tiny(nn.Module):
    """Stem conv, BatchNorm, depthwise conv, strided conv, conv, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.conv = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(12, 12, 3, padding=1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.dw(torch.relu(self.bn(self.stem(x)))))
        x = torch.relu(self.conv2(torch.relu(self.conv(x))))
        return self.fc(x.mean((2, 3)))


def randomize_bn(model: nn.Module, seed: int, shift: bool = True) -> nn.Module:
    """Give every BatchNorm non-trivial statistics; ``shift=False`` keeps mean and bias 0."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            if shift:
                m.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
                m.bias.data.copy_(0.1 * torch.randn(c, generator=gen))
    return model.eval()


def smooth_images(n: int = 2, seed: int = 0, side: int = 16) -> torch.Tensor:
    """Smooth colour images (SLIC finds several superpixels in them, unlike in white noise)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=gen)
    return F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)


def positive_convs(model: nn.Module) -> nn.Module:
    """Non-negative conv weights, each filter summing to 1: no neuron lacks positive input."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data.abs_()
            m.weight.data /= m.weight.data.sum((1, 2, 3), keepdim=True)
    return model


def model_state(model: nn.Module) -> dict[str, object]:
    return {
        "params": {k: v.clone() for k, v in model.state_dict().items()},
        "grad": [p.requires_grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "hooks": sum(len(m._forward_hooks) + len(m._backward_hooks)
                     + len(m._forward_pre_hooks) for m in model.modules()),
        "modules": [type(m) for m in model.modules()],
    }


def same_state(a: dict[str, object], b: dict[str, object]) -> bool:
    pa, pb = a["params"], b["params"]
    return (pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
            and all(a[k] == b[k] for k in ("grad", "training", "hooks", "modules")))
