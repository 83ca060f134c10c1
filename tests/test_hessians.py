"""Layer input statistics: Hessians against brute force, hooks and modes restored."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from nets import Tiny
from torch import nn

from spade_lib import hessians
from spade_lib.hessians import conv_columns, layer_hessians
from spade_lib.schedules import default_layers

CUDA = torch.cuda.is_available()


# --------------------------------------------------------------------------------------------
# Hessians
# --------------------------------------------------------------------------------------------

def brute_conv_hessian(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Loop over output positions, reading each patch by explicit indexing of the padded input."""
    left, right, top, bottom = hessians._conv_padding(conv)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, (left, right, top, bottom), mode=mode)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = torch.arange(kh) * dh
    cols = torch.arange(kw) * dw
    total = torch.zeros(conv.weight[0].numel(), conv.weight[0].numel(), dtype=x.dtype)
    count = 0
    for b in range(x.shape[0]):
        for oy in range(ho):
            for ox in range(wo):
                patch = xp[b][:, oy * sh + rows][:, :, ox * sw + cols].flatten()
                total += torch.outer(patch, patch)
                count += 1
    return 2 * total / count


CONV_SETTINGS = [
    # kernel, stride, padding, dilation, padding_mode, input size
    (3, 1, 1, 1, "zeros", (9, 11)),
    (3, 1, 1, 1, "zeros", (16, 16)),
    (3, 2, 1, 1, "zeros", (9, 11)),
    (3, 1, 0, 1, "zeros", (7, 6)),
    (3, 1, 2, 2, "zeros", (10, 9)),
    (5, 1, "same", 1, "zeros", (12, 12)),
    (4, 1, "same", 2, "zeros", (11, 12)),
    ((3, 2), 1, (1, 0), (2, 1), "zeros", (9, 8)),
    (3, (2, 1), 3, 1, "zeros", (8, 8)),
    (3, 1, 1, 1, "reflect", (8, 9)),
    (1, 1, 0, 1, "zeros", (5, 5)),
    (2, 2, 0, 1, "zeros", (8, 8)),
]


@pytest.mark.parametrize("kernel,stride,padding,dilation,mode,size", CONV_SETTINGS)
@pytest.mark.parametrize("chunk_size", [1, 2**24])
@pytest.mark.usefixtures("seeded")
def test_conv_hessian_equals_loop_over_positions(kernel, stride, padding, dilation, mode, size,
                                                 chunk_size):
    conv = nn.Conv2d(3, 4, kernel, stride, padding, dilation, padding_mode=mode).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    h = layer_hessians(nn.Sequential(conv), x, ["0"], dtype=torch.float64,
                       chunk_size=chunk_size)["0"]
    torch.testing.assert_close(h, brute_conv_hessian(conv, x), rtol=1e-10, atol=1e-10)


def test_both_conv_hessian_paths_are_covered():
    """The settings above exercise the shift-correlation path and the unfold path."""
    used = set()
    for kernel, stride, padding, dilation, mode, size in CONV_SETTINGS:
        conv = nn.Conv2d(3, 4, kernel, stride, padding, dilation, padding_mode=mode)
        out = conv(torch.zeros(1, 3, *size))
        used.add(hessians._use_shift_gram(conv, *size, *out.shape[-2:]))
    assert used == {True, False}


@pytest.mark.parametrize("kernel,stride,padding,dilation,mode,size", CONV_SETTINGS)
@pytest.mark.usefixtures("seeded")
def test_conv_columns_reproduce_the_conv(kernel, stride, padding, dilation, mode, size):
    conv = nn.Conv2d(3, 4, kernel, stride, padding, dilation, padding_mode=mode,
                     bias=False).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    cols = conv_columns(conv, x)
    out = conv(x)
    torch.testing.assert_close(conv.weight.flatten(1) @ cols, out.flatten(2))


@pytest.mark.usefixtures("seeded")
def test_linear_hessian_flattens_extra_dims_and_accepts_batch_lists():
    model = nn.Sequential(nn.Linear(5, 3)).double()
    x = torch.randn(6, 4, 5, dtype=torch.float64)
    rows = x.reshape(-1, 5)
    expected = 2 * rows.T @ rows / rows.shape[0]
    for batches, kw in [(x, {}), (x, {"batch_size": 4}), ([x[:2], x[2:]], {}),
                        (x, {"chunk_size": 7})]:
        h = layer_hessians(model, batches, ["0"], dtype=torch.float64, **kw)["0"]
        torch.testing.assert_close(h, expected)


def test_hooks_removed_and_modes_restored_on_error():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = nn.Sequential(nn.Linear(4, 4), Boom()).train()
    model[0].eval()
    with pytest.raises(RuntimeError, match="boom"):
        layer_hessians(model, torch.randn(3, 4), ["0"])
    assert not model[0]._forward_hooks
    assert model.training and not model[0].training and model[1].training


def test_hessians_run_in_eval_mode_and_restore_it():
    model = Tiny().train()
    before = model.bn.running_mean.clone()
    layer_hessians(model, torch.rand(4, 3, 8, 8), ["conv", "fc"])
    assert torch.equal(model.bn.running_mean, before)
    assert all(m.training for m in model.modules())


def test_layer_hessians_rejects_unknown_and_grouped_layers():
    model = Tiny()
    with pytest.raises(ValueError, match="unknown layer: 'nope'.*conv2"):
        layer_hessians(model, torch.rand(2, 3, 8, 8), ["nope"])
    with pytest.raises(ValueError, match="'dw'"):
        layer_hessians(model, torch.rand(2, 3, 8, 8), ["dw"])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_hessians_equal_cpu():
    model = Tiny()
    x = torch.rand(6, 3, 12, 12)
    cpu = layer_hessians(model, x, default_layers(model))
    gpu = layer_hessians(model.cuda(), x.cuda(), default_layers(model))
    for name in cpu:
        torch.testing.assert_close(gpu[name].cpu(), cpu[name], rtol=1e-4, atol=1e-5)
