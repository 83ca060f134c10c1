"""The per-image measurements of gradient noise (Appendix E) and mask agreement (Appendix K):
brute force and hand cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from nets import COS_TOL, Tiny, model_state, randomize_bn, same_state
from sklearn.metrics import jaccard_score
from torch import nn

from spade_lib import fidelity
from spade_lib.trace import trace


@pytest.fixture
def net(tiny: nn.Module) -> nn.Module:
    """``Tiny`` with non-trivial BatchNorm statistics, in eval mode."""
    return randomize_bn(tiny, seed=1)


@pytest.fixture
def image() -> torch.Tensor:
    return torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(3))


def _tiny_forward(net: Tiny, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``Tiny.forward`` written out, returning every intermediate output (no hooks)."""
    out = {"stem": net.stem(x)}
    out["dw"] = net.dw(torch.relu(net.bn(out["stem"])))
    out["conv"] = net.conv(torch.relu(out["dw"]))
    out["conv2"] = net.conv2(torch.relu(out["conv"]))
    out["fc"] = net.fc(torch.relu(out["conv2"]).mean((2, 3)))
    return out


def _pairwise_loop(vectors: list[torch.Tensor]) -> float:
    """The mean cosine over pairs i < j by an explicit double loop (float64)."""
    vs = [v.double().flatten() for v in vectors]
    total, count = 0.0, 0
    for i in range(len(vs)):
        for j in range(i + 1, len(vs)):
            total += float(torch.dot(vs[i], vs[j]) / (vs[i].norm() * vs[j].norm()))
            count += 1
    return total / count


# --------------------------------------------------------------------------------------------
# Gradient noise
# --------------------------------------------------------------------------------------------

def test_batched_hooks_match_a_per_copy_autograd_loop(net, image):
    layers = ["stem", "dw", "conv", "conv2"]
    table = fidelity.gradient_noise(net, image, 2, layers, n_copies=7, noise=0.2, seed=5,
                                    batch_size=3)
    copies = fidelity.noisy_copies(image, 7, 0.2, seed=5)
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in ["input", *layers]}
    hits = 0
    for x in copies:
        x = x[None].clone().requires_grad_(True)
        out = _tiny_forward(net, x)
        hits += int(out["fc"].argmax(1) == 2)
        found = torch.autograd.grad(out["fc"][0, 2], [x, *(out[n] for n in layers)])
        for name, g in zip(grads, found, strict=True):
            grads[name].append(g)
    table = table.set_index("layer")
    assert list(table.index) == ["input", *layers]
    assert list(table["position"]) == list(range(5))
    for name, gs in grads.items():
        assert table.loc[name, "cosine"] == pytest.approx(_pairwise_loop(gs), abs=COS_TOL)
        assert table.loc[name, "size"] == gs[0].numel()
        assert table.loc[name, "n_degenerate"] == 0
    assert (table["target_kept"] == hits / 7).all()


def test_gradient_of_an_output_followed_by_an_in_place_relu(seeded, image):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Flatten(),
                        nn.Linear(4 * 6 * 6, 3)).eval()
    copies = fidelity.noisy_copies(image, 6, 0.3, seed=1)
    grads = []
    for x in copies:
        conv = net[0](x[None])
        logit = net[3](torch.relu(conv).flatten(1))[0, 1]
        grads.append(torch.autograd.grad(logit, conv)[0])
    table = fidelity.gradient_noise(net, image, 1, ["0"], n_copies=6, noise=0.3, seed=1)
    # recording the tensor the in-place ReLU overwrote would give the gradient without its mask
    assert table.set_index("layer").loc["0", "cosine"] == pytest.approx(
        _pairwise_loop(grads), abs=COS_TOL)


def test_mean_pairwise_cosine_matches_a_double_loop_and_skips_directionless_rows(seeded):
    v = torch.randn(9, 13)
    v[4] = 0.0
    v[6, 2] = math.inf
    mean, left_out = fidelity.mean_pairwise_cosine(v)
    assert left_out == 2
    assert mean == pytest.approx(_pairwise_loop([v[i] for i in (0, 1, 2, 3, 5, 7, 8)]),
                                 abs=1e-12)


def test_mean_pairwise_cosine_hand_cases():
    assert fidelity.mean_pairwise_cosine(torch.ones(5, 3) * 2.0)[0] == pytest.approx(1.0)
    assert fidelity.mean_pairwise_cosine(torch.tensor([[1.0, 0], [-2.0, 0]]))[0] == -1.0
    assert fidelity.mean_pairwise_cosine(torch.eye(4))[0] == 0.0
    # three unit vectors 120 degrees apart: every cosine is -1/2
    angles = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3], dtype=torch.float64)
    ring = torch.stack([angles.cos(), angles.sin()], 1)
    assert fidelity.mean_pairwise_cosine(ring)[0] == pytest.approx(-0.5, abs=1e-12)
    mean, left_out = fidelity.mean_pairwise_cosine(torch.tensor([[1.0, 2.0], [0.0, 0.0]]))
    assert math.isnan(mean) and left_out == 1


def test_gradient_noise_leaves_the_model_untouched_and_is_deterministic(net, image):
    net.train()
    net.dw.eval()
    before = model_state(net)
    a = fidelity.gradient_noise(net, image, 0, ["conv", "fc"], n_copies=5, seed=2, batch_size=2)
    assert same_state(before, model_state(net))
    assert net.training and not net.dw.training
    assert all(p.grad is None for p in net.parameters())
    b = fidelity.gradient_noise(net, image, 0, ["conv", "fc"], n_copies=5, seed=2, batch_size=5)
    pd.testing.assert_frame_equal(a, b, atol=COS_TOL, rtol=0)
    c = fidelity.gradient_noise(net, image, 0, ["conv", "fc"], n_copies=5, seed=3)
    assert not np.allclose(a["cosine"].iloc[:2], c["cosine"].iloc[:2])


def test_gradient_of_the_logits_is_the_same_for_every_copy(net, image):
    table = fidelity.gradient_noise(net, image, 4, ["fc"], n_copies=6).set_index("layer")
    assert table.loc["fc", "cosine"] == pytest.approx(1.0, abs=1e-12)   # always e_4


def test_a_network_without_gradient_gives_nan_with_counts(net, image):
    net.fc.weight.data.zero_()
    table = fidelity.gradient_noise(net, image, 1, ["conv"], n_copies=4)
    assert table["cosine"].isna().all() and (table["n_degenerate"] == 4).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(layers=["nope"]), "unknown layer"),
    (dict(layers=["input"]), "unknown layer"),
    (dict(n_copies=1), "at least 2"),
    (dict(noise=0.0), "noise must be a positive"),
    (dict(seed=-1), "seed must be"),
    (dict(target=5), "not a class"),
])
def test_gradient_noise_refuses_bad_arguments(net, image, kwargs, match):
    args = dict(target=1, layers=["conv"], n_copies=4) | kwargs
    with pytest.raises(ValueError, match=match):
        fidelity.gradient_noise(net, image, **args)


def test_recorded_outputs_refuses_a_module_that_runs_twice(seeded):
    lin = nn.Linear(3, 3)
    net = nn.Sequential(lin, nn.ReLU(), lin)
    with fidelity.recorded_outputs(net, ["0"]), pytest.raises(RuntimeError, match="twice"):
        net(torch.ones(1, 3))
    assert all(not m._forward_hooks for m in net.modules())


# --------------------------------------------------------------------------------------------
# Masks and agreement
# --------------------------------------------------------------------------------------------

def _masks(*rows: list[int]) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(rows, dtype=torch.bool)}


def test_mask_agreement_hand_cases():
    same = fidelity.mask_agreement(_masks([1, 1, 0, 0]), _masks([1, 1, 0, 0])).iloc[0]
    assert same["agreement"] == 1.0 and same["overlap"] == 2 and same["chance"] == 0.5
    apart = fidelity.mask_agreement(_masks([1, 1, 0, 0]), _masks([0, 0, 1, 1])).iloc[0]
    assert apart["agreement"] == 0.0
    half = fidelity.mask_agreement(_masks([1, 1, 0, 0]), _masks([1, 0, 1, 0])).iloc[0]
    assert half["agreement"] == 0.5 and half["chance"] == 0.5
    # unequal sizes: 2 * 1 / (1 + 3); chance 2 * 1 * 3 / (4 * 4)
    odd = fidelity.mask_agreement(_masks([1, 0, 0, 0]), _masks([1, 1, 1, 0])).iloc[0]
    assert odd["agreement"] == 0.5 and odd["chance"] == pytest.approx(6 / 16)
    empty = fidelity.mask_agreement(_masks([0, 0]), _masks([0, 0])).iloc[0]
    assert math.isnan(empty["agreement"]) and math.isnan(empty["chance"])


def test_independent_random_masks_agree_at_the_keep_ratio():
    n, k = 200_000, 2_000
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.zeros(n, dtype=torch.bool) for _ in range(2))
    a[torch.randperm(n, generator=gen)[:k]] = True
    b[torch.randperm(n, generator=gen)[:k]] = True
    row = fidelity.mask_agreement({"w": a}, {"w": b}).iloc[0]
    assert row["chance"] == pytest.approx(k / n)
    # the overlap is hypergeometric with mean k^2/n; its variance is below the binomial k p (1-p)
    p = k / n
    assert abs(row["overlap"] - k * p) <= 4 * math.sqrt(k * p * (1 - p))
    assert abs(row["agreement"] - p) <= 4 * math.sqrt(k * p * (1 - p)) / k


def test_agreement_relates_to_sklearn_jaccard_for_equal_kept_counts():
    gen = torch.Generator().manual_seed(1)
    n, k = 500, 60
    a, b = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    a[torch.randperm(n, generator=gen)[:k]] = True
    b[torch.cat([torch.nonzero(a)[:25, 0], torch.nonzero(~a)[:35, 0]])] = True
    row = fidelity.mask_agreement({"w": a}, {"w": b}).iloc[0]
    o = row["overlap"]
    assert o == 25 and row["kept_a"] == row["kept_b"] == k
    j = jaccard_score(a.numpy(), b.numpy())
    assert j == pytest.approx(o / (2 * k - o))
    assert row["agreement"] == pytest.approx(o / k) == pytest.approx(2 * j / (1 + j))


def test_mask_agreement_refuses_mismatched_masks():
    with pytest.raises(ValueError, match="different layers"):
        fidelity.mask_agreement({"a": torch.ones(2, dtype=torch.bool)},
                                {"b": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shapes differ"):
        fidelity.mask_agreement(_masks([1, 0]), _masks([1, 0, 1]))
    with pytest.raises(ValueError, match="bool"):
        fidelity.mask_agreement({"w": torch.ones(2)}, _masks([1, 0]))


@pytest.mark.filterwarnings("ignore::spade_lib.pruning.SparsityTargetWarning")
def test_trace_masks_are_the_nonzero_weights_of_the_pruned_copy(net, image):
    zero = torch.rand(net.conv2.weight.shape, generator=torch.Generator().manual_seed(4)) < 0.1
    net.conv2.weight.data[zero] = 0.0
    before = model_state(net)
    result = trace(net, image, sparsity=0.5, n_augmentations=16, batch_size=16)
    assert same_state(before, model_state(net))
    masks = fidelity.trace_masks(result)
    assert list(masks) == list(result.report["layer"])
    modules = dict(result.model.named_modules())
    for name, m in masks.items():
        assert m.dtype == torch.bool and torch.equal(m, modules[name].weight != 0)
        sparsity = result.report.set_index("layer").loc[name, "sparsity"]
        assert 1 - m.float().mean().item() == pytest.approx(sparsity)
    # a dense zero is kept only where the solver's update made it nonzero (FastOBC may)
    assert torch.equal(masks["conv2"][zero], result.model.conv2.weight[zero] != 0)
    assert torch.equal(fidelity.weight_masks(net, ["conv2"])["conv2"], ~zero)
