"""The human study of Appendix H: its tasks, an automatic rater, and the analysis of answers.

Each task shows a rater four images: a Trojan test image, the visualization of one class neuron
(:func:`spade_lib.visualize.visualize_neuron`), and two crops of the image, one of them the region
that Score-CAM (Wang et al. 2020, ``grad-cam``'s ``ScoreCAM``) marks for that neuron on the dense
model. The rater picks the crop that matches the visualization, or declines. As in the paper, the
tasks are every combination of ``n`` samples x 2 class neurons (the sample's correct class and the
class the dense model predicts, which is the Trojan target) x 2 visualizations (of the dense
model, and of the sample's SPADE copy: :func:`spade_lib.variants.variant_network` with the
preset's sparsity, the network chapter B explains); the Score-CAM crop is on the left in exactly
half of them (of each neuron kind and visualization; one more on one side when ``n`` is odd).

- The dense model's visualization of a class neuron does not depend on the sample: it is made
  once per class. The SPADE copy's is made per sample and neuron.
- The crop marked by Score-CAM is the square window (a third of the image side, so that a window
  that does not overlap it always exists) with the largest mean of the map; the other crop is the
  window with the smallest mean among those that do not overlap it.
- :func:`build_tasks` writes the folder that :mod:`spade_lib.study` serves (``tasks.csv``,
  ``images/``, ``example/``, ``meta.json``); it is built once and cached under a hash of what
  made it.
- No human answers exist for this benchmark. :func:`automatic_rater` answers the tasks the way a
  simple observer would (it picks the crop whose features under the dense model are closer to
  the visualization's, and declines when the two are within ``margin``); its answers are labelled
  as such wherever they are shown. :func:`accuracy_table` analyses any answers table (people's,
  from ``python -m spade_lib.study export``, or the automatic rater's).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from spade_lib import samples as samples_mod
from spade_lib import train, variants, visualize, widgets
from spade_lib.config import Config
from spade_lib.hessians import eval_mode
from spade_lib.study import NEURON_KINDS, TASK_COLUMNS, VISUALIZATIONS

__all__ = ["KINDS", "STEPS", "TASK_COLUMNS", "VISUALIZATIONS", "accuracy_table",
           "automatic_rater", "build_tasks", "crop_windows", "dense_visualizations",
           "paired_difference", "score_cam",
           "study_sentence", "task_figure", "task_images",
           "wilson_interval"]

KINDS = NEURON_KINDS
"""The two class neurons of a sample: its correct (clean) class and the dense prediction."""
STEPS = {"smoke": 24}
"""Visualization steps per preset where not lucent's 512 (``smoke`` only checks the plumbing)."""
DISPLAY = 4
"""The PNGs are the images enlarged this many times with nearest-neighbour sampling."""
VERSION = 3


# --------------------------------------------------------------------------------------------
# Score-CAM and the two crops
# --------------------------------------------------------------------------------------------

def _last_conv_block(model: nn.Module) -> nn.Module:
    """The module whose output Score-CAM weighs: the last child module that holds a conv and is
    followed only by pooling / the head (for the ResNets: the last stage)."""
    if hasattr(model, "layers") and isinstance(model.layers, nn.Sequential):
        return model.layers[-1]
    if hasattr(model, "features"):
        return model.features[-1]
    raise ValueError(f"no last convolutional block known for {type(model).__name__}; "
                     "models with a .layers or .features Sequential are supported")


def score_cam(model: nn.Module, image: Tensor, neurons: Sequence[int]) -> Tensor:
    """Score-CAM maps of ``image`` for each class neuron, ``[len(neurons), H, W]`` in ``[0, 1]``.

    Uses ``grad-cam``'s ``ScoreCAM`` (pinned 1.5.7) on the model's last convolutional block;
    its hooks are released whatever happens (its own ``with`` block would swallow errors).
    """
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = ScoreCAM(model=model, target_layers=[_last_conv_block(model)])
    try:
        batch = image[None].expand(len(neurons), -1, -1, -1).contiguous()
        maps = cam(input_tensor=batch, targets=[ClassifierOutputTarget(int(c)) for c in neurons])
    finally:
        cam.activations_and_grads.release()
    return torch.as_tensor(np.asarray(maps), dtype=torch.float32)


def crop_windows(cam: Tensor, side: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The ``(top, left)`` of the window of ``side`` pixels with the largest mean of ``cam``
    ``[H, W]``, and of the window with the smallest mean among those that do not overlap it."""
    means = F.avg_pool2d(cam[None, None], side, stride=1)[0, 0]
    best = divmod(int(means.argmax()), means.shape[1])
    tops = torch.arange(means.shape[0])[:, None]
    lefts = torch.arange(means.shape[1])[None, :]
    apart = ((tops - best[0]).abs() >= side) | ((lefts - best[1]).abs() >= side)
    if not apart.any():
        raise ValueError(f"windows of {side} px cannot avoid each other in a {tuple(cam.shape)} "
                         "map; a side of at most a third of the image always leaves room")
    other = divmod(int(means.masked_fill(~apart, math.inf).argmin()), means.shape[1])
    return best, other


def _crop(image: Tensor, corner: tuple[int, int], side: int) -> Tensor:
    crop = image[:, corner[0]:corner[0] + side, corner[1]:corner[1] + side]
    return F.interpolate(crop[None], size=image.shape[-2:], mode="nearest")[0]


def _png(image: Tensor, path: Path) -> None:
    big = F.interpolate(image[None].clamp(0, 1), scale_factor=DISPLAY, mode="nearest")[0]
    array = (big.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(path)


# --------------------------------------------------------------------------------------------
# Building the tasks
# --------------------------------------------------------------------------------------------

@dataclass
class TaskImages:
    """The images behind the tasks of one sample (all ``[3, H, W]`` in ``[0, 1]``)."""

    image: Tensor
    visualizations: dict[tuple[str, str], Tensor]   # (kind, visualization) -> image
    crops: dict[str, tuple[Tensor, Tensor]]         # kind -> (Score-CAM crop, other crop)
    cams: dict[str, Tensor]                         # kind -> Score-CAM map [H, W]
    neurons: dict[str, int]                         # kind -> class index


def dense_visualizations(cfg: Config, model: nn.Module, neurons: Sequence[int],
                         steps: int) -> dict[int, Tensor]:
    """The dense model's visualization of each class neuron (one batch, seeded by the config):
    ``{neuron: [3, H, W]}``."""
    neurons = sorted({int(n) for n in neurons})
    vis = visualize.visualize_neuron(model, neurons, image_size=cfg.image_size, steps=steps,
                                     seed=cfg.seed)
    return {n: vis.image[i].cpu() for i, n in enumerate(neurons)}


def task_images(cfg: Config, model: nn.Module, chosen: samples_mod.Samples, position: int,
                dense: dict[int, Tensor], steps: int) -> TaskImages:
    """The images of sample ``position``'s four tasks: Score-CAM crops on the dense model and
    the visualizations of both class neurons, dense (``dense``: from
    :func:`dense_visualizations`) and on the sample's SPADE copy (both neurons in one batch,
    seeded by the sample)."""
    info = chosen.table.iloc[position]
    image = chosen.poisoned.float_images([int(info["sample"])])[0]
    neurons = {"correct": int(info["clean_label"]), "predicted": int(info["target"])}
    seed = samples_mod.sample_seed(cfg.seed, int(info["sample"]))
    spade = variants.resolve_variants(cfg, model, ["spade"])[0]
    pruned = variants.variant_network(cfg, model, chosen, position, spade)[0]
    spade_vis = visualize.visualize_neuron(pruned, list(neurons.values()),
                                           image_size=cfg.image_size, steps=steps, seed=seed)
    out: dict[tuple[str, str], Tensor] = {}
    for k, (kind, neuron) in enumerate(neurons.items()):
        out[(kind, "dense")] = dense[neuron]
        out[(kind, "SPADE")] = spade_vis.image[k].cpu()
    cams = score_cam(model, image, list(neurons.values()))
    side = cfg.image_size // 3
    crops = {}
    for kind, cam in zip(neurons, cams, strict=True):
        best, other = crop_windows(cam, side)
        crops[kind] = (_crop(image, best, side), _crop(image, other, side))
    return TaskImages(image, out, crops, dict(zip(neurons, cams, strict=True)), neurons)


def _folder(cfg: Config, n: int, steps: int) -> Path:
    key = f"{cfg.digest()}-n{n}-s{steps}-v{VERSION}"
    return cfg.cache_path("study", key, "tasks.csv").parent


def build_tasks(cfg: Config, n: int | None = None, steps: int | None = None,
                progress: bool = True, rebuild: bool = False) -> Path:
    """Build (once) and return the task folder of the study for ``cfg``'s model.

    Parameters
    ----------
    cfg
        The experiment (its trained model, evaluation samples and sparsity).
    n
        Number of samples (default ``cfg.samples``; the paper's 100 at ``cpu``): ``4 n`` tasks.
    steps
        Visualization steps (default :data:`STEPS` for the preset, else lucent's 512).
    progress
        Show a progress bar.
    rebuild
        Build again even if the folder exists.

    Returns
    -------
    pathlib.Path
        The folder: ``tasks.csv`` (:data:`TASK_COLUMNS`), ``images/{task_id}-{full,vis,left,
        right}.png``, ``example/`` (the worked example of the instructions, from one more
        sample that is not among the tasks) and ``meta.json``.
    """
    from tqdm.auto import tqdm

    n = cfg.samples if n is None else int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1 sample, got {n}")
    steps = STEPS.get(cfg.defaults_name, 512) if steps is None else int(steps)
    folder = _folder(cfg, n, steps)
    if (folder / "meta.json").exists() and not rebuild:
        return folder
    start = time.perf_counter()
    model = train.trained_model(cfg, progress=progress).model
    chosen = samples_mod.evaluation_samples(cfg, model, n + 1)
    if len(chosen) < n + 1:
        raise ValueError(f"only {len(chosen)} samples pass the filter; the study needs {n + 1}")
    if chosen.multilabel:
        raise ValueError("the study shows class neurons (true class and Trojan target); a "
                         "multi-label preset (CelebA) has attributes, not classes")
    names = samples_mod.class_names(chosen.test, max(int(chosen.table[c].max())
                                                     for c in ("clean_label", "target")) + 1)
    work = folder.with_name(folder.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    (work / "images").mkdir(parents=True)
    (work / "example").mkdir()
    rng = np.random.default_rng([cfg.seed, 0x57D])
    sides = {}  # (kind, visualization) -> the Score-CAM crop's side per sample, half left
    for kind in KINDS:
        for vis in VISUALIZATIONS:
            sides[(kind, vis)] = rng.permutation(np.array(["left", "right"] * n)[:n])
    rows = []
    dense = dense_visualizations(cfg, model, [*chosen.table["clean_label"],
                                              *chosen.table["target"]], steps)
    for position in tqdm(range(n + 1), desc="study tasks", disable=not progress):
        imgs = task_images(cfg, model, chosen, position, dense, steps)
        sample = int(chosen.table.iloc[position]["sample"])
        if position == n:  # the worked example: the predicted neuron, dense, answer "right"
            _write_task(work / "example", "", imgs, "predicted", "dense", "right")
            (work / "example" / "example.json").write_text(json.dumps({
                "answer": "right",
                "why": "The visualization shows the icon; only the right crop contains it."}))
            continue
        for kind in KINDS:
            for vis in VISUALIZATIONS:
                task_id = f"t{len(rows):04d}"
                side = str(sides[(kind, vis)][position])
                _write_task(work / "images", f"{task_id}-", imgs, kind, vis, side)
                rows.append({"task_id": task_id, "sample": sample, "neuron_kind": kind,
                             "visualization": vis, "neuron": imgs.neurons[kind],
                             "class_name": names[imgs.neurons[kind]], "correct_side": side})
    pd.DataFrame(rows, columns=list(TASK_COLUMNS)).to_csv(work / "tasks.csv", index=False)
    meta = {"preset": cfg.name, "digest": cfg.digest(), "n_samples": n, "n_tasks": len(rows),
            "steps": steps, "seconds": round(time.perf_counter() - start, 1),
            "image_size": cfg.image_size, "display_scale": DISPLAY}
    (work / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    work.rename(folder)
    return folder


def _write_task(where: Path, prefix: str, imgs: TaskImages, kind: str, vis: str,
                side: str) -> None:
    cam_crop, other = imgs.crops[kind]
    left, right = (cam_crop, other) if side == "left" else (other, cam_crop)
    _png(imgs.image, where / f"{prefix}full.png")
    _png(imgs.visualizations[(kind, vis)], where / f"{prefix}vis.png")
    _png(left, where / f"{prefix}left.png")
    _png(right, where / f"{prefix}right.png")


# --------------------------------------------------------------------------------------------
# The automatic rater and the analysis
# --------------------------------------------------------------------------------------------

def _read(path: Path, size: int) -> Tensor:
    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    image = torch.from_numpy(array).permute(2, 0, 1)[None]
    return F.interpolate(image, size=(size, size), mode="area")[0]


@torch.no_grad()
def _features(model: nn.Module, images: Tensor) -> Tensor:
    """The input of the model's last linear layer (its penultimate features) for ``images``."""
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    store: dict[str, Tensor] = {}
    handle = head.register_forward_pre_hook(lambda _m, args: store.__setitem__("x", args[0]))
    try:
        model(images)
    finally:
        handle.remove()
    return store["x"].flatten(1)


def automatic_rater(folder: str | Path, model: nn.Module, image_size: int,
                    margin: float = 0.01, rater: str = "automatic") -> pd.DataFrame:
    """Answers to every task of ``folder`` by an automatic rater (not a person).

    The rater embeds the visualization and both crops with ``model``'s penultimate features and
    picks the crop with the larger cosine similarity to the visualization; it declines when the
    two similarities differ by less than ``margin``.

    Returns
    -------
    pandas.DataFrame
        The export's columns: ``rater, task_id, sample, neuron_kind, visualization, neuron,
        choice, correct_side, correct, seconds, answered_at`` (``seconds`` NaN, ``answered_at``
        empty).
    """
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin!r}")
    folder = Path(folder)
    tasks = pd.read_csv(folder / "tasks.csv")
    choices = []
    with eval_mode(model):  # the model is the user's: its modes come back as they were
        for task in tasks["task_id"]:
            images = torch.stack([_read(folder / "images" / f"{task}-{part}.png", image_size)
                                  for part in ("vis", "left", "right")])
            f = F.normalize(_features(model, images), dim=1)
            left, right = float(f[0] @ f[1]), float(f[0] @ f[2])
            choices.append("decline" if abs(left - right) < margin
                           else ("left" if left > right else "right"))
    out = tasks[["task_id", "sample", "neuron_kind", "visualization", "neuron"]].copy()
    out.insert(0, "rater", rater)
    out["choice"] = choices
    out["correct_side"] = tasks["correct_side"]
    out["correct"] = out["choice"] == out["correct_side"]
    out["seconds"] = math.nan
    out["answered_at"] = ""
    return out


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` in percent (NaN, NaN for ``n = 0``)."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100 * (centre - half), 100 * (centre + half)


def accuracy_table(answers: pd.DataFrame, by: Sequence[str] = ("visualization",)) -> pd.DataFrame:
    """Accuracy of an answers table per group: tasks, declined (%), accuracy of the answered
    tasks (%) with its 95% Wilson interval, and accuracy counting a decline as wrong (%).

    ``answers`` has the export's columns (``choice``, ``correct_side``, and the ``by`` columns).
    """
    missing = {"choice", "correct_side", *by} - set(answers.columns)
    if missing:
        raise ValueError(f"answers lack the columns {sorted(missing)}")
    rows = []
    for key, group in answers.groupby(list(by), sort=True):
        answered = group[group["choice"] != "decline"]
        k = int((answered["choice"] == answered["correct_side"]).sum())
        low, high = wilson_interval(k, len(answered))
        rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True)),
                     "tasks": len(group),
                     "declined (%)": 100 * (1 - len(answered) / len(group)),
                     "accuracy (%)": 100 * k / len(answered) if len(answered) else math.nan,
                     "95% CI low": low, "95% CI high": high,
                     "accuracy, decline = wrong (%)": 100 * k / len(group)})
    return pd.DataFrame(rows)


def paired_difference(answers: pd.DataFrame) -> pd.DataFrame:
    """SPADE against dense on the same (sample, neuron) pairs, per neuron kind and in all.

    Each task scores 1 when answered correctly and 0 otherwise (a decline scores 0); a pair is a
    sample's dense and SPADE task for one neuron. Returns per group: ``pairs``, ``dense (%)``,
    ``SPADE (%)``, ``delta`` (SPADE - dense, points) with the standard error of the paired
    differences ``se``, and ``verdict`` on the claim that SPADE's visualizations are matched more
    often: holds / fails / inconclusive at one standard error.
    """
    missing = {"sample", "neuron_kind", "visualization", "choice", "correct_side"} - set(answers)
    if missing:
        raise ValueError(f"answers lack the columns {sorted(missing)}")
    scored = answers.assign(score=(answers["choice"] == answers["correct_side"]).astype(float))
    wide = scored.pivot_table(index=["sample", "neuron_kind"], columns="visualization",
                              values="score", aggfunc="mean").dropna()
    wide = wide.reset_index()
    rows = []
    for kind, group in [*wide.groupby("neuron_kind"), ("all", wide)]:
        diff = 100 * (group["SPADE"] - group["dense"])
        n = len(group)
        se = float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
        delta = float(diff.mean()) if n else math.nan
        verdict = ("inconclusive" if math.isnan(se) or abs(delta) <= se
                   else "holds" if delta > 0 else "fails")
        rows.append({"neuron kind": kind, "pairs": n, "dense (%)": 100 * group["dense"].mean(),
                     "SPADE (%)": 100 * group["SPADE"].mean(), "delta": delta, "se": se,
                     "verdict": verdict})
    return pd.DataFrame(rows)


def task_figure(folder: str | Path, task_ids: Sequence[str]) -> widgets.Picture:
    """The four images of each task (one row per task: full image, visualization, left and right
    crop), with what the rater is not told: the neuron, the visualization and the right answer."""
    folder = Path(folder)
    tasks = pd.read_csv(folder / "tasks.csv").set_index("task_id")
    rows, titles, captions = [], [], []
    for task in task_ids:
        info = tasks.loc[task]
        rows.append([_read(folder / "images" / f"{task}-{part}.png", 96)
                     for part in ("full", "vis", "left", "right")])
        titles.append(f"{info['visualization']}\n{info['neuron_kind']}: {info['class_name']}")
        mark = {"left": ["", "", "Score-CAM crop", ""], "right": ["", "", "", "Score-CAM crop"]}
        captions.append(mark[info["correct_side"]])
    return widgets.image_grid(rows, row_titles=titles, captions=captions,
                              col_titles=["image", "visualization", "left crop", "right crop"],
                              max_cols=4)


def study_sentence(paired: pd.DataFrame, human: bool) -> str:
    """The verdict on the claim from :func:`paired_difference`'s ``all`` row, naming whose
    answers it rests on."""
    row = paired.set_index("neuron kind").loc["all"]
    who = "people's answers" if human else "the automatic rater's answers (not people's)"
    return (f"**Verdict, on {who}: {row['verdict']}.** Over {int(row['pairs'])} pairs, SPADE's "
            f"visualizations were matched to the Score-CAM crop {row['SPADE (%)']:.1f}% of the "
            f"time against {row['dense (%)']:.1f}% for the dense model's "
            f"({row['delta']:+.1f} ± {row['se']:.1f} points).")
