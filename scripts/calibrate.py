"""Calibrate a preset on DENSE numbers only: train it (cached), then append one row to a CSV.

A row holds the training keys that were varied, clean accuracy, each rule's attack success, the
training time and every method's dense Trojan AUC (both aggregations) on the preset's evaluation
samples (the schema: ``spade_lib.calibration.record_row``). No SPADE map is computed, so no choice
made from this table can be tuned on SPADE.

    python scripts/calibrate.py cpu --set trojan_fraction=0.05 --set epochs=9 --note "..."
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from spade_lib import calibration, config, results
from spade_lib.train import trained_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (YAML value)")
    parser.add_argument("--note", default="", help="why this variant was tried")
    parser.add_argument("--out", default=None,
                        help="CSV to append to (default params/PRESET-calibration.csv)")
    args = parser.parse_args()
    try:
        overrides = config.parse_overrides(args.set)
    except ValueError as e:
        parser.error(str(e))
    cfg = config.load(args.preset, **overrides)
    out = Path(args.out or ROOT / "params" / f"{cfg.name}-calibration.csv")

    trained = trained_model(cfg)
    model = trained.model.to(cfg.torch_device())
    start = time.perf_counter()
    table = results.evaluate(cfg, model, variants=("dense",), store=False)
    dense_seconds = time.perf_counter() - start
    row = calibration.record_row(cfg, overrides, args.note, trained.seconds,
                                 trained.clean_accuracy, trained.attack_success, table,
                                 dense_seconds)
    frame = pd.DataFrame([row])
    if out.exists():
        frame = pd.concat([pd.read_csv(out), frame], ignore_index=True)
    frame.to_csv(out, index=False)
    print(frame.tail(1).T.to_string())


if __name__ == "__main__":
    main()
