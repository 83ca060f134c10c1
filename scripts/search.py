"""Search a preset's per-group sparsity on its HELD-OUT Trojan model and save the result.

Trains (or loads) the held-out model ``cfg.replace(rules=cfg.tuning_rules)``, runs the greedy
search of Section 3.2 on ``cfg.tuning_samples`` of its Trojan samples and writes
``params/PRESET-search.json``: the schedule, the per-step trace, the held-out model's accuracy and
the times. The evaluation model is never loaded. Copy the printed line into the preset so the main
table uses the found schedule. A full-scale preset (``tuning_rules: null``) has no held-out model:
the search tunes the evaluated model on Trojan copies of training images
(:func:`spade_lib.search.tuning_model`).

    python scripts/search.py cpu
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from spade_lib import config, results, search

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset")
    parser.add_argument("--out", default=None, help="default params/PRESET-search.json")
    args = parser.parse_args()
    cfg = config.load(args.preset)
    out = Path(args.out or ROOT / "params" / f"{cfg.name}-search.json")

    held_out = search.tuning_model(cfg)
    model = held_out.model.to(cfg.torch_device())
    samples = results.tuning_samples(cfg, model)
    start = time.perf_counter()
    found = search.search_sparsity(cfg, model, samples)
    seconds = time.perf_counter() - start
    record = {
        "preset": cfg.name,
        "digest": search.search_digest(cfg),
        "tuning_rules": cfg.tuning_rules,
        "held_out_model": {"clean_accuracy": held_out.clean_accuracy,
                           "attack_success": held_out.attack_success,
                           "train_seconds": held_out.seconds},
        "samples": samples.table.to_dict(orient="list"),
        "search_seconds": seconds,
        "result": found.to_dict(),
    }
    out.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(found.history.to_string())
    print(f"score {found.score:.4f} in {seconds:.0f} s; saved {out}")
    print("preset line:", found.to_yaml().strip())


if __name__ == "__main__":
    main()
