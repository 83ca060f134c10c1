"""Shared test fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from spade_lib.models import build_model


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Small networks run fastest on one thread (and do not fight a background job)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """A random ResNet-20 (width 8, 32 px) whose logits spread, so saliency maps are not flat."""
    torch.manual_seed(0)
    net = build_model("resnet20", 10, 8, 32).eval()
    net.fc.weight.data.mul_(30.0)
    return net
