"""What pinning the numerical settings costs in training time.

Training on the CPU runs under :data:`spade_lib.reproducibility.PINNED` (AVX2 kernels, 2 threads)
so that its weights do not depend on the machine. This script trains the same short run of a
preset twice under this machine's own settings and twice pinned, alternating, each in a new
process, and prints seconds per optimizer step and the ratio pinned / host.

Example::

    python benchmarks/bench_pinning.py --preset cpu --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pandas as pd

from spade_lib import reproducibility

CHILD = """
import json, sys
from spade_lib import config, reproducibility, train
cfg = config.load(sys.argv[1], train_size=int(sys.argv[2]), epochs=1)
result = train.train(cfg, progress=False)
print(json.dumps({"seconds": result.seconds, **reproducibility.settings()}))
"""


def run(preset: str, images: int, pinned: bool) -> dict:
    env = reproducibility.pinned_env() if pinned else dict(os.environ)
    out = subprocess.run([sys.executable, "-c", CHILD, preset, str(images)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from spade_lib import config

    batch = config.load(args.preset).batch_size
    rows = []
    for repeat in range(args.repeats):
        for pinned in (False, True):
            record = run(args.preset, args.steps * batch, pinned)
            rows.append({"settings": "pinned" if pinned else "host", "repeat": repeat,
                         "capability": record["torch_cpu_capability"],
                         "threads": record["torch_threads"],
                         "s/step": record["seconds"] / args.steps})
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    mean = table.groupby("settings")["s/step"].mean()
    print(f"\n{args.preset}: pinned / host = {mean['pinned'] / mean['host']:.2f} "
          f"(seconds per step {mean['pinned']:.3f} vs {mean['host']:.3f})")


if __name__ == "__main__":
    main()
