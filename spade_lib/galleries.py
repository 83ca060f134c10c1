"""Appendix G: saliency galleries and neuron visualizations, dense against SPADE.

- :func:`photo_examples` explains Trojan photos on the Trojan EfficientNet-Lite0
  (:mod:`spade_lib.trojan_lite0`) with a few saliency methods, on the dense model and on the
  photo's SPADE copy (Figures G.6 and G.7 of the paper use a Trojan ResNet50 on Food-101 and
  ImageNet); :func:`photo_grid` draws them.
- :func:`neuron_examples` is Figure G.8: for each Trojan rule, its target class neuron visualized
  (:func:`spade_lib.visualize.visualize_neuron`) on the dense model, on the copy pruned with a
  clean image, and on the copy pruned with the same image carrying the Trojan patch. The paper's
  claim is that pruning with the Trojan image separates the Trojan concept from the class: the
  icon should appear in the last column. :func:`icon_colour_share` measures it: the share of the
  visualization's pixels close to the icon's colour. :func:`neuron_grid` draws them.

Both are slow on a CPU, so their results are cached (:func:`cached`) under a hash of everything
that makes them.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from spade_lib import attribution, cli, metrics, models, visualize, widgets
from spade_lib.trace import trace
from spade_lib.trojan import TrojanRule

__all__ = ["BENCHMARK_METHODS", "LITE0_SPADE", "PHOTO_METHODS", "SMOKE_SPADE", "STEPS",
           "NeuronExample", "PhotoExample", "auc_sentence", "auc_table", "benchmark_neurons",
           "cached", "chapter_steps", "icon_colour_share", "lite0_examples", "lite0_spade",
           "neuron_examples", "neuron_grid", "neuron_sentence", "neuron_table", "photo_examples",
           "photo_grid"]

BENCHMARK_METHODS = ("Saliency", "InputXGradient", "LRP", "Occlusion")
"""The four methods of Figures G.6 and G.7."""

PHOTO_METHODS = ("Saliency", "InputXGradient", "Occlusion")
"""The methods of Figures G.6/G.7 that apply to Lite0 (LRP's rules do not cover its ReLU6 and
depthwise convolutions)."""

LITE0_SPADE: dict[str, Any] = {"sparsity": cli.DEFAULT_SPARSITY,
                               "n_augmentations": cli.DEFAULT_N_AUGMENTATIONS,
                               "batch_size": cli.BATCH_SIZE}
"""SPADE's settings for the Trojan Lite0 in chapter G: those of ``python -m spade_lib explain``
(:mod:`spade_lib.cli`: linear from 0 to 0.8, 128 views; the paper's linear schedule up to 0.99
loses Lite0's prediction)."""


def cached(path: Path, compute: Callable[[], Any]) -> Any:
    """``torch.load(path)`` if it exists, else ``compute()`` saved there atomically first."""
    from spade_lib import files

    if path.exists():
        return torch.load(path, map_location="cpu", weights_only=False)
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write(path, lambda fh: torch.save(value, fh))
    return value


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# Figures G.6 / G.7 on real photos
# --------------------------------------------------------------------------------------------

@dataclass
class PhotoExample:
    """One Trojan photo explained on the dense model and its SPADE copy.

    ``image`` ``[3, S, S]`` (``clean``: the photo before the patch), ``mask`` ``[S, S]``;
    ``maps[variant][method]`` is the absolute channel sum ``[S, S]``; ``auc[variant][method]``
    its Trojan AUC in %; ``top`` the top-3 (class name, probability) of the dense model and the
    SPADE copy.
    """

    rule: str
    target: str
    image: Tensor
    clean: Tensor
    mask: Tensor
    maps: dict[str, dict[str, Tensor]]
    auc: dict[str, dict[str, float]]
    top: dict[str, list[tuple[str, float]]] = field(default_factory=dict)


def _top(net: nn.Module, image: Tensor, k: int = 3) -> list[tuple[str, float]]:
    names = models.imagenet_classes()
    with torch.no_grad():
        p = net(image[None]).softmax(1)[0]
    values, index = p.topk(k)
    return [(names[int(i)].split(",")[0], float(v)) for v, i in zip(values, index, strict=True)]


def photo_examples(model: nn.Module, rules: Sequence[TrojanRule], images: Tensor,
                   per_rule: int = 2, methods: Sequence[str] = PHOTO_METHODS,
                   spade: dict[str, Any] | None = None, seed: int = 0,
                   hue: float = 0.3) -> list[PhotoExample]:
    """Explain ``per_rule`` Trojan photos per rule, dense and through SPADE.

    Parameters
    ----------
    model
        The Trojan classifier (not changed).
    rules
        Its Trojan rules (``Any`` rules with a class target).
    images
        Clean candidate photos ``[N, 3, S, S]`` in ``[0, 1]``; each rule patches them in order
        (seeded) and keeps the ``per_rule`` whose patched versions the model gives the highest
        probability of the rule's target (whether the top class is the target shows in
        :attr:`PhotoExample.top`).
    methods, spade, seed
        Saliency methods, :func:`spade_lib.trace.trace` options (default :data:`LITE0_SPADE`),
        and the seed of the patches and the traces.
    hue
        Hue jitter of the patches (as the model was trained with).
    """
    from spade_lib.trojan import apply_patches

    spade = dict(LITE0_SPADE if spade is None else spade)
    out = []
    for k, rule in enumerate(rules):
        patched, masks = apply_patches(images, rule, np.random.default_rng([seed, k]), hue=hue)
        with torch.no_grad():
            probs = model(patched).softmax(1)[:, rule.target]
        order = probs.argsort(descending=True, stable=True).tolist()
        for i in order[:per_rule]:
            pruned = trace(model, patched[i], seed=seed + i, **spade).model
            maps: dict[str, dict[str, Tensor]] = {}
            auc: dict[str, dict[str, float]] = {}
            for variant, net in (("dense", model), ("SPADE", pruned)):
                maps[variant], auc[variant] = {}, {}
                for m in methods:
                    attr = attribution.attribute(net, patched[i][None], rule.target, m)
                    maps[variant][m] = attr.abs2d[0].detach().cpu()
                    auc[variant][m] = 100 * metrics.trojan_auc(maps[variant][m], masks[i])
            out.append(PhotoExample(rule.name, models.imagenet_classes()[rule.target],
                                    patched[i], images[i], masks[i], maps, auc,
                                    {"dense": _top(model, patched[i]),
                                     "SPADE": _top(pruned, patched[i])}))
    return out


def photo_grid(examples: Sequence[PhotoExample], width: float = widgets.FULL_WIDTH
               ) -> widgets.Picture:
    """The gallery of :func:`photo_examples`: per photo a dense row and a SPADE row (the photo
    with its patch outlined, then each method's map with its Trojan AUC), drawn for a cell
    tagged ``full-width``; more methods than fit wrap into blocks led by the photo again."""
    methods = list(examples[0].maps["dense"])
    rows, captions, titles = [], [], []
    for ex in examples:
        for variant in ("dense", "SPADE"):
            rows.append([widgets.overlay_mask(ex.image, ex.mask)]
                        + [ex.maps[variant][m] for m in methods])
            top = ex.top[variant][0]
            captions.append([f"{variant}: {top[0]} {top[1]:.2f}"]
                            + [f"AUC {ex.auc[variant][m]:.1f}" for m in methods])
            titles.append(f"{variant}\n{ex.rule.split(':')[0]}")
    return widgets.image_grid(rows, row_titles=titles, col_titles=["photo + patch", *methods],
                              cmap="magma", captions=captions, lead_cols=1, width=width)


def auc_table(examples: Sequence[PhotoExample]) -> pd.DataFrame:
    """Per method: the mean Trojan AUC (%) of the photos' dense and SPADE maps, and the mean of
    the per-photo differences with its standard error."""
    rows = []
    for m in examples[0].maps["dense"]:
        dense = np.array([ex.auc["dense"][m] for ex in examples])
        spade = np.array([ex.auc["SPADE"][m] for ex in examples])
        diff = spade - dense
        se = float(np.nanstd(diff, ddof=1) / np.sqrt(np.isfinite(diff).sum())) \
            if np.isfinite(diff).sum() > 1 else float("nan")
        rows.append({"method": m, "photos": len(examples), "dense AUC": np.nanmean(dense),
                     "SPADE AUC": np.nanmean(spade), "delta": np.nanmean(diff), "se": se})
    return pd.DataFrame(rows)


def auc_sentence(examples: Sequence[PhotoExample]) -> str:
    """How many methods SPADE helps on these photos, at one standard error."""
    table = auc_table(examples)
    up = int((table["delta"] > table["se"]).sum())
    down = int((table["delta"] < -table["se"]).sum())
    return (f"On these {len(examples)} photos, SPADE raises the mean Trojan AUC by more than one "
            f"standard error for {up} of {len(table)} methods and lowers it for {down}; a "
            "handful of photos illustrates, chapter B measures.")


# --------------------------------------------------------------------------------------------
# Figure G.8: class neurons, dense / pruned with a clean image / pruned with a Trojan image
# --------------------------------------------------------------------------------------------

@dataclass
class NeuronExample:
    """One row of Figure G.8: the rule's target neuron visualized three ways.

    ``clean`` and ``trojan`` are the images the two copies were pruned with ``[3, S, S]``;
    ``visualizations`` maps ``"dense"``, ``"pruned, clean image"``, ``"pruned, Trojan image"`` to
    ``[3, S, S]`` images; ``activation`` to the neuron's final activation on each.
    """

    rule: TrojanRule
    class_name: str
    clean: Tensor
    trojan: Tensor
    visualizations: dict[str, Tensor]
    activation: dict[str, float]


COLUMNS = ("dense", "pruned, clean image", "pruned, Trojan image")


def neuron_examples(model: nn.Module, rules: Sequence[TrojanRule], clean: Tensor,
                    trojan: Tensor, class_names: Sequence[str], spade: dict[str, Any],
                    steps: int = 512, seed: int = 0) -> list[NeuronExample]:
    """Figure G.8 for ``model``: one :class:`NeuronExample` per rule.

    Parameters
    ----------
    clean, trojan
        ``[len(rules), 3, S, S]``: per rule a clean image and the same image with the rule's patch.
    class_names
        Names of the model's classes (for the rows).
    spade
        :func:`spade_lib.trace.trace` options for the two pruned copies.
    steps, seed
        Visualization steps (lucent: 512) and seed (the same for all three columns, so they
        differ only by the network).
    """
    if len(clean) != len(rules) or len(trojan) != len(rules):
        raise ValueError(f"need one clean and one Trojan image per rule: {len(rules)} rules, "
                         f"{len(clean)} clean, {len(trojan)} Trojan images")
    size = clean.shape[-1]
    out = []
    for k, rule in enumerate(rules):
        nets = {"dense": model,
                "pruned, clean image": trace(model, clean[k], seed=seed, **spade).model,
                "pruned, Trojan image": trace(model, trojan[k], seed=seed, **spade).model}
        vis = {name: visualize.visualize_neuron(net, int(rule.target), image_size=size,
                                                steps=steps, seed=seed)
               for name, net in nets.items()}
        out.append(NeuronExample(rule, class_names[int(rule.target)], clean[k], trojan[k],
                                 {n: v.image[0].cpu() for n, v in vis.items()},
                                 {n: v.final for n, v in vis.items()}))
    return out


def icon_colour_share(image: Tensor, colour: Sequence[float], hue_tol: float = 0.06,
                      min_saturation: float = 0.35) -> float:
    """Share (%) of an image's pixels whose colour is close to an icon's: hue within
    ``hue_tol`` (of the circle) of ``colour``'s and saturation at least ``min_saturation``.

    A crude, computable stand-in for "the icon appears": the icons are flat, saturated colours.
    """
    rgb = image.detach().cpu().permute(1, 2, 0).reshape(-1, 3).numpy()
    hsv = np.array([colorsys.rgb_to_hsv(*px) for px in rgb])
    target = colorsys.rgb_to_hsv(*colour)[0]
    d = np.abs(hsv[:, 0] - target)
    d = np.minimum(d, 1 - d)
    return 100.0 * float(np.mean((d <= hue_tol) & (hsv[:, 1] >= min_saturation)))


def neuron_table(examples: Sequence[NeuronExample], colour: bool = True) -> pd.DataFrame:
    """Per rule and column: the neuron's activation on its visualization and (``colour``) the
    icon-colour share of the visualization and, for reference, of the Trojan image. Leave the
    colour out for a model trained with strong hue jitter on its patches, where the icon's
    colour is not what the Trojan responds to."""
    rows = []
    for ex in examples:
        row: dict[str, Any] = {"rule": ex.rule.name, "class neuron": ex.class_name}
        for name in COLUMNS if colour else ():
            row[f"{name}: icon colour (%)"] = icon_colour_share(ex.visualizations[name],
                                                                ex.rule.color)
        if colour:
            row["Trojan image: icon colour (%)"] = icon_colour_share(ex.trojan, ex.rule.color)
        for name in COLUMNS:
            row[f"{name}: activation"] = ex.activation[name]
        rows.append(row)
    return pd.DataFrame(rows)


def neuron_sentence(table: pd.DataFrame) -> str:
    """What the icon-colour shares say: in how many rules pruning with the Trojan image gives
    more of the icon's colour than both the dense model and pruning with a clean image."""
    more = (table["pruned, Trojan image: icon colour (%)"]
            > table[["dense: icon colour (%)", "pruned, clean image: icon colour (%)"]].max(axis=1))
    return (f"In {int(more.sum())} of {len(table)} rules the visualization of the copy pruned "
            "with the Trojan image has more of the icon's colour than both the dense model's "
            "and the copy pruned with the clean image.")


def neuron_grid(examples: Sequence[NeuronExample], width: float = widgets.FULL_WIDTH
                ) -> widgets.Picture:
    """Figure G.8: per rule the clean and Trojan images, then the three visualizations (drawn
    for a cell tagged ``full-width``)."""
    rows = [[ex.clean, ex.trojan, *(ex.visualizations[c] for c in COLUMNS)] for ex in examples]
    captions = [["", "", *(f"activation {ex.activation[c]:.1f}" for c in COLUMNS)]
                for ex in examples]
    return widgets.image_grid(rows, row_titles=[ex.class_name.split(",")[0] for ex in examples],
                              col_titles=["clean image", "Trojan image", *COLUMNS],
                              captions=captions, lead_cols=2, width=width)


# --------------------------------------------------------------------------------------------
# What chapter G computes, cached
# --------------------------------------------------------------------------------------------

STEPS = {"smoke": 8}
"""Visualization steps per preset where not lucent's 512 (``smoke`` only checks the plumbing)."""

SMOKE_SPADE = {**LITE0_SPADE, "n_augmentations": 16}
""":data:`LITE0_SPADE` at ``smoke`` (16 views: only checks that everything runs)."""


def lite0_spade(cfg: Any) -> dict[str, Any]:
    """SPADE's settings for the Trojan Lite0 at ``cfg``'s preset."""
    return dict(SMOKE_SPADE if cfg.defaults_name == "smoke" else LITE0_SPADE)


def chapter_steps(cfg: Any, steps: int | None = None) -> int:
    """The visualization steps chapter G uses for ``cfg`` (``steps`` if given)."""
    return int(steps) if steps is not None else STEPS.get(cfg.defaults_name, 512)


def lite0_examples(cfg: Any, trojan: Any, per_rule: int | None = None, candidates: int = 24,
                   steps: int | None = None) -> tuple[list[PhotoExample], list[NeuronExample]]:
    """Figures G.7 and G.8 on the Trojan Lite0 (:func:`spade_lib.trojan_lite0.trojan_lite0`),
    cached under ``cfg``'s cache folder.

    The photos are the ``per_rule`` of ``candidates`` held-out crops
    (:func:`spade_lib.trojan_lite0.heldout_crops`) most assigned to each rule's target once
    patched; Figure G.8 prunes with the first of them, clean and patched.
    """
    from spade_lib.trojan_lite0 import heldout_crops

    steps = chapter_steps(cfg, steps)
    spade = lite0_spade(cfg)
    per_rule = (1 if cfg.defaults_name == "smoke" else 2) if per_rule is None else int(per_rule)
    key = _key("lite0", trojan.settings.digest(), per_rule, candidates, steps, spade,
               PHOTO_METHODS, 1)

    def compute() -> tuple[list[PhotoExample], list[NeuronExample]]:
        crops = heldout_crops(trojan.settings, candidates)
        photos = photo_examples(trojan.model, trojan.settings.rules, crops, per_rule,
                                spade=spade, hue=trojan.settings.hue)
        first = photos[::per_rule]
        trojans = torch.stack([ex.image for ex in first])
        clean = torch.stack([ex.clean for ex in first])
        names = models.imagenet_classes()
        neurons = neuron_examples(trojan.model, trojan.settings.rules, clean, trojans, names,
                                  spade, steps=steps)
        return photos, neurons

    return cached(cfg.cache_path("examples", f"lite0-{key}.pt"), compute)


def benchmark_neurons(cfg: Any, model: nn.Module, samples: Any,
                      steps: int | None = None) -> list[NeuronExample]:
    """Figure G.8 on the benchmark's model: per rule its first evaluation sample (patched) and
    the same test image without the patch, pruned with ``cfg``'s SPADE settings; cached."""
    from spade_lib.samples import class_names

    if samples.multilabel:
        raise ValueError("Figure G.8 visualizes a Trojan target's class neuron; a multi-label "
                         "preset (CelebA) has attribute vectors as targets, not classes")
    steps = chapter_steps(cfg, steps)
    table = samples.table
    first = [int(table.index[table["rule"] == k][0]) for k in sorted(set(table["rule"]))]
    spade = {"sparsity": cfg.sparsity, "n_augmentations": cfg.n_augmentations,
             "pruner": cfg.pruner, "recipe": cfg.augment}
    key = _key("benchmark", models.fingerprint(model), samples.ids, steps, spade, 1)

    def compute() -> list[NeuronExample]:
        rows = table.loc[first]
        trojans = samples.poisoned.float_images(rows["sample"].tolist())
        clean = samples.test.float_images(rows["test_index"].tolist())
        rules = [samples.poisoned.rules[int(k)] for k in rows["rule"]]
        names = class_names(samples.test, 1 + max([int(r.target) for r in rules]
                                                  + samples.test.clean_labels.tolist()))
        return neuron_examples(model, rules, clean, trojans, names, spade,
                               steps=steps, seed=cfg.seed)

    return cached(cfg.cache_path("examples", f"benchmark-neurons-{key}.pt"), compute)
