"""Sparsity search: layer groups, the greedy order, stitching, and the search end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from spade_lib import config, data, pruning, results, search
from spade_lib.models import build_model
from spade_lib.trace import trace

pytestmark = [pytest.mark.usefixtures("one_thread", "quiet"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]


@pytest.fixture
def cfg(tmp_path: Path) -> config.Config:
    return config.load("smoke", cache_dir=str(tmp_path), n_augmentations=8)


@pytest.fixture(scope="module")
def tuning() -> results.Samples:
    """Two samples of the held-out rules (no filter: the model is random)."""
    smoke = config.load("smoke")
    _, test = data.load_scenes(smoke)
    poisoned = data.poisoned_test(test, smoke.tuning_rules, seed=smoke.seed)
    return results.Samples.from_ids(poisoned, test, [3, 500])


GROUPS = ["layers.0", "layers.1", "layers.2", "fc"]


# --------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------

def test_layer_groups_follow_the_blocks(model: nn.Module) -> None:
    groups = search.layer_groups(model)
    assert list(groups) == GROUPS
    assert [name for names in groups.values() for name in names] == pruning.default_layers(model)
    assert all(name.startswith(g + ".") or name == g for g, names in groups.items()
               for name in names)
    tv = build_model("tv_resnet50", 10)
    assert list(search.layer_groups(tv)) == ["layer1", "layer2", "layer3", "layer4", "fc"]
    assert list(search.layer_groups(model, groups=1)) == ["layers", "fc"]
    custom = search.layer_groups(model, groups=["layers", "layers.2", "fc"])
    assert list(custom) == ["layers", "layers.2", "fc"]
    assert all(n.startswith("layers.2.") for n in custom["layers.2"])
    with pytest.raises(ValueError, match="layer 'fc' is in none of the groups"):
        search.layer_groups(model, groups=["layers"])
    with pytest.raises(ValueError, match="\\['head'\\] contain none of the pruned layers"):
        search.layer_groups(model, groups=["layers", "fc", "head"])
    with pytest.raises(ValueError, match="groups must be None, a depth"):
        search.layer_groups(model, groups="layers")


# --------------------------------------------------------------------------------------------
# Greedy
# --------------------------------------------------------------------------------------------

def test_greedy_finds_the_optimum_of_a_separable_score() -> None:
    optimum = {"layers.0": 0.2, "layers.1": 0.0, "layers.2": 0.9, "fc": 0.99}
    seen: list[dict[str, float]] = []
    fixed: list[tuple[str, float]] = []

    def score(schedule: dict[str, float]) -> float:
        seen.append(schedule)
        return -sum((schedule[g] - optimum[g]) ** 2 for g in GROUPS)

    best, table = search.greedy_search(GROUPS, score, on_choice=lambda g, v: fixed.append((g, v)))
    assert best == optimum
    assert fixed == [(g, optimum[g]) for g in reversed(GROUPS)]
    assert len(table) == len(GROUPS) * len(search.GRID)
    assert table["group"].tolist() == [g for g in reversed(GROUPS) for _ in search.GRID]
    assert table.groupby("group")["chosen"].sum().tolist() == [1, 1, 1, 1]
    chosen = table[table["chosen"]].set_index("group")["value"].to_dict()
    assert chosen == optimum
    # later groups keep their choice and earlier groups are dense while a group is searched
    for schedule in seen:
        moving = [g for g in GROUPS if schedule[g] != 0]
        if moving:
            first = GROUPS.index(moving[0])
            assert all(schedule[g] == optimum[g] for g in GROUPS[first + 1:])
    # a schedule is scored once: value 0 of a group repeats the previous group's choice
    assert len(seen) == len(table) - (len(GROUPS) - 1)


def test_greedy_is_greedy_ties_keep_the_smaller_value_and_nan_never_wins() -> None:
    def score(s: dict[str, float]) -> float:
        if s["b"] == 0.99:
            return math.nan
        # b alone prefers 0.8; once b = 0.8, a prefers 0.4; the joint optimum (b 0.2, a 0.9)
        # is not reachable greedily
        if s["b"] == 0.2 and s["a"] == 0.9:
            return 10.0
        return -(s["b"] - 0.8) ** 2 + (0.1 if s["a"] in (0.4, 0.6) else 0.0)

    best, table = search.greedy_search(["a", "b"], score)
    assert best == {"a": 0.4, "b": 0.8}
    assert table["score"].isna().sum() == 1
    with pytest.raises(RuntimeError, match="every candidate of group 'b' scored NaN"):
        search.greedy_search(["a", "b"], lambda s: math.nan)
    with pytest.raises(ValueError, match="grid value 1.2 is outside"):
        search.greedy_search(["a"], lambda s: 0.0, grid=[0.0, 1.2])


# --------------------------------------------------------------------------------------------
# Stitching and the search
# --------------------------------------------------------------------------------------------

def _candidates(cfg: config.Config, model: nn.Module,
                samples: results.Samples) -> search.Candidates:
    seeds = [results.sample_seed(cfg.seed, s) for s in samples.ids]
    return search.Candidates(model, samples.images(), seeds, pruning.default_layers(model),
                             cfg.pruner, cfg.n_augmentations, cfg.augment)


def _traced(cfg: config.Config, model: nn.Module, samples: results.Samples, i: int,
            schedule: dict[str, float]) -> nn.Module:
    return trace(model, samples.images()[i], sparsity=schedule, pruner=cfg.pruner,
                 n_augmentations=cfg.n_augmentations, recipe=cfg.augment,
                 seed=results.sample_seed(cfg.seed, samples.ids[i])).model


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_stitching_equals_pruning_directly(cfg, model, tuning) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    candidates = _candidates(cfg, model, tuning)
    groups = search.layer_groups(model)
    schedule = {**dict.fromkeys(groups["layers.1"], 0.4), **dict.fromkeys(groups["layers.2"], 0.9),
                "fc": 0.6}
    for i in range(len(tuning)):
        _assert_same_weights(candidates.model(i, schedule), _traced(cfg, model, tuning, i,
                                                                    schedule))
    solves = candidates.solves
    stitched = candidates.model(1, {**schedule, "fc": 0.0})     # reuses the solved weights
    assert candidates.solves == solves
    assert torch.equal(stitched.fc.weight, model.fc.weight)
    _assert_same_weights(candidates.model(0, {}), model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_search_with_a_known_score_finds_its_optimum(cfg, model, tuning, monkeypatch) -> None:
    optimum = {"layers.0": 0.0, "layers.1": 0.6, "layers.2": 0.95, "fc": 0.2}
    groups = search.layer_groups(model)
    group_of = {name: g for g, names in groups.items() for name in names}

    def known(candidates, samples, schedule, methods, aggregation, options):
        assert set(schedule) == set(group_of) and samples is tuning
        return {"score": -sum((v - optimum[group_of[n]]) ** 2 for n, v in schedule.items())}

    monkeypatch.setattr(search, "schedule_score", known)
    found = search.search_sparsity(cfg, model, tuning, ["Saliency"], progress=False)
    assert found.group_values == optimum
    assert found.schedule == {n: optimum[group_of[n]] for n in pruning.default_layers(model)}
    assert found.score == pytest.approx(0.0)
    assert found.info["solves"] == 0          # nothing was pruned that was not scored


def test_search_end_to_end(cfg, model, tuning, monkeypatch) -> None:
    found = search.search_sparsity(cfg, model, tuning, ["Saliency"], progress=False)
    layers = pruning.default_layers(model)
    assert list(found.schedule) == layers
    assert set(found.group_values.values()) <= set(search.GRID)
    assert list(found.groups) == GROUPS and list(found.group_values) == GROUPS
    assert len(found.history) == len(GROUPS) * len(search.GRID)
    # each step also scores the previous choice (its value 0), so the score never decreases
    assert found.score == found.history["score"].max()
    # each layer is pruned at each nonzero grid value exactly once per sample
    assert found.info["solves"] == len(tuning) * len(layers) * (len(search.GRID) - 1)
    # the chosen schedule's score is the one of the stitched networks
    again = search.schedule_score(_candidates(cfg, model, tuning), tuning, found.schedule,
                                  ["Saliency"])
    assert again["score"] == pytest.approx(found.score)
    # a preset value
    assert cfg.replace(sparsity=found.schedule).sparsity == found.schedule
    line = yaml.safe_load(found.to_yaml())
    assert line == {"sparsity": found.group_values}
    assert pruning.resolve_sparsity(model, line["sparsity"]) == found.schedule
    for i in range(len(tuning)):
        _assert_same_weights(_candidates(cfg, model, tuning).model(i, found.schedule),
                             _traced(cfg, model, tuning, i, found.schedule))
    # cached by its inputs
    monkeypatch.setattr(search, "Candidates", None)
    cached = search.search_sparsity(cfg, model, tuning, ["Saliency"], progress=False)
    assert cached.schedule == found.schedule and cached.key == found.key
    assert cached.history[["group", "value", "chosen"]].equals(found.history[["group", "value",
                                                                          "chosen"]])
    # a file saved when the history was still named "trace" reads the same
    old = found.to_dict()
    old["trace"] = old.pop("history")
    assert search.SearchResult.from_dict(old).history.equals(found.history)


def test_search_refuses_evaluation_samples_and_bad_options(cfg, model, tuning) -> None:
    _, test = data.load_scenes(cfg)
    evaluation = results.Samples.from_ids(data.poisoned_test(test, cfg.rules, seed=cfg.seed),
                                          test, [3])
    with pytest.raises(ValueError, match="carry the evaluation rules 'fashion'"):
        search.search_sparsity(cfg, model, evaluation, ["Saliency"], progress=False)
    with pytest.raises(ValueError, match="unknown aggregation 'mean'"):
        search.search_sparsity(cfg, model, tuning, ["Saliency"], aggregation="mean",
                               progress=False)
    with pytest.raises(ValueError, match="grid values must be unique"):
        search.search_sparsity(cfg, model, tuning, ["Saliency"], grid=[0.0, 0.5, 0.5],
                               progress=False)
    with pytest.raises(ValueError, match="unknown attribution method"):
        search.search_sparsity(cfg, model, tuning, ["Nope"], progress=False)


def test_saved_search_is_used_only_while_the_preset_matches(cfg, monkeypatch, tmp_path) -> None:
    from spade_lib import train

    saved = search.SearchResult({"fc": 0.9}, {"fc": 0.9}, {"fc": ["fc"]},
                                pd.DataFrame({"group": ["fc"], "value": [0.9],
                                                     "score": [0.7], "chosen": [True]}),
                                0.7, "k", {"methods": ["Saliency"]})
    params = tmp_path / "params"
    params.mkdir()
    monkeypatch.setattr(config, "PARAMS_DIR", params)
    calls = []

    def no_training(c, progress=True):
        calls.append(c.rules)
        raise RuntimeError("would train")

    monkeypatch.setattr(train, "trained_model", no_training)
    record = {"digest": search.search_digest(cfg), "result": saved.to_dict(),
              "held_out_model": {"clean_accuracy": 0.5, "attack_success": {}}}
    (params / f"{cfg.name}-search.json").write_text(json.dumps(record))
    found, info = search.saved_search(cfg)
    assert info["source"] == "saved" and found.group_values == {"fc": 0.9} and not calls
    # a changed preset (here: other tuning samples) no longer matches: the search runs
    with pytest.raises(RuntimeError, match="would train"):
        search.saved_search(cfg.replace(tuning_samples=cfg.tuning_samples + 1))
    assert calls == [cfg.tuning_rules]  # the held-out model, never the evaluation one
    assert search.search_digest(cfg) == search.search_digest(cfg.replace(sparsity=0.5))
    # evaluating more methods than were searched with keeps the saved search ...
    more = cfg.replace(methods=[*cfg.methods, "Occlusion"], search_methods=cfg.methods)
    assert search.search_digest(more) == search.search_digest(cfg)
    assert search.search_methods(more) == cfg.methods
    # ... searching with other methods does not
    assert search.search_digest(cfg.replace(search_methods=["Saliency"])) \
        != search.search_digest(cfg)
