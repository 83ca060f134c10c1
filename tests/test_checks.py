"""Tests for spade_lib.checks: the shared argument checks and their messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spade_lib.checks import check_choice, check_image, check_images, check_positive_int


def test_check_positive_int() -> None:
    assert check_positive_int(3, "n") == 3 and check_positive_int(np.int64(2), "n") == 2
    assert type(check_positive_int(np.int64(2), "n")) is int
    for bad in (0, -1, 1.0, True, "2", None):
        with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1 \(a positive "
                                             rf"integer\), got {bad!r}"):
            check_positive_int(bad, "batch_size")


def test_check_choice() -> None:
    assert check_choice("test", ("train", "test"), "split") == "test"
    with pytest.raises(ValueError, match="unknown split 'val'; allowed: train, test"):
        check_choice("val", ("train", "test"), "split")
    with pytest.raises(ValueError, match="unknown split None"):
        check_choice(None, ("train", "test"), "split")


def test_check_images() -> None:
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    out = check_images(x)
    assert torch.equal(out, x) and not out.requires_grad
    cases = [([1.0], "images must be a torch.Tensor \\[N, C, H, W\\], got list"),
             (torch.rand(3, 4, 4), "shape \\[N, C, H, W\\]"),
             (torch.zeros(1, 3, 4, 4, dtype=torch.long), "images must be a float tensor, got"),
             (torch.rand(0, 3, 4, 4), "images is an empty batch"),
             (torch.full((1, 3, 4, 4), float("nan")), "images contain NaN or inf$")]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            check_images(bad)
    assert check_images(torch.rand(0, 3, 4, 4), allow_empty=True).shape[0] == 0
    with pytest.raises(ValueError, match="patches must have shape \\[N, 3, H, W\\]"):
        check_images(torch.rand(1, 1, 4, 4), "patches", channels=3)
    with pytest.raises(ValueError, match="must hold finite values in \\[0, 1\\], got values in "
                                         "\\[0, 2\\]"):
        check_images(torch.tensor([0.0, 2.0]).view(1, 1, 1, 2), unit_range=True)
    with pytest.raises(ValueError, match="NaN or inf; allowed: finite values in \\[0, 1\\]"):
        check_images(torch.full((1, 3, 4, 4), float("inf")), unit_range=True)


def test_check_image() -> None:
    assert check_image(torch.rand(1, 3, 4, 4)).shape == (3, 4, 4)
    with pytest.raises(ValueError, match="image must be a torch.Tensor, got ndarray"):
        check_image(np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match="image dtype torch.float64 differs"):
        check_image(torch.rand(3, 4, 4, dtype=torch.float64), torch.float32)
    with pytest.raises(ValueError, match="image contains NaN or inf"):
        check_image(torch.full((3, 4, 4), float("nan")))
