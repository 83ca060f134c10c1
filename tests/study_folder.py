"""A small synthetic task folder for the human-study app (spade_lib.study).

Eight tasks: 2 samples x 2 neuron kinds x 2 visualizations. Each sample's full image (48 px) holds
two textured objects ("concepts"), one per half; its crops are those halves (24 px). The neuron of
the correct class stands for one concept, the predicted one for the other, and its visualization
is that concept's texture, warped and colour-jittered (the "dense" one also mixes in the other
concept). The sample's concepts sit on opposite sides in the two samples, so the correct side is
balanced: 4 left, 4 right, and one of each within every (neuron kind, visualization) pair.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 48
COLOURS = {
    "stripes": ((205, 40, 45), (250, 246, 240)),
    "dots": ((30, 70, 200), (250, 236, 170)),
    "checker": ((20, 120, 60), (20, 24, 20)),
    "rings": ((245, 140, 20), (90, 45, 20)),
}
# sample -> (concept of the correct class, of the predicted class, side of the correct one,
#            (class name, neuron) of the correct class, of the predicted class)
SAMPLES = {
    0: ("stripes", "dots", "left", ("zebra crossing", 3), ("polka dress", 7)),
    1: ("checker", "rings", "right", ("chessboard", 1), ("dartboard", 5)),
}


def _texture(name: str, h: int, w: int, rng: np.random.Generator, warp: float) -> np.ndarray:
    """An ``(h, w, 3)`` float image in [0, 1] of one concept's texture."""
    y, x = np.mgrid[0:h, 0:w].astype(float)
    if warp:
        a, b = rng.uniform(0, 2 * np.pi, size=2)
        x, y = x + warp * np.sin(y / 3.0 + a), y + warp * np.cos(x / 4.0 + b)
    if name == "stripes":
        on = np.sin((x + y) * np.pi / 3.5) > 0
    elif name == "dots":
        on = (np.mod(x, 8) - 4) ** 2 + (np.mod(y, 8) - 4) ** 2 < 6
    elif name == "checker":
        on = (np.floor(x / 4) + np.floor(y / 4)) % 2 == 0
    else:
        on = np.sin(np.hypot(x - w / 2, y - h / 2) * np.pi / 2.5) > 0
    fg, bg = (np.array(c, dtype=float) / 255 for c in COLOURS[name])
    return np.where(on[..., None], fg, bg)


def _smooth_noise(h: int, w: int, rng: np.random.Generator, cells: int = 6) -> np.ndarray:
    small = (rng.uniform(0, 255, size=(cells, cells, 3))).astype(np.uint8)
    big = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    return np.asarray(big, dtype=float) / 255


def _scene(left: str, right: str, rng: np.random.Generator) -> np.ndarray:
    """A full image: a sky-to-ground gradient with a textured disc in each half."""
    t = np.linspace(0, 1, SIZE)[:, None, None]
    image = (1 - t) * np.array([0.72, 0.84, 0.95]) + t * np.array([0.86, 0.80, 0.66])
    image = np.broadcast_to(image, (SIZE, SIZE, 3)).copy()
    image += 0.03 * rng.standard_normal(image.shape)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    half = SIZE // 2
    for name, cx in ((left, half // 2), (right, half + half // 2)):
        disc = np.hypot(x - cx, y - SIZE / 2) < 9.5
        image[disc] = _texture(name, SIZE, SIZE, rng, warp=0.0)[disc]
    return np.clip(image, 0, 1)


def _visualization(target: str, other: str, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A feature-visualization-like image of ``target`` (``kind`` "dense" also shows ``other``)."""
    vis = _texture(target, SIZE, SIZE, rng, warp=1.5)
    if kind == "dense":
        vis = 0.55 * _texture(target, SIZE, SIZE, rng, warp=3.0) \
            + 0.45 * _texture(other, SIZE, SIZE, rng, warp=3.0)
    vis = 0.8 * vis + 0.2 * _smooth_noise(SIZE, SIZE, rng)
    return np.clip(vis + 0.04 * rng.standard_normal(vis.shape), 0, 1)


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)).save(path)


def _crops(full: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    top = SIZE // 4
    half = SIZE // 2
    return full[top:top + half, :half], full[top:top + half, half:]


def write_study_folder(root: Path, seed: int = 0) -> Path:
    """Write the 8-task synthetic folder into ``root`` (created); returns ``root``."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    rows = []
    k = 0
    for sample, (correct, predicted, side, correct_class, predicted_class) in SAMPLES.items():
        other_side = "right" if side == "left" else "left"
        left, right = (correct, predicted) if side == "left" else (predicted, correct)
        full = _scene(left, right, rng)
        crop_left, crop_right = _crops(full)
        for kind, concept, other, (class_name, neuron), answer in (
                ("correct", correct, predicted, correct_class, side),
                ("predicted", predicted, correct, predicted_class, other_side)):
            for visualization in ("dense", "SPADE"):
                k += 1
                task_id = f"t{k:04d}"
                _save(full, root / "images" / f"{task_id}-full.png")
                _save(_visualization(concept, other, visualization, rng),
                      root / "images" / f"{task_id}-vis.png")
                _save(crop_left, root / "images" / f"{task_id}-left.png")
                _save(crop_right, root / "images" / f"{task_id}-right.png")
                rows.append(f"{task_id},{sample},{kind},{visualization},{neuron},{class_name},"
                            f"{answer}")
    (root / "tasks.csv").write_text(
        "task_id,sample,neuron_kind,visualization,neuron,class_name,correct_side\n"
        + "\n".join(rows) + "\n")
    full = _scene("dots", "checker", rng)
    crop_left, crop_right = _crops(full)
    _save(full, root / "example" / "full.png")
    _save(_visualization("checker", "dots", "SPADE", rng), root / "example" / "vis.png")
    _save(crop_left, root / "example" / "left.png")
    _save(crop_right, root / "example" / "right.png")
    (root / "example" / "example.json").write_text(json.dumps({
        "answer": "right",
        "why": "The visualization is filled with a green and black checker pattern, which only "
               "the right crop shows; the left crop shows blue dots."}))
    (root / "meta.json").write_text(json.dumps({"preset": "synthetic", "n_tasks": len(rows)}))
    return root
