"""Building the book in a test: the tiny full-scale preset it is built at (a synthetic image
folder with sibling presets beside it), the ``jupyter-book build`` call, the chapters and what
each page must show (tests/test_book_browser.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import synthetic_data
import yaml

ROOT = Path(__file__).resolve().parent.parent

CHAPTERS = ("saliency_methods", "additional_results", "hyperparameters", "ablation",
            "gradient_noise", "computational_cost", "examples", "human_evaluation", "fastobc",
            "fidelity", "mask_agreement", "full_evaluation")
"""The chapters A to L, by file name (book/_toc.yml)."""


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
"""The tiny preset: ImageNet's keys at toy sizes, two samples per chapter (chapter B's map browser
offers both); each fashion rule on 15% of the 128 training images so that the Trojans take hold
(measured here: 11 of the 48 patched validation images of 8 per class passed the filter; 12 per
class leave a margin for other machines' training noise); the chapters' per-name defaults
(visualization steps, the Trojan Lite0's fine-tune) of ``smoke``."""
SIBLINGS = {
    "mobilenetv2": {"arch": "mobilenetv2", "epochs": 3, "sparsity": "linear"},
    "convnext": {"arch": "convnext", "epochs": 3, "optimizer": "adamw", "lr": 0.002,
                 "weight_decay": 0.05, "warmup_steps": 10, "augment": "convnext",
                 "sparsity": "linear"},
}
"""Chapters B and F's other architectures, three epochs each: whether or not a Trojan takes hold
in them, the chapters must build (B then says why a model is not explained, F times it on
patched images)."""




def full_scale_preset(root: Path) -> Path:
    """Write the tiny full-scale preset under ``root``: the synthetic image folder
    (:func:`synthetic_data.image_folder`), ``presets/tiny.yaml`` and its sibling presets beside
    it (``tiny-mobilenetv2.yaml``, ``tiny-convnext.yaml``), the cache in ``root/cache``; returns
    the preset's path."""
    folder = synthetic_data.image_folder(root / "folder", PER_CLASS)
    presets = root / "presets"
    presets.mkdir(parents=True, exist_ok=True)
    common = {**RECIPE, "data_dir": str(folder), "cache_dir": str(root / "cache")}
    preset = presets / "tiny.yaml"
    preset.write_text(yaml.safe_dump({"name": "tiny", **common}))
    for suffix, changes in SIBLINGS.items():
        (presets / f"tiny-{suffix}.yaml").write_text(
            yaml.safe_dump({**common, "name": f"tiny-{suffix}", **changes}))
    return preset


def build(preset: str, out: Path, **env: str) -> Path:
    """``jupyter-book build book/`` at ``preset`` (``SPADE_PRESET``) into ``out``, with extra
    environment variables ``env``; returns the HTML folder. The build log is ``out/build.log``."""
    jb = Path(sys.executable).parent / "jupyter-book"
    proc = subprocess.run([str(jb), "build", str(ROOT / "book"), "--path-output", str(out)],
                          cwd=ROOT, env={**os.environ, "SPADE_PRESET": preset, **env},
                          capture_output=True, text=True, timeout=1800)
    (out / "build.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    html = out / "_build" / "html"
    assert (html / "index.html").exists()
    return html


def sphinx_warnings(html: Path) -> list[str]:
    """The build's Sphinx warnings and errors (a failed cell is one: "Executing notebook failed");
    Sphinx's format is ``file:line: WARNING: ...`` or ``WARNING: ...``; the kernels' own log lines
    (``[IPKernelApp] WARNING | ...``) are not about the book."""
    log = (html.parent.parent / "build.log").read_text()
    return [line for line in log.splitlines()
            if re.search(r"(^|: )(WARNING|ERROR|CRITICAL): ", line)]


def check_chapters(site: Path) -> dict[str, str]:
    """Every chapter was built without a traceback and shows its paper's tables and figures;
    returns the pages' HTML by chapter."""
    pages = {name: (site / f"{name}.html").read_text() for name in CHAPTERS}
    for name, page in pages.items():
        assert "Traceback" not in page, name
    assert "Table B.2" in pages["additional_results"]
    assert "Table A.1" in pages["saliency_methods"]
    assert "Figure E.5" in pages["gradient_noise"]
    assert "Table F.15" in pages["computational_cost"]
    assert "Table J.18" in pages["fidelity"]
    assert "Figure K.11" in pages["mask_agreement"]
    full = pages["full_evaluation"]
    assert "Table L.19" in full and "pass the filter" in full and "Verdict" in full
    fobc = pages["fastobc"]
    assert "Table I.16" in fobc and "Table I.17" in fobc and "mask group" in fobc
    ablation = pages["ablation"]
    assert all(f"Table D.1{k}" in ablation for k in (1, 2, 3, 4)) and "Figure D.4" in ablation
    examples = pages["examples"]
    assert "Figure G.8" in examples and "icon colour" in examples and "Trojan Lite0" in examples
    human = pages["human_evaluation"]
    assert "No human answers exist yet" in human and "automatic rater" in human
    return pages
