"""FastOBC on all of ResNet-50's layers: the batched solver against the column-by-column one.

Prunes torchvision ResNet-50's 53 default layers (every conv and the fc, not the stem) to one
sparsity, for one sample and for a batch of samples (what ``trace`` and ``trace_batch`` do once
the Hessians are collected), with both solvers in the same run, and prints one table: tensor
operations dispatched per sample (compute and views, :mod:`spade_lib.op_count`), solve seconds
per sample, and how far the two solvers' results are apart.

- ``columns``: the column sweep the library had until 2026-12 (``solve_columns`` in
  ``tests/reference.py``): one layer at a time, every column of every mask group on its own,
  about eight operations per column. Its damped Cholesky factors come from today's
  ``_damped_inverse``, as do the batched solver's (the old one used 128-wide blocks in the
  triangular inverse instead of 1024: a few hundred more operations, the same time).
- ``batched``: :func:`spade_lib.pruning.prune_layers`: the layers of equal width and mask
  group (ResNet-50 has many) and all samples in one batch, a mask group of ``g > 1`` columns in
  one triangular solve, five operations per column of the one-column groups (1x1 convs, fc),
  exactly each layer's budget per group (``topk``).

Both go through :func:`spade_lib.pruning.prune_layers` (the column solver registered as
``"fastobc-columns"``), so both include what a trace's solve phase does besides the sweep:
the damped Cholesky factors and the per-layer report (reconstruction errors, counts).

Weights are random (a fresh ResNet-50); each sample's Hessians are random positive definite
matrices of each layer's true size (a low-rank part shared by the samples plus a diagonal of
the sample's own). The control flow of both solvers depends on the shapes only, so the counts
and times are those of real Hessians; the agreement columns compare the two solvers' results
(weights zeroed by one and not the other, among all weights; largest weight difference).

Examples
--------
CPU (this project's results file)::

    python benchmarks/bench_solver.py --batch 16 --out benchmarks/results/solver-cpu.json

GPU (device name in the table and the JSON; ``benchmarks/gpu.sh`` runs it)::

    python benchmarks/bench_solver.py --device cuda --batch 16 \\
        --out benchmarks/results/solver-cuda.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torchvision
from torch import Tensor

from spade_lib import cost, pruning, schedules
from spade_lib.op_count import count_ops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import solve_columns  # noqa: E402

pruning.register_solver("fastobc-columns", options=("damp", "mask_group", "block_size"))(
    solve_columns)


def hessians(n: int, samples: int, generator: torch.Generator, device: str) -> Tensor:
    """``[samples, n, n]`` positive definite: ``A A^T / r`` (rank ``r = 64``, shared) plus a
    positive diagonal of each sample's own."""
    a = torch.randn(n, 64, generator=generator)
    base = (a @ a.T / 64).to(device)
    diag = torch.rand(samples, n, generator=generator).add_(0.1).to(device)
    return base.expand(samples, n, n) + torch.diag_embed(diag)


def problems(sparsity: float, samples: int, device: str) -> dict[str, tuple]:
    model = torchvision.models.resnet50()
    modules = dict(model.named_modules())
    generator = torch.Generator().manual_seed(0)
    out = {}
    for name in schedules.default_layers(model):
        weight = modules[name].weight.detach().to(device)
        out[name] = (weight, hessians(weight[0].numel(), samples, generator, device), sparsity)
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def columns(layers: dict) -> dict:
    solved = pruning.prune_layers(layers, "fastobc-columns")
    return {name: out for name, (out, _) in solved.items()}


def batched(layers: dict) -> dict:
    solved = pruning.prune_layers(layers, "fastobc")
    return {name: out for name, (out, _) in solved.items()}


def measure(solve, layers: dict, device: str) -> tuple[dict, float, object]:
    """The solver's result and seconds (a plain run after a warm-up on the first two layers:
    library loading and GPU start-up are not charged to it), then its operations (a counted
    run: counting slows every operation down, so the two are not mixed)."""
    solve(dict(list(layers.items())[:2]))
    sync(device)
    start = time.perf_counter()
    out = solve(layers)
    sync(device)
    seconds = time.perf_counter() - start
    with count_ops() as ops:
        solve(layers)
    return out, seconds, ops


def compare(a: dict, b: dict) -> tuple[float, float]:
    """Share of weights zero in one result and not the other (%), largest weight difference."""
    differ = sum(int(((a[k] == 0) != (b[k] == 0)).sum()) for k in a)
    total = sum(a[k].numel() for k in a)
    return 100 * differ / total, max(float((a[k] - b[k]).abs().max()) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--batch", type=int, default=16, help="samples of the batched rows")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-columns-batch", action="store_true",
                        help="leave out the slow column solver on the batch")
    parser.add_argument("--out", default=None, help="also write the table to this JSON file "
                        "(this project's: benchmarks/results/solver-cpu.json, read by chapter F)")
    args = parser.parse_args()
    here = cost.machine(args.device)
    device_name = here["gpu"] or "cpu"
    rows = []
    for samples in (1, args.batch):
        layers = problems(args.sparsity, samples, args.device)
        base = None
        for solver, solve in (("columns", columns), ("batched", batched)):
            if solver == "columns" and samples > 1 and args.skip_columns_batch:
                continue
            out, seconds, ops = measure(solve, layers, args.device)
            row = {"samples": samples, "solver": solver, "ops_per_sample": ops.total / samples,
                   "views_per_sample": ops.total_views / samples,
                   "seconds_per_sample": seconds / samples}
            if base is None and solver == "columns":
                base = (out, seconds, ops)
            elif base is not None:
                row["mask_differs_%"], row["max_weight_diff"] = compare(base[0], out)
                row["ops_ratio"] = base[2].total / ops.total
                row["speedup"] = base[1] / seconds
            rows.append(row)
            del out
        del layers, base
    table = pd.DataFrame(rows)
    print(f"FastOBC, torchvision ResNet-50, 53 layers at {args.sparsity}, {args.device}: "
          f"{cost.machine_sentence(here)}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if not args.out:
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "format": 1, "device": device_name, "machine": here,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "sparsity": args.sparsity, "rows": rows}, indent=1) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
