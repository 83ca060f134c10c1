"""The small evaluation the Dask tests run, built the same way in the test and in a child process.

``python dask_job.py CACHE_DIR STORE_DIR`` runs it on a two-worker local cluster (the child whose
client the kill-and-resume test kills).
"""

from __future__ import annotations

import sys

import torch

from spade_lib import config, data, results
from spade_lib.models import build_model

IDS = list(range(3, 800, 40))  # 20 samples: a run lasts long enough to be killed mid-way
METHODS = ["Saliency"]
VARIANTS = {"dense": None, "spade": 0.9}


def job(cache_dir: str) -> tuple[config.Config, torch.nn.Module, results.Samples]:
    """The config (smoke, 8 views, on the CPU), a random ResNet-20 seeded 0, twenty samples."""
    cfg = config.load("smoke", cache_dir=cache_dir, n_augmentations=8, device="cpu")
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 8, 32).eval()
    model.fc.weight.data.mul_(30.0)
    _, test = data.load_scenes(cfg)
    poisoned = data.poisoned_test(test, cfg.rules, seed=cfg.seed)
    return cfg, model, results.Samples.from_ids(poisoned, test, IDS)


if __name__ == "__main__":
    from spade_lib.distributed import evaluate_distributed

    cfg, model, samples = job(sys.argv[1])
    evaluate_distributed(cfg.replace(workers=2), model, samples, METHODS, VARIANTS,
                         store=sys.argv[2], progress=False)
