"""Train a replicate of a preset (another seed or image size) and record Table B.2's average row.

Each replicate is trained once (cached like every checkpoint), its evaluation samples are
explained dense, through SPADE with the preset's schedule and with the linear one (results cached,
resumable), and one row is written to ``params/PRESET-replicates.csv``
(``spade_lib.replicates.replicate_row``); chapter B reads that file. Run it under the pinned
settings, as the book is built (``PY=.venv/bin/python``):

    $PY -m spade_lib.reproducibility $PY scripts/replicate.py cpu --seeds 1 2 3
    $PY -m spade_lib.reproducibility $PY scripts/replicate.py cpu --set image_size=64
"""

from __future__ import annotations

import argparse
import time

from spade_lib import config, replicates, results
from spade_lib.train import trained_model


def run(preset: str, overrides: dict, out: str | None) -> None:
    cfg = config.load(preset, **overrides)
    trained = trained_model(cfg)
    if trained.clean_accuracy < results.MIN_ACCURACY:
        raise SystemExit(f"{replicates.label(overrides)}: clean accuracy "
                         f"{100 * trained.clean_accuracy:.1f}% is under "
                         f"{100 * results.MIN_ACCURACY:.0f}% (the model did not learn the task); "
                         "nothing is recorded")
    model = trained.model.to(cfg.torch_device())
    start = time.perf_counter()
    variants = {"dense": None, "spade": cfg.sparsity, "spade-linear": "linear"}
    table = results.evaluate(cfg, model, variants=variants)
    seconds = time.perf_counter() - start
    row = replicates.replicate_row(cfg, overrides, trained.clean_accuracy,
                                   trained.attack_success, table,
                                   trained.seconds, seconds)
    record = replicates.store_row(row, out or replicates.record_path(preset))
    print(record.set_index("replicate").T.to_string(float_format=lambda v: f"{v:.2f}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset")
    parser.add_argument("--seeds", type=int, nargs="*", default=[],
                        help="one replicate per seed (the other overrides apply to each)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (YAML value)")
    parser.add_argument("--out", default=None,
                        help="CSV to write (default params/PRESET-replicates.csv)")
    args = parser.parse_args()
    try:
        overrides = config.parse_overrides(args.set)
    except ValueError as e:
        parser.error(str(e))
    if not args.seeds and not overrides:
        parser.error("give --seeds and/or --set KEY=VALUE: a replicate differs from the preset")
    if args.seeds and "seed" in overrides:
        parser.error("give the seed with --seeds or with --set seed=N, not both")
    for seed in args.seeds or [None]:
        run(args.preset, overrides if seed is None else {"seed": seed, **overrides}, args.out)


if __name__ == "__main__":
    main()
