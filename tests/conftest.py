"""Shared test fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from fashion import write_fashion
from torch import nn

from spade_lib import data
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


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch):
    """A small Fashion-MNIST look-alike in SPADE_DATA_DIR; the real places are hidden."""
    folder = tmp_path / "fashion"
    arrays = write_fashion(folder)
    monkeypatch.setenv("SPADE_DATA_DIR", str(folder))
    monkeypatch.setattr(data, "FASHION_SYSTEM_DIR", tmp_path / "no-system-dir")
    return arrays
