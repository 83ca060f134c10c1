"""Time exact OBC on one layer: spade_lib's pass against the straightforward one.

Both run the same greedy OBS pass (every row to the end, rows batched, each with its own inverse
Hessian) and the same global budget, on the same random layer and Hessian, and print one table:
seconds, the speed-up, and the largest difference between the two pruned layers (float rounding
only: the algorithm is the same).

The baseline is the pass as first written: a rank-1 downdate of the whole ``n x n`` inverse
Hessian after every removal, with an outer-product temporary. spade_lib downdates in place
(``baddbmm_``) and drops the removed inputs every time the active set has shrunk by
:data:`spade_lib.pruning.OBC_COMPACT` (their rows and columns are zero), about ``0.38 n^3``
instead of ``n^3`` per row.

Example (the largest layers of the ``cpu`` preset's ResNet-18-style model)::

    python benchmarks/bench_obc.py --rows 128 --inputs 1152 --sparsity 0.9
"""

from __future__ import annotations

import argparse
import math
import time
from unittest import mock

import pandas as pd
import torch
from torch import Tensor

from spade_lib import pruning


def straightforward_pass(wr: Tensor, hi: Tensor, order: Tensor, losses: Tensor) -> None:
    """The baseline: the whole inverse Hessian downdated after every removal, no compaction."""
    b, n = wr.shape
    done = torch.zeros_like(wr, dtype=torch.bool)
    ar = torch.arange(b, device=wr.device)
    for t in range(n):
        diag = hi.diagonal(dim1=1, dim2=2)
        scores = (wr**2 / diag).masked_fill_(done, math.inf)
        j = scores.argmin(1)
        losses[:, t], order[:, t] = scores[ar, j], j
        col = hi[ar, :, j]
        dj = col[ar, j].clone()
        wr.sub_(col * (wr[ar, j] / dj)[:, None])
        hi.sub_(col[:, :, None] * (col / dj[:, None])[:, None, :])
        done[ar, j] = True


def layer(rows: int, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """A random layer and a well-conditioned Hessian of correlated inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, generator=g) @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=g)
                                             / math.sqrt(n))
    return torch.randn(rows, n, generator=g), x.T @ x / x.shape[0]


def timed(w: Tensor, h: Tensor, sparsity: float, baseline: bool) -> tuple[float, Tensor]:
    patch = (mock.patch.object(pruning, "_obc_pass", straightforward_pass) if baseline
             else mock.patch.object(pruning, "_obc_pass", pruning._obc_pass))
    with patch:
        start = time.perf_counter()
        out, _ = pruning.prune_layer(w, h, sparsity, "obc")
        return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--inputs", type=int, default=576)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    w, h = layer(args.rows, args.inputs, args.seed)
    base_s, base = timed(w, h, args.sparsity, baseline=True)
    ours_s, ours = timed(w, h, args.sparsity, baseline=False)
    table = pd.DataFrame([
        {"implementation": "straightforward (baseline)", "seconds": base_s, "speed-up": 1.0},
        {"implementation": "spade_lib", "seconds": ours_s, "speed-up": base_s / ours_s},
    ]).set_index("implementation")
    print(f"exact OBC, one layer: {args.rows} rows x {args.inputs} inputs, sparsity "
          f"{args.sparsity}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    same_mask = bool(((base == 0) == (ours == 0)).all())
    print(f"largest weight difference {float((base - ours).abs().max()):.2e}; "
          f"same mask: {same_mask}")


if __name__ == "__main__":
    main()
