"""Shared test fixtures."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fashion import write_fashion
from nets import Tiny
from torch import nn

from spade_lib import config, data, metrics
from spade_lib.models import build_model


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Small networks run fastest on one thread (and do not fight a background job)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def seeded() -> Iterator[None]:
    """Seed torch's global RNG with 0 for one test; the state it had comes back afterwards.

    Request it where a test or fixture would otherwise begin with ``torch.manual_seed(0)``, so
    one test cannot change the random numbers another one draws.
    """
    state = torch.get_rng_state()
    torch.manual_seed(0)
    yield
    torch.set_rng_state(state)


@pytest.fixture
def quiet() -> Iterator[None]:
    """Silence ``metrics.DegenerateScoreWarning`` (a NaN score, e.g. of a constant map)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics.DegenerateScoreWarning)
        yield


@pytest.fixture
def tiny(seeded: None) -> nn.Module:
    """A ``nets.Tiny`` drawn with seed 0 (in training mode)."""
    return Tiny()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """A random ResNet-20 (width 8, 32 px) whose logits spread, so saliency maps are not flat."""
    torch.manual_seed(0)  # inline: ``seeded`` is per test and this network is built per module
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


@pytest.fixture
def cfg(tmp_path: Path) -> config.Config:
    """The smoke preset with a fresh cache, 8 augmentations and a linear schedule (the runner's
    tests); files that need another config define their own ``cfg``."""
    return config.load("smoke", cache_dir=str(tmp_path), n_augmentations=8,
                       sparsity="linear:0:0.8")


@pytest.fixture(scope="module")
def scenes() -> tuple[data.SceneSet, data.PoisonedSet]:
    """The smoke test scenes and their poisoned copies."""
    smoke = config.load("smoke")
    _, test = data.load_scenes(smoke)
    return test, data.poisoned_test(test, smoke.rules, seed=smoke.seed)
