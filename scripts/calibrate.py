"""Calibrate a preset on DENSE numbers only: train it (cached), then append one row to a CSV.

A row holds the training keys that were varied, clean accuracy, each rule's attack success, the
training time and every method's dense Trojan AUC (both aggregations) on the preset's evaluation
samples. No SPADE map is computed, so no choice made from this table can be tuned on SPADE.

    python scripts/calibrate.py cpu --set trojan_fraction=0.05 --set epochs=9 --note "..."
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import yaml

from spade_lib import config, results
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
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    cfg = config.load(args.preset, **overrides)
    out = Path(args.out or ROOT / "params" / f"{cfg.name}-calibration.csv")

    trained = trained_model(cfg)
    model = trained.model.to(cfg.torch_device())
    start = time.perf_counter()
    table = results.evaluate(cfg, model, variants=("dense",), store=False)
    dense_seconds = time.perf_counter() - start
    row = {
        "variant": ", ".join(f"{k}={v}" for k, v in overrides.items()) or "preset as is",
        "note": args.note,
        "scene": cfg.scene,
        "arch": cfg.arch, "width": cfg.width, "epochs": cfg.epochs, "lr": cfg.lr,
        "lr_step": cfg.lr_step, "trojan_fraction": cfg.trojan_fraction,
        "patch_alpha": cfg.patch_alpha, "random_shift": cfg.random_shift,
        "train_seconds": round(trained.seconds, 1),
        "clean_accuracy": round(100 * trained.clean_accuracy, 2),
    }
    for rule, acc in trained.attack_success.items():
        row[f"attack_{rule}"] = round(100 * acc, 2)
    row["samples"] = table["sample"].nunique()
    for method, rows in table.groupby("method", sort=False):
        row[f"auc_abs_{method}"] = round(100 * rows["auc_abs"].mean(), 2)
        row[f"auc_sum_{method}"] = round(100 * rows["auc_sum"].mean(), 2)
    row["auc_abs_mean"] = round(100 * table.groupby("method")["auc_abs"].mean().mean(), 2)
    row["dense_eval_seconds"] = round(dense_seconds, 1)
    frame = pd.DataFrame([row])
    if out.exists():
        frame = pd.concat([pd.read_csv(out), frame], ignore_index=True)
    frame.to_csv(out, index=False)
    print(frame.tail(1).T.to_string())


if __name__ == "__main__":
    main()
