"""Layers pruned away or above target: rounding never empties a layer, and the report flags
every layer that is empty, above its target beyond rounding, or kept weights by rounding."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from spade_lib import pruning
from spade_lib.pruning import PruneInfo, SparsityTargetWarning, prune_layer, prune_layer_batch
from spade_lib.trace import REPORT_COLUMNS, trace, trace_batch

FAST = dict(n_augmentations=16, batch_size=8)


def _layer(shape: tuple[int, ...], seed: int, dead: list[int] = ()) -> tuple[torch.Tensor, ...]:
    """A weight and a positive semi-definite Hessian whose columns ``dead`` are zero."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape[1:])
    x = torch.randn(4 * n, n, generator=g, dtype=torch.float64)
    x[:, list(dead)] = 0.0
    return torch.randn(shape, generator=g, dtype=torch.float64), 2 * x.T @ x / x.shape[0]


class Head(nn.Module):
    """Stem conv (never pruned by default) and a 3x4 linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.stem(x)).mean((2, 3)))


class DeadChannel(nn.Module):
    """Stem whose output channel 1 is zero on every input, feeding a 16-filter conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)
        with torch.no_grad():
            self.stem.weight[1] = 0.0
            self.stem.bias[1] = -1.0                    # ReLU(-1) = 0 on every augmentation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(torch.relu(self.stem(x))))
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def image() -> torch.Tensor:
    return torch.rand(3, 12, 12, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", pruning.METHODS)
def test_rounding_never_empties_a_layer(method: str) -> None:
    w, h = _layer((3, 4), 0)
    out, info = prune_layer(w, h, 0.99, method)        # round(0.99 * 12) = 12 of 12
    assert int((out != 0).sum()) == 1
    assert not info.empty and info.spared == 1 and info.excess == 0
    assert (info.weights, info.budget, info.pruned) == (12, 11, 11)
    assert info.sparsity == pytest.approx(11 / 12)
    wl, hl = _layer((10, 12), 1)
    out, info = prune_layer(wl, hl, 0.97, "fastobc", mask_group=1)  # round(9.7) = 10 per column
    assert (out != 0).sum(0).tolist() == [1] * 12 and info.spared == 12


def test_dead_inputs_beyond_the_budget_are_counted_as_excess() -> None:
    w, h = _layer((16, 4, 3, 3), 2, dead=list(range(9, 18)))    # input channel 1 is dead
    out, info = prune_layer(w, h, 0.5, "fastobc")               # one group per input channel
    assert pruning.default_mask_group(w.shape) == 9
    assert (out[:, 1] == 0).all()
    assert info.budget == 4 * 72 and info.pruned == 4 * 72 + 72 and info.excess == 72
    assert info.sparsity == pytest.approx(0.625) and not info.empty
    _, info = prune_layer(w, _layer((16, 4, 3, 3), 2)[1], 0.5, "fastobc")
    assert info.excess == 0 and info.spared == 0
    # the whole layer dead: every weight is zero whatever the budget
    _, info = prune_layer(w, torch.zeros_like(h), 0.5, "obc")
    assert info.empty and info.excess == info.weights - info.budget
    _, infos = prune_layer_batch(w, torch.stack([h, torch.zeros_like(h)]), 0.5, "fastobc")
    assert [i.excess for i in infos] == [72, 288] and [i.empty for i in infos] == [False, True]


def test_prune_info_flags_are_derived_from_the_counts() -> None:
    info = PruneInfo("fastobc", 0.5, 1.0, 0.01, 0.0, 0.0, 0.0, weights=8, budget=4, pruned=8)
    assert info.empty and info.excess == 4
    assert not PruneInfo("obc", 0.5, 0.5, 0.01, 0.0, 0.0, 0.0).empty


@pytest.mark.usefixtures("seeded")
def test_trace_flags_and_warns_about_the_3x4_head(image) -> None:
    model = Head()
    before = model.fc.weight.detach().clone()
    with pytest.warns(SparsityTargetWarning, match="fc keeps 1 weights that rounding"):
        tr = trace(model, image, sparsity=0.99, **FAST)
    assert torch.equal(model.fc.weight, before)
    assert list(tr.report.columns) == list(REPORT_COLUMNS)
    row = tr.report.set_index("layer").loc["fc"]
    assert int((tr.model.fc.weight != 0).sum()) == 1
    assert not row["empty"] and row["spared"] == 1 and row["excess"] == 0


@pytest.mark.usefixtures("seeded")
def test_trace_flags_a_layer_above_target_from_a_dead_channel(image) -> None:
    model = DeadChannel()
    with pytest.warns(SparsityTargetWarning, match="conv is above its target 0.5 by 72 weights"):
        tr = trace(model, image, sparsity=0.5, layers="conv", **FAST)
    row = tr.report.set_index("layer").loc["conv"]
    assert row["excess"] == 72 and not row["empty"] and row["spared"] == 0
    assert row["sparsity"] == pytest.approx(0.625)
    assert (tr.model.conv.weight[:, 1] == 0).all()
    with pytest.warns(SparsityTargetWarning, match="sample 1: conv is above its target"):
        trace_batch(model, torch.stack([image, image.flip(1)]), sparsity=0.5, layers="conv",
                    **FAST)


@pytest.mark.usefixtures("seeded")
def test_trace_does_not_warn_when_every_layer_meets_its_target(image) -> None:
    model = DeadChannel()
    with torch.no_grad():
        model.stem.bias[1] = 1.0                       # channel 1 alive again
    with warnings.catch_warnings():
        warnings.simplefilter("error", SparsityTargetWarning)
        tr = trace(model, image, sparsity=0.5, layers="conv", **FAST)
    assert tr.report["excess"].tolist() == [0] and not tr.report["empty"].any()
