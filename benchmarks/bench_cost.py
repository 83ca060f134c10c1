"""SPADE's cost against model size: FastOBC traces of small and torchvision networks, OBC beside.

For each model (default: the ``cpu`` preset's three small networks at 32 px and torchvision's
ResNet50, MobileNetV2 and ConvNeXt-T at 224 px, all with random weights, so nothing is trained or
downloaded), one SPADE trace of a photo per augmentation count, every default layer pruned to 0.9
with FastOBC, timed by phase (augmentations, Hessians, solver). The solver's time does not depend
on the augmentation count, so each count also repeats the solver's measurement. Each row records
the machine's load average (1 min) when its trace started: on a shared machine it explains much
of the spread.

The baseline, in the same run: exact OBC's solver time on the same layers with the Hessians of
the smallest count (:func:`spade_lib.cost.solver_seconds`: each layer shape timed once, on a
subset of its rows where the whole would exceed ``--row-budget``, scaled by the row count) against
FastOBC's, for the models whose widest layer has at most ``--obc-max-columns`` inputs per row
(OBC's work grows as ``rows * n^3``: a ResNet50 layer with n = 4608 is hours on a CPU). A second
check times one OBC layer whole and from a subset of its rows, to show what the scaling misses.

``--out FILE`` writes the results (machine, device name, date, torch version, command) for the
book's chapter F (:func:`spade_lib.cost.read_results`); ``benchmarks/results/cost-cpu.json`` is
this project's CPU run, and a GPU run writes ``benchmarks/results/cost-gpu.json``.

Examples
--------
CPU (this project's results file)::

    python benchmarks/bench_cost.py --out benchmarks/results/cost-cpu.json

GPU, with the paper's augmentation counts::

    python benchmarks/bench_cost.py --device cuda --n-augmentations 64,256,1024 \\
        --out benchmarks/results/cost-gpu.json
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from spade_lib import config, cost, hessians, pruning, schedules
from spade_lib.augment import augmented_batches
from spade_lib.models import build_model, count_parameters
from spade_lib.trace import trace

SMALL = ("cpu", "cpu-mobilenetv2", "cpu-convnext")
TORCHVISION = ("tv_resnet50", "tv_mobilenetv2", "tv_convnext_t")
SPARSITY = 0.9
BATCH = 64


def _model(name: str) -> tuple[torch.nn.Module, int]:
    """A network with random weights (seed 0) and its input side: a preset's small network, or a
    torchvision one at 224 px with 1000 classes."""
    torch.manual_seed(0)
    if name in TORCHVISION:
        return build_model(name, 1000, image_size=224).eval(), 224
    cfg = config.load(name)
    return build_model(cfg.arch, 10, cfg.width, cfg.image_size).eval(), cfg.image_size


def _photo(size: int) -> torch.Tensor:
    from bench_trace import photos  # the same photos as the trace benchmark

    return photos(1, size)[0]


def _obc_check(model: torch.nn.Module, stats: dict, budget: float,
               repeats: int = 3) -> dict | None:
    """The largest OBC layer that :func:`spade_lib.cost.solver_seconds` scales from ``k`` rows
    and that takes at most 40x the budget whole, timed three ways (the fastest of ``repeats``
    runs each): scaled from ``k`` rows, whole in batches of ``k`` rows (what the scaling stands
    for) and whole in OBC's default batches (what a trace runs). ``None`` if there is none."""
    modules = dict(model.named_modules())
    work = {name: modules[name].weight.shape[0] * modules[name].weight[0].numel()**3
            for name in stats}
    fits = [name for name in stats if work[name] <= 40 * budget
            and max(1, int(budget // modules[name].weight[0].numel()**3))
            < modules[name].weight.shape[0]]
    if not fits:
        return None
    name = max(fits, key=work.get)
    w, h = modules[name].weight.detach(), stats[name]
    k = max(1, int(budget // w[0].numel()**3))
    scaled = min(float(cost.solver_seconds(model, {name: h}, {name: SPARSITY}, "obc",
                                           budget).seconds[0]) for _ in range(repeats))
    batched = min(pruning.prune_layer(w, h, SPARSITY, "obc", batch_bytes=k * w[0].numel()**2 * 4)
                  [1].seconds for _ in range(repeats))
    default = min(pruning.prune_layer(w, h, SPARSITY, "obc")[1].seconds for _ in range(repeats))
    return {"layer": name, "shape": str(tuple(w.shape)), "rows_timed": k,
            "scaled_seconds": scaled, "whole_seconds": batched,
            "default_batches_seconds": default}


def main(argv: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Parse arguments, time every model, print the tables, write ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(SMALL + TORCHVISION),
                        help="comma-separated small presets and/or torchvision archs")
    parser.add_argument("--n-augmentations", default="4,8,16",
                        help="comma-separated augmentation counts (4,8,16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--row-budget", type=float, default=cost.ROW_BUDGET,
                        help="OBC work (rows x n^3) timed per layer shape")
    parser.add_argument("--obc-max-columns", type=int, default=1200,
                        help="time OBC only on models whose layers have at most this many "
                             "inputs per row")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="write the results file here (JSON)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    counts = sorted(int(c) for c in args.n_augmentations.split(","))
    here = cost.machine(device)
    print(f"{cost.machine_sentence(here)}; load average {os.getloadavg()[0]:.1f} at the start; "
          f"every default layer at sparsity {SPARSITY}, FastOBC; augmentations {counts}")
    traces, solvers, checks = [], [], []
    for name in args.models.split(","):
        model, size = _model(name)
        model = model.to(device)
        image = _photo(size).to(device)
        layers = schedules.default_layers(model)
        about = {"model": name, "arch": name if name in TORCHVISION else config.load(name).arch,
                 "image_size": size, "parameters": count_parameters(model),
                 "weights": sum(dict(model.named_modules())[x].weight.numel() for x in layers),
                 "layers": len(layers)}
        trace(model, image, sparsity=SPARSITY, n_augmentations=counts[0], batch_size=BATCH)
        for n in counts:
            start, load = time.perf_counter(), os.getloadavg()[0]
            tr = trace(model, image, sparsity=SPARSITY, n_augmentations=n, batch_size=BATCH)
            traces.append({**about, "n_augmentations": n, **tr.timings, "load": load})
            print(f"  {name}: {n} augmentations, {time.perf_counter() - start:.1f} s", flush=True)
        widest = max(dict(model.named_modules())[x].weight[0].numel() for x in layers)
        fast = float(pd.DataFrame(traces[-len(counts):])["solve"].median())
        row = {"model": name, "fastobc_seconds": fast, "obc_seconds": float("nan"),
               "obc_timed_share": float("nan"), "widest_row": widest,
               "row_budget": args.row_budget}
        if widest <= args.obc_max_columns:
            views = augmented_batches(image, counts[0], "default", 0, BATCH)
            stats = hessians.layer_hessians(model, views, layers)
            obc = cost.solver_seconds(model, stats, dict.fromkeys(layers, SPARSITY), "obc",
                                      args.row_budget, progress=False)
            once = obc.drop_duplicates("timed_as")
            row.update(obc_seconds=float(obc["seconds"].sum()),
                       obc_timed_share=float(once["timed_seconds"].sum() / once["seconds"].sum()))
            if not checks and (check := _obc_check(model, stats, args.row_budget)):
                checks.append({"model": name, **check})
        solvers.append(row)
    traces_df, solvers_df = pd.DataFrame(traces), pd.DataFrame(solvers)
    solvers_df["obc_over_fastobc"] = solvers_df["obc_seconds"] / solvers_df["fastobc_seconds"]
    pd.set_option("display.width", 200)
    print("\nseconds per trace, by phase")
    print(traces_df.drop(columns=["arch"]).to_string(index=False, float_format="{:.3f}".format))
    print("\nbaseline: OBC's solver time against FastOBC's (median over the counts above)")
    print(solvers_df.to_string(index=False, float_format="{:.3f}".format))
    for c in checks:
        print(f"\nOBC scaling check on {c['model']} {c['layer']} {c['shape']}: scaled from "
              f"{c['rows_timed']} rows {c['scaled_seconds']:.2f} s; whole layer in batches of "
              f"{c['rows_timed']} rows {c['whole_seconds']:.2f} s "
              f"({c['scaled_seconds'] / c['whole_seconds']:.2f}x); whole layer in OBC's default "
              f"batches {c['default_batches_seconds']:.2f} s")
    if args.out:
        script = os.path.relpath(__file__, Path(__file__).resolve().parents[1])
        command = shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])
        path = cost.write_results(args.out, traces_df, solvers_df, device, command,
                                  checks=checks)
        print(f"\nwrote {path}")
    return traces_df, solvers_df


if __name__ == "__main__":
    main()
