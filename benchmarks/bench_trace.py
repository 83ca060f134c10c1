"""Time per-sample SPADE traces: spade_lib against the straightforward published algorithm.

Both sides prune the same network for the same photos to the same sparsity with FastOBC and
column-group masks (the paper's setting) and print one table: seconds per sample split into
augmentation, Hessians and solver, peak memory, and the mean relative reconstruction error over
layers (it should agree between the two, since the algorithm is the same).

The baseline is the algorithm as published: per-image augmentation with torchvision transforms,
one forward pass per layer with its whole input unfolded, and the SparseGPT column loop without
lazy blocks (``fastobc_reference`` from ``tests/reference.py``, also the reference the tests
compare the solver with).

Examples
--------
CPU preset model (the default)::

    python benchmarks/bench_trace.py

GPU, torchvision ResNet-50 at 224 px with 1024 augmentations::

    python benchmarks/bench_trace.py --arch tv_resnet50 --image-size 224 \\
        --n-augmentations 1024 --device cuda --num-classes 1000
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spade_lib import pruning, schedules
from spade_lib.hessians import conv_columns
from spade_lib.trace import trace, trace_batch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import fastobc_reference  # noqa: E402 (the readable solver, shared with the tests)

# --------------------------------------------------------------------------------------------
# The straightforward implementation (baseline)
# --------------------------------------------------------------------------------------------


def naive_augment(image: Tensor, n: int, seed: int) -> Tensor:
    """The SPADE recipe with torchvision transforms, one image at a time on the CPU."""
    from torchvision.transforms import v2

    torch.manual_seed(seed)
    size = list(image.shape[-2:])
    recipe = v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=0.5, hue=0.3),
    ])
    cpu = image.cpu()
    return torch.stack([recipe(cpu) for _ in range(n)]).to(image.device)


def naive_hessians(model: nn.Module, batches: list[Tensor], layers: list[str]) -> dict:
    """One full forward pass per layer; that layer's whole input unfolded, ``H = 2/N X^T X``."""
    modules = dict(model.named_modules())
    out = {}
    for name in layers:
        module, parts = modules[name], []

        def keep(_m: nn.Module, inputs: tuple[Tensor, ...], _o: Tensor, parts=parts) -> None:
            parts.append(inputs[0].detach())

        handle = module.register_forward_hook(keep)
        try:
            for batch in batches:
                model(batch)
        finally:
            handle.remove()
        x = torch.cat(parts)
        if isinstance(module, nn.Conv2d):
            x = conv_columns(module, x).transpose(1, 2).flatten(0, 1)
        else:
            x = x.reshape(-1, x.shape[-1])
        out[name] = 2 * x.T @ x / x.shape[0]
    return out


@torch.no_grad()
def naive_trace(model: nn.Module, image: Tensor, sparsity: schedules.SparsitySpec,
                n_augmentations: int,
                batch_size: int, seed: int) -> tuple[list[float], dict[str, float]]:
    """Prune a copy of ``model`` for ``image`` the straightforward way; (errors, timings)."""
    device = next(model.parameters()).device
    clock: dict[str, float] = {}
    t = _now(device)
    aug = naive_augment(image, n_augmentations, seed)
    clock["augment"] = _now(device) - t
    pruned = _copy_eval(model)
    targets = {k: v for k, v in schedules.resolve_sparsity(pruned, sparsity).items() if v > 0}
    layers = list(targets)
    t = _now(device)
    stats = naive_hessians(pruned, list(aug.split(batch_size)), layers)
    clock["hessians"] = _now(device) - t
    modules = dict(pruned.named_modules())
    errors = []
    t = _now(device)
    for name in layers:
        weight = modules[name].weight
        new = fastobc_reference(weight, stats[name], targets[name])
        err, ref = pruning.reconstruction_errors(weight, new[None], stats[name][None])
        errors.append(err[0] / ref[0])
        weight.copy_(new)
    clock["solve"] = _now(device) - t
    clock["total"] = sum(clock.values())
    return errors, clock


# --------------------------------------------------------------------------------------------
# Measurement helpers
# --------------------------------------------------------------------------------------------

def _spec(text: str) -> schedules.SparsitySpec:
    """A sparsity given on the command line: a float, ``preset:NAME`` (that preset's sparsity),
    else a config schedule string."""
    if text.startswith("preset:"):
        from spade_lib import config

        return config.load(text.split(":", 1)[1]).sparsity
    try:
        return float(text)
    except ValueError:
        return text


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _copy_eval(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).eval()


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or sampled process RSS growth on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_mb = device, float("nan")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        self.base = self.top = self._rss()
        self.running = True

        def sample() -> None:
            while self.running:
                self.top = max(self.top, self._rss())
                time.sleep(0.002)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
            return
        self.running = False
        self.thread.join()
        self.peak_mb = (max(self.top, self._rss()) - self.base) / 2**20


def photos(count: int, size: int) -> Tensor:
    """``count`` real photos (scikit-image's samples) resized to ``size``, or noise without it."""
    try:
        from skimage import data
        names = ["astronaut", "chelsea", "coffee", "rocket", "cat", "immunohistochemistry"]
        imgs = [torch.from_numpy(getattr(data, names[i % len(names)])().copy()).permute(2, 0, 1)
                for i in range(count)]
    except Exception:  # scikit-image or its sample files missing: timings do not need photos
        return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(0))
    out = []
    for img in imgs:
        side = min(img.shape[1:])
        img = img[:, :side, :side].float()[None] / 255
        out.append(F.interpolate(img, size=(size, size), mode="bilinear", antialias=True)[0])
    return torch.stack(out).clamp(0, 1)


def _build(arch: str, num_classes: int, width: int, image_size: int) -> nn.Module:
    from spade_lib.models import build_model

    return build_model(arch, num_classes=num_classes, width=width, image_size=image_size)


def _run(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    with PeakMemory(device) as mem:
        result = fn()
    return result, mem.peak_mb


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """Parse arguments, run both implementations on the same samples, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="resnet18", help="spade_lib.models arch (resnet18)")
    parser.add_argument("--width", type=int, default=16, help="width of the small models (16)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--n-augmentations", type=int, default=256)
    parser.add_argument("--sparsity", type=_spec, default=0.9,
                        help="a float for every default layer (0.9), or a config schedule such "
                             "as 'linear' or 'only:layers.3,fc:0.9'")
    parser.add_argument("--batch-size", type=int, default=256, help="forward batch size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--skip-baseline", action="store_true", help="only time spade_lib")
    parser.add_argument("--out", default=None,
                        help="also write the table, device and date to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = _build(args.arch, args.num_classes, args.width, args.image_size).to(device).eval()
    images = photos(args.samples + 1, args.image_size).to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"device: {name} ({torch.get_num_threads()} CPU threads, load average {load} before "
          f"the run); {args.arch} at "
          f"{args.image_size} px, {len(schedules.default_layers(model))} layers, "
          f"{args.n_augmentations} augmentations, sparsity {args.sparsity}, "
          f"{args.samples} samples (after one warm-up sample)")

    common = dict(sparsity=args.sparsity, n_augmentations=args.n_augmentations,
                  batch_size=args.batch_size)
    rows = []
    trace(model, images[-1], **common)
    if not args.skip_baseline:
        naive_trace(model, images[-1], args.sparsity, args.n_augmentations, args.batch_size, 0)
    for i in range(args.samples):  # interleaved, so that a change in machine load hits both
        tr, mem = _run(lambda i=i: trace(model, images[i], seed=i, **common), device)
        rows.append({"implementation": "spade_lib.trace", **tr.timings, "peak_MB": mem,
                     "rel_error": tr.report.rel_error.mean()})
        if not args.skip_baseline:
            (errors, timings), mem = _run(
                lambda i=i: naive_trace(model, images[i], args.sparsity, args.n_augmentations,
                                        args.batch_size, i), device)
            rows.append({"implementation": "straightforward (published)", **timings,
                         "peak_MB": mem, "rel_error": sum(errors) / len(errors)})
    if args.samples > 1:
        traces, mem = _run(lambda: trace_batch(model, images[:-1], **common), device)
        for tr in traces:
            rows.append({"implementation": f"spade_lib.trace_batch (x{args.samples})",
                         **tr.timings, "peak_MB": mem, "rel_error": tr.report.rel_error.mean()})
    table = pd.DataFrame(rows).groupby("implementation", sort=False).mean()
    table = table[["augment", "hessians", "solve", "total", "peak_MB", "rel_error"]]
    print("seconds per sample (mean over samples), peak memory of one call, mean relative "
          "reconstruction error over layers")
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    if not args.skip_baseline:
        ratio = table.total["straightforward (published)"] / table.total["spade_lib.trace"]
        print(f"speed-up of spade_lib.trace over the straightforward implementation: {ratio:.1f}x")
    if args.samples > 1:
        batch = table.total[f"spade_lib.trace_batch (x{args.samples})"]
        print(f"trace_batch throughput: {1 / batch:.2f} samples/s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "device": name, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "arch": args.arch, "image_size": args.image_size,
            "n_augmentations": args.n_augmentations, "sparsity": str(args.sparsity),
            "samples": args.samples,
            "seconds_per_sample": table.reset_index().to_dict("records")}, indent=1) + "\n")
        print(f"written to {args.out}")
    return table


if __name__ == "__main__":
    main()
