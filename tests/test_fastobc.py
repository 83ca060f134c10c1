"""Chapter I's columns, layout and mask-group errors (spade_lib.fastobc)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from spade_lib import config, fastobc, results, schedules
from spade_lib.models import build_model
from spade_lib.trace import trace

pytestmark = pytest.mark.usefixtures("one_thread", "quiet")


def test_columns_prune_what_the_paper_prunes():
    model = build_model("resnet18", 10, 8, 32)
    cfg = config.load("smoke", sparsity={"layers.2": 0.6, "layers.3": 0.9, "fc": 0.8})
    assert fastobc.last_stage_sparsity(cfg, model) == 0.9
    columns = fastobc.variants(cfg, model)
    assert list(columns) == ["OBC", "FOBC L4 1024", "FOBC L4 128", "FOBC row group"]
    assert columns["OBC"].pruner == "obc" and columns["OBC"].sparsity == cfg.sparsity
    l4 = schedules.resolve_sparsity(model, columns["FOBC L4 1024"].sparsity)
    assert {n for n, s in l4.items() if s > 0} == {n for n in l4 if n.startswith("layers.3.")}
    assert set(l4.values()) == {0.0, 0.9}
    assert columns["FOBC L4 1024"].n_augmentations == 1024
    assert columns["FOBC L4 128"].n_augmentations == 128
    assert columns["FOBC row group"].pruner_options == {"mask_group": "row"}
    assert fastobc.reused(cfg) == {"dense": "Dense", "spade": "FOBC",
                                   "spade-linear": "FOBC linear"}
    obc_preset = cfg.replace(pruner="obc")
    assert fastobc.reused(obc_preset) == {"dense": "Dense"}
    assert {"FOBC", "FOBC linear"} <= set(fastobc.variants(obc_preset, model))
    with pytest.raises(ValueError, match="leaves the last stage"):
        fastobc.variants(cfg.replace(sparsity={"fc": 0.5}), model)


def _rows() -> pd.DataFrame:
    rows = []
    for variant, seconds, n in (("Dense", 0.0, 3), ("OBC", 10.0, 2), ("FOBC", 0.5, 3)):
        for i in range(n):
            for method, score in (("A", 0.5 + 0.1 * i), ("B", 0.6)):
                rows.append({"sample": i, "method": method, "variant": variant, "auc_sum": score,
                             "auc_abs": score, "pointing_sum": 1.0, "pointing_abs": 0.0,
                             "keeps_prediction": True,
                             "trace_seconds": seconds + i if seconds else 0.0})
    return pd.DataFrame(rows)


def test_solver_table_has_the_time_and_count_rows():
    table = fastobc.solver_table(_rows(), ["Dense", "OBC", "FOBC"])
    assert list(table.index) == ["pruning time (s)", "A", "B", "Average", "n"]
    assert math.isnan(table.loc["pruning time (s)", "Dense"])
    assert table.loc["pruning time (s)", "OBC"] == pytest.approx(10.5)   # mean of 10 and 11
    assert table.loc["pruning time (s)", "FOBC"] == pytest.approx(1.5)
    assert table.loc["n"].tolist() == [3, 2, 3]
    assert table.loc["A", "OBC"] == pytest.approx(55.0)
    ratios = fastobc.time_ratios(_rows())
    assert ratios.loc["FOBC", "share of OBC here (%)"] == pytest.approx(100 * 1.5 / 10.5)
    assert ratios.loc["FOBC", "share of OBC in the paper (%)"] == pytest.approx(100 * 70 / 2460)
    assert math.isnan(ratios.loc["FOBC L4 128", "seconds here"])


def test_mask_group_errors_are_the_trace_reports(model, scenes):
    cfg = config.load("smoke", n_augmentations=8)
    test, poisoned = scenes
    samples = results.Samples.from_ids(poisoned, test, [3])
    errors = fastobc.mask_group_errors(cfg, model, samples)
    report = trace(model, poisoned.float_images([3])[0], sparsity=cfg.sparsity,
                   n_augmentations=8, batch_size=results.TRACE_BATCH,
                   seed=results.sample_seed(cfg.seed, 3)).report
    paper = errors[errors["group"] == "paper"]
    assert paper["layer"].tolist() == report["layer"].tolist()
    assert paper["rel_error"].tolist() == pytest.approx(report["rel_error"].tolist())
    row = errors[errors["group"] == "row"]
    assert len(row) == len(paper) and (row["rel_error"] >= 0).all()
    assert not torch.equal(torch.tensor(row["rel_error"].to_numpy()),
                           torch.tensor(paper["rel_error"].to_numpy()))  # another mask
    table = fastobc.mask_group_table(errors)
    assert list(table.index)[-1] == "mean over layers"
    assert table.loc["mean over layers", "paper / row"] == pytest.approx(
        paper["rel_error"].mean() / row["rel_error"].mean())
