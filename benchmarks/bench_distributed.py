"""Throughput of the evaluation on Dask (spade_lib.distributed) against the serial runner.

The same samples (chapter L's: LRP and Saliency, dense and SPADE) are explained by the serial
runner in this process (``results.evaluate``, the baseline) and by ``evaluate_distributed`` on a
local cluster of 1 and of 2 single-threaded workers, each into a fresh store. Prints samples per
second and the ratio to the serial runner; the cluster's start-up is timed apart (it is paid once
per run, not per sample), and a run's seconds go from its first submission to its last result.

Examples
--------
The cpu preset's model (trained and cached on first use), 16 samples::

    python benchmarks/bench_distributed.py --preset cpu --samples 16
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from spade_lib import config, distributed, reproducibility, results
from spade_lib.samples import evaluation_samples
from spade_lib.train import trained_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--out", type=Path, help="write the table and the machine as JSON")
    args = parser.parse_args()

    cfg = config.load(args.preset)
    model = trained_model(cfg).model.to(cfg.torch_device())
    samples = evaluation_samples(cfg, model, args.samples)
    methods = list(distributed.METHODS)
    variants = {"dense": None, "spade": cfg.sparsity}
    rows = []

    start = time.perf_counter()
    results.evaluate(cfg, model, samples, methods, variants, store=False, progress=False)
    serial = time.perf_counter() - start
    rows.append({"engine": "serial runner", "workers": 1,
                 "threads per worker": torch.get_num_threads(), "samples": len(samples),
                 "start-up s": 0.0, "seconds": serial, "samples/s": len(samples) / serial})

    for n in (int(w) for w in args.workers.split(",")):
        with tempfile.TemporaryDirectory() as store:
            up = time.perf_counter()
            with distributed.connect(cfg, n_workers=n) as client:
                ready = time.perf_counter()
                log = distributed.RunLog()
                distributed.evaluate_distributed(cfg, model, samples, methods, variants,
                                                 store=store, progress=False, client=client,
                                                 log=log)
            speed = log.throughput()
            rows.append({"engine": "Dask LocalCluster", "workers": n, "threads per worker": 1,
                         "samples": speed["samples"], "start-up s": ready - up,
                         "seconds": speed["seconds"], "samples/s": speed["samples_per_second"]})

    table = pd.DataFrame(rows)
    table["vs serial"] = table["samples/s"] / table["samples/s"].iloc[0]
    device = (torch.cuda.get_device_name() if cfg.torch_device() == "cuda"
              else f"CPU, {platform.processor() or platform.machine()}")
    print(f"preset {cfg.name}, {len(samples)} samples, methods {methods}, {device}, "
          f"{reproducibility.settings()['torch_threads']} threads in this process")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    if args.out:
        args.out.write_text(json.dumps({
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "device": device,
            "preset": cfg.name, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
