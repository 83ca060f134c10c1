"""Count the tensor operations a piece of code dispatches (what bounds a solver on a GPU).

On a GPU every dispatched operation is at least one kernel launch (about 5-20 us), so code that
issues many small operations is bound by their number, not by its arithmetic. :func:`count_ops`
counts them with PyTorch's dispatch mode (``torch.utils._python_dispatch.TorchDispatchMode``,
the hook below autograd that every ATen call passes through): ``compute`` operations, which
read or write tensor memory, and ``views`` (``select``, ``slice``, ``transpose``...), which only
make new tensor headers and launch nothing. ``benchmarks/bench_solver.py`` reports both.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCount", "count_ops"]


@dataclass
class OpCount:
    """Operations dispatched inside :func:`count_ops`, by ATen name (``"aten.mul.Tensor"``)."""

    compute: Counter = field(default_factory=Counter)
    views: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        """Compute operations (views excluded): the kernels a GPU would launch."""
        return sum(self.compute.values())

    @property
    def total_views(self) -> int:
        return sum(self.views.values())


class _Counting(TorchDispatchMode):
    def __init__(self, count: OpCount) -> None:
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        (self.count.views if func.is_view else self.count.compute)[str(func)] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def count_ops() -> Iterator[OpCount]:
    """Context manager that counts the ATen operations dispatched in its block.

    Examples
    --------
    >>> import torch
    >>> with count_ops() as ops:
    ...     y = torch.ones(3).mul(2)[1:]
    >>> ops.total, ops.total_views
    (2, 1)

    Operations made inside other operations (a composite one's parts) are counted as they reach
    the dispatcher; the mode is removed on exit, also after an exception.
    """
    count = OpCount()
    with _Counting(count):
        yield count
