"""spade_lib.op_count: dispatched operations counted exactly, views apart, the mode removed."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from spade_lib.op_count import count_ops


def test_counts_each_operation_once_and_views_apart():
    x = torch.ones(4, 3)
    with count_ops() as ops:
        y = x.mul(2)                 # 1
        y.add_(1)                    # 2
        z = y[1:].t()                # views: slice, t
        torch.mm(y, z)               # 3: [4, 3] @ [3, 3]
    assert ops.total == 3 and ops.total_views == 2
    assert ops.compute == {"aten.mul.Tensor": 1, "aten.add_.Tensor": 1, "aten.mm.default": 1}


def test_loops_scale_the_count_and_the_mode_is_removed_even_after_an_error():
    x = torch.ones(5)
    with pytest.raises(RuntimeError), count_ops() as ops:
        for _ in range(7):
            x = x * 2
        raise RuntimeError("stop")
    assert ops.total == 7
    assert _get_current_dispatch_mode() is None
    with count_ops() as after:
        pass
    assert after.total == 0
