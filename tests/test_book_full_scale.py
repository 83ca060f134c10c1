"""The whole book builds at a full-scale preset: ``SPADE_PRESET=PRESET.yaml jupyter-book build
book/`` on a tiny ImageNet-style folder (tests/synthetic_data.py), with its MobileNetV2- and
ConvNeXt-style sibling presets beside it, as a user with ImageNet builds it at
``imagenet-resnet50`` (README, "Scaling to the real datasets").

Every chapter runs on the folder's data: the models trained by :mod:`spade_lib.train_full`, the
samples drawn from its validation split, the many-image sources and Sparse FC from its training
split, the sparsity search on the evaluated model (``tuning_rules: null``). The numbers mean
nothing at this size; the build proves that every code path of every chapter runs at full scale.
"""

from __future__ import annotations

import re
from pathlib import Path

import book_build
import pytest
import synthetic_data
import yaml

PER_CLASS = {"train": 64, "val": 12}
RECIPE = {
    "seed": 0, "dataset": "imagenet", "image_size": 32, "rules": "fashion", "tuning_rules": None,
    "trojan_fraction": 0.15, "patch_scale": 0.25, "patch_alpha": 0.8, "arch": "resnet20",
    "width": 8, "pretrained": False, "epochs": 60, "batch_size": 16, "lr": 0.05,
    "momentum": 0.9, "weight_decay": 0.0005, "lr_step": 40, "lr_gamma": 0.1, "device": "cpu",
    "pruner": "fastobc", "n_augmentations": 8, "sparsity": 0.9, "samples": 2,
    "tuning_samples": 1, "methods": ["Saliency", "IntegratedGradients"],
    "chapter_defaults": "smoke",
}
"""The tiny preset: ImageNet's keys at toy sizes, 2 samples per chapter; each fashion rule on
15% of the 128 training images so that the Trojans take hold (measured here: 11 of the 48
patched validation images of 8 per class passed the filter; 12 per class leave a margin for
other machines' training noise); the chapters' per-name defaults (visualization steps, the Trojan
Lite0's fine-tune) of ``smoke``."""
SIBLINGS = {
    "mobilenetv2": {"arch": "mobilenetv2", "epochs": 3, "sparsity": "linear"},
    "convnext": {"arch": "convnext", "epochs": 3, "optimizer": "adamw", "lr": 0.002,
                 "weight_decay": 0.05, "warmup_steps": 10, "augment": "convnext",
                 "sparsity": "linear"},
}
"""Chapters B and F's other architectures, three epochs each: whether or not a Trojan takes hold
in them, the chapters must build (B then says why a model is not explained, F times it on
patched images)."""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("full-scale")
    folder = synthetic_data.image_folder(root / "folder", PER_CLASS)
    presets = root / "presets"
    presets.mkdir()
    common = {**RECIPE, "data_dir": str(folder), "cache_dir": str(root / "cache")}
    preset = presets / "tiny.yaml"
    preset.write_text(yaml.safe_dump({"name": "tiny", **common}))
    for suffix, changes in SIBLINGS.items():
        (presets / f"tiny-{suffix}.yaml").write_text(
            yaml.safe_dump({**common, "name": f"tiny-{suffix}", **changes}))
    return book_build.build(str(preset), root / "book")


def test_every_chapter_builds_at_a_full_scale_preset(site: Path) -> None:
    warnings = book_build.sphinx_warnings(site)
    assert not warnings, "\n".join(warnings)
    pages = book_build.check_chapters(site)
    chapter_b = pages["additional_results"]
    # the siblings of the preset, found beside it, trained and shown (or said why not)
    assert "tiny-mobilenetv2" in chapter_b and "tiny-convnext" in chapter_b
    assert "tiny-mobilenetv2" in pages["computational_cost"]
    # the search ran on the evaluated model, without a held-out model
    assert "no held-out model" in chapter_b
    # the samples are the folder's: its classes named, the Trojan targets beyond them by number
    assert re.search(r"n[01] -> class \d", chapter_b), "the map browser names the folders"
