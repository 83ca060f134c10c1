"""Sample selection: the paper's filter, balance over rules, seeds, held-out rule sets."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import spade_lib.samples as sampling
from spade_lib import config, data, trojan

pytestmark = pytest.mark.usefixtures("one_thread")



class Oracle(nn.Module):
    """Looks an image up in a table of known images and answers that image's label."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        super().__init__()
        self.register_buffer("anchor", torch.zeros(1))
        self.table = {_key(x): int(y) for x, y in zip(images, labels, strict=True)}

    def forward(self, x: Tensor) -> Tensor:
        labels = torch.tensor([self.table[_key(image)] for image in x])
        return 10.0 * F.one_hot(labels, 10).float()


def _key(image: Tensor) -> bytes:
    return (image * 255).round().to(torch.uint8).numpy().tobytes()


def _oracle(test: data.SceneSet, poisoned: data.PoisonedSet, correct: np.ndarray,
            flips: np.ndarray) -> Oracle:
    clean = torch.where(torch.as_tensor(correct), test.clean_labels, (test.clean_labels + 1) % 10)
    patched = torch.where(torch.as_tensor(flips), poisoned.labels, poisoned.clean_labels)
    images = torch.cat([test.float_images(), poisoned.float_images()])
    return Oracle(images, torch.cat([clean, patched]))


def _random_oracle(scenes: tuple[data.SceneSet, data.PoisonedSet],
                   seed: int = 0) -> tuple[Oracle, np.ndarray]:
    test, poisoned = scenes
    rng = np.random.default_rng(seed)
    correct = rng.random(len(test)) < 0.8
    flips = rng.random(len(poisoned)) < 0.6
    eligible = correct[poisoned.index.numpy()] & flips
    return _oracle(test, poisoned, correct, flips), eligible


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------

def test_selected_samples_pass_the_filter_and_are_balanced(scenes) -> None:
    test, poisoned = scenes
    oracle, eligible = _random_oracle(scenes)
    chosen = sampling.select_samples(oracle, test, poisoned, 12, seed=3)
    table = chosen.table
    assert list(table.columns) == list(sampling.SAMPLE_COLUMNS)
    assert len(chosen) == 12 and table["sample"].is_monotonic_increasing
    assert eligible[chosen.ids].all()
    ids = torch.as_tensor(chosen.ids)
    # the filter, checked with the model itself
    clean_pred = oracle(test.float_images(poisoned.index[ids])).argmax(1)
    patched_pred = oracle(poisoned.float_images(ids)).argmax(1)
    assert torch.equal(clean_pred, poisoned.clean_labels[ids])
    assert torch.equal(patched_pred, poisoned.labels[ids])
    # the recorded fields are the poisoned set's
    assert table["rule"].tolist() == poisoned.rule[ids].tolist()
    assert table["target"].tolist() == poisoned.labels[ids].tolist()
    assert table["clean_label"].tolist() == poisoned.clean_labels[ids].tolist()
    assert table["test_index"].tolist() == poisoned.index[ids].tolist()
    assert table["rule_name"].tolist() == [poisoned.rules[k].name for k in table["rule"]]
    assert table.groupby("rule").size().tolist() == [3, 3, 3, 3]
    assert table.attrs["seed"] == 3 and set(table.attrs["passed"]) == {
        r.name for r in poisoned.rules}


def test_selection_is_seeded_and_nested(scenes) -> None:
    test, poisoned = scenes
    oracle, _ = _random_oracle(scenes)
    a = sampling.select_samples(oracle, test, poisoned, 10, seed=1)
    b = sampling.select_samples(oracle, test, poisoned, 10, seed=1)
    c = sampling.select_samples(oracle, test, poisoned, 10, seed=2)
    bigger = sampling.select_samples(oracle, test, poisoned, 17, seed=1)
    assert a.ids == b.ids and a.ids != c.ids
    assert set(a.ids) < set(bigger.ids)
    assert sorted(a.table.groupby("rule").size().tolist()) == [2, 2, 3, 3]


def test_selection_fills_from_other_rules_and_warns_when_short(scenes) -> None:
    test, poisoned = scenes
    correct = np.ones(len(test), bool)
    rule = poisoned.rule.numpy()
    flips = np.ones(len(poisoned), bool)
    flips[np.flatnonzero(rule == 0)[1:]] = False           # rule 0: one passing candidate
    flips[np.flatnonzero(rule == 1)[2:]] = False           # rule 1: two
    oracle = _oracle(test, poisoned, correct, flips)
    chosen = sampling.select_samples(oracle, test, poisoned, 10, seed=0)
    counts = chosen.table.groupby("rule").size().tolist()
    assert counts[:2] == [1, 2] and sorted(counts[2:]) == [3, 4]
    flips[:] = False
    flips[np.flatnonzero(rule == 2)[:3]] = True
    oracle = _oracle(test, poisoned, correct, flips)
    with pytest.warns(UserWarning, match="only 3 of"):
        short = sampling.select_samples(oracle, test, poisoned, 8, seed=0)
    assert short.ids == np.flatnonzero(rule == 2)[:3].tolist()
    flips[:] = False
    oracle = _oracle(test, poisoned, correct, flips)
    with pytest.raises(ValueError, match="no candidate passes the filter"):
        sampling.select_samples(oracle, test, poisoned, 4)
    with pytest.raises(ValueError, match="n \\(number of samples\\) must be an integer >= 1"):
        sampling.select_samples(oracle, test, poisoned, 0)


def test_tuning_and_evaluation_samples_use_their_rule_sets(cfg: config.Config) -> None:
    held_out = cfg.replace(rules=cfg.tuning_rules)
    _, test = data.load_scenes(held_out)
    poisoned = data.poisoned_test(test, held_out.rules, seed=cfg.seed)
    oracle = _oracle(test, poisoned, np.ones(len(test), bool), np.ones(len(poisoned), bool))
    chosen = sampling.tuning_samples(cfg, oracle)
    assert len(chosen) == cfg.tuning_samples
    assert [r.name for r in chosen.poisoned.rules] == [
        r.name for r in trojan.rule_set(cfg.tuning_rules)]
    _, test = data.load_scenes(cfg)
    poisoned = data.poisoned_test(test, cfg.rules, seed=cfg.seed)
    oracle = _oracle(test, poisoned, np.ones(len(test), bool), np.ones(len(poisoned), bool))
    chosen = sampling.evaluation_samples(cfg, oracle)
    assert len(chosen) == cfg.samples
    assert [r.name for r in chosen.poisoned.rules] == [r.name for r in trojan.rule_set(cfg.rules)]


def test_every_passing_sample_when_n_is_none(scenes) -> None:
    test, poisoned = scenes
    oracle, eligible = _random_oracle(scenes, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the whole set is asked for: no "only k of" warning
        every = sampling.select_samples(oracle, test, poisoned, None, seed=0)
    assert every.ids == np.flatnonzero(eligible).tolist()
    assert every.table.attrs["requested"] is None
    assert sum(every.table.attrs["checked"].values()) == len(poisoned)
    some = sampling.select_samples(oracle, test, poisoned, 5, seed=0)
    assert set(some.ids) <= set(every.ids)
    counts = sampling.filter_table(every, some)
    names = [r.name for r in poisoned.rules]
    assert list(counts.index) == [*names, "All rules"]
    rule = poisoned.rule.numpy()
    assert counts["patched test images"].tolist()[:-1] == [
        int((rule == k).sum()) for k in range(len(names))]
    assert counts["pass the filter"].tolist()[:-1] == [
        int(eligible[rule == k].sum()) for k in range(len(names))]
    assert counts.loc["All rules"].tolist() == [len(poisoned), len(every), 5]
    with pytest.raises(ValueError, match="every sample that passes"):
        sampling.filter_table(some)
