"""The study's tasks (Appendix H): crops, Score-CAM, the folder the app serves, the automatic
rater and the analysis."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from spade_lib import config, study, study_tasks, train


def _window_means(cam: torch.Tensor, side: int) -> dict[tuple[int, int], float]:
    h, w = cam.shape
    return {(t, left): float(cam[t:t + side, left:left + side].mean())
            for t in range(h - side + 1) for left in range(w - side + 1)}


@pytest.mark.parametrize("seed", range(5))
def test_crop_windows_match_brute_force(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    cam = torch.rand(12, 12, generator=g, dtype=torch.float64).float()
    side = 6
    best, other = study_tasks.crop_windows(cam, side)
    means = _window_means(cam, side)
    assert means[best] == pytest.approx(max(means.values()), abs=1e-6)
    apart = {k: v for k, v in means.items()
             if abs(k[0] - best[0]) >= side or abs(k[1] - best[1]) >= side}
    assert other in apart
    assert means[other] == pytest.approx(min(apart.values()), abs=1e-6)


def test_crop_windows_find_a_planted_blob_and_refuse_big_windows() -> None:
    cam = torch.zeros(16, 16)
    cam[10:14, 2:6] = 1.0
    best, other = study_tasks.crop_windows(cam, 4)
    assert best == (10, 2)
    assert abs(other[0] - 10) >= 4 or abs(other[1] - 2) >= 4
    with pytest.raises(ValueError, match="cannot avoid"):
        study_tasks.crop_windows(cam, 9)


def test_wilson_interval_known_values() -> None:
    low, high = study_tasks.wilson_interval(0, 10)
    assert low == pytest.approx(0.0, abs=1e-9) and high == pytest.approx(27.75, abs=0.01)
    low, high = study_tasks.wilson_interval(5, 10)
    assert (low, high) == pytest.approx((23.66, 76.34), abs=0.01)
    assert all(math.isnan(v) for v in study_tasks.wilson_interval(0, 0))


def test_accuracy_table_counts_declines_apart() -> None:
    answers = pd.DataFrame({
        "visualization": ["dense"] * 4 + ["SPADE"] * 4,
        "choice": ["left", "right", "decline", "left", "right", "right", "left", "decline"],
        "correct_side": ["left", "left", "left", "left", "right", "right", "left", "right"],
    })
    table = study_tasks.accuracy_table(answers).set_index("visualization")
    assert table.loc["dense", "tasks"] == 4
    assert table.loc["dense", "declined (%)"] == pytest.approx(25.0)
    assert table.loc["dense", "accuracy (%)"] == pytest.approx(200 / 3)
    assert table.loc["dense", "accuracy, decline = wrong (%)"] == pytest.approx(50.0)
    assert table.loc["SPADE", "accuracy (%)"] == pytest.approx(100.0)
    assert table.loc["SPADE", "95% CI high"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="lack the columns"):
        study_tasks.accuracy_table(answers.drop(columns="choice"))


def test_score_cam_releases_its_hooks_and_leaves_the_model() -> None:
    from spade_lib.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet20", 10, 4, 16).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    maps = study_tasks.score_cam(model, image, [0, 1])
    assert maps.shape == (2, 16, 16)
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0 + 1e-6
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory):
    cfg = config.load("smoke")
    # rebuilt: a folder left in the shared cache by older code must not stand in for the build
    return cfg, study_tasks.build_tasks(cfg, n=2, steps=4, progress=False, rebuild=True)


def test_build_tasks_writes_a_folder_the_app_accepts(folder) -> None:
    cfg, path = folder
    tasks = study.validate_task_folder(path)
    assert len(tasks) == 8
    per_group = tasks.groupby(["neuron_kind", "visualization"])["correct_side"]
    assert (per_group.apply(lambda s: (s == "left").sum()) == 1).all()
    combos = tasks.groupby(["sample", "neuron_kind", "visualization"]).size()
    assert len(combos) == 8 and (combos == 1).all()
    meta = json.loads((path / "meta.json").read_text())
    assert meta["n_tasks"] == 8 and meta["preset"] == "smoke"
    # the predicted neuron is the Trojan target the dense model predicts; the correct one differs
    for _, group in tasks.groupby("sample"):
        kinds = group.set_index(["neuron_kind", "visualization"])["neuron"]
        assert kinds[("correct", "dense")] != kinds[("predicted", "dense")]
    # the dense visualization of a class does not depend on the sample
    dense = tasks[tasks["visualization"] == "dense"]
    for _, group in dense.groupby("neuron"):
        pngs = {(path / "images" / f"{t}-vis.png").read_bytes() for t in group["task_id"]}
        assert len(pngs) == 1
    # cached: a second call returns the same folder without rebuilding
    stamp = (path / "meta.json").stat().st_mtime_ns
    assert study_tasks.build_tasks(cfg, n=2, steps=4, progress=False) == path
    assert (path / "meta.json").stat().st_mtime_ns == stamp


def test_automatic_rater_answers_every_task(folder) -> None:
    cfg, path = folder
    model = train.trained_model(cfg, progress=False).model
    answers = study_tasks.automatic_rater(path, model, cfg.image_size)
    assert list(answers.columns) == list(study.EXPORT_COLUMNS)
    assert set(answers["choice"]) <= {"left", "right", "decline"}
    assert (answers["correct"] == (answers["choice"] == answers["correct_side"])).all()
    never = study_tasks.automatic_rater(path, model, cfg.image_size, margin=np.inf)
    # a network whose penultimate features are each image's mean colour: the rater must pick the
    # crop whose mean colour points the visualization's way, and decline within the margin
    colour = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10)).train()

    def mean_colour(task: str, part: str) -> np.ndarray:
        return study_tasks._read(path / "images" / f"{task}-{part}.png", 16).mean((1, 2)).numpy()

    gaps = {}
    for task in answers["task_id"]:
        v, left, right = (mean_colour(task, p) for p in ("vis", "left", "right"))
        cos = [float(v @ c / np.linalg.norm(v) / np.linalg.norm(c)) for c in (left, right)]
        gaps[task] = cos[0] - cos[1]
    margin = float(np.median(np.abs(list(gaps.values()))))
    got = study_tasks.automatic_rater(path, colour, 16, margin=margin).set_index("task_id")
    for task, gap in gaps.items():
        if abs(abs(gap) - margin) < 1e-6:
            continue  # on the margin itself, float32 against float64 may go either way
        want = "decline" if abs(gap) < margin else "left" if gap > 0 else "right"
        assert got.loc[task, "choice"] == want, (task, gap, margin)
    assert "decline" in set(got["choice"]) and set(got["choice"]) - {"decline"}
    assert colour.training and all(m.training for m in colour.modules()), "modes restored"
    assert (never["choice"] == "decline").all()
    with pytest.raises(ValueError, match="margin"):
        study_tasks.automatic_rater(path, model, cfg.image_size, margin=-1)
