"""Evaluation runner: the sample filter, variants, the resumable store and the summary tables."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spade_lib import attribution, config, data, metrics, results, trojan
from spade_lib.models import build_model
from spade_lib.trace import trace

SECONDS = ["trace_seconds", "attribution_seconds"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics.DegenerateScoreWarning)
        yield


@pytest.fixture
def cfg(tmp_path: Path) -> config.Config:
    return config.load("smoke", cache_dir=str(tmp_path), n_augmentations=8,
                       sparsity="linear:0:0.8")


@pytest.fixture(scope="module")
def scenes() -> tuple[data.SceneSet, data.PoisonedSet]:
    smoke = config.load("smoke")
    _, test = data.load_scenes(smoke)
    return test, data.poisoned_test(test, smoke.rules, seed=smoke.seed)


@pytest.fixture
def samples(scenes: tuple[data.SceneSet, data.PoisonedSet]) -> results.Samples:
    test, poisoned = scenes
    return results.Samples.from_ids(poisoned, test, [3, 100, 500])


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
    chosen = results.select_samples(oracle, test, poisoned, 12, seed=3)
    table = chosen.table
    assert list(table.columns) == list(results.SAMPLE_COLUMNS)
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
    a = results.select_samples(oracle, test, poisoned, 10, seed=1)
    b = results.select_samples(oracle, test, poisoned, 10, seed=1)
    c = results.select_samples(oracle, test, poisoned, 10, seed=2)
    bigger = results.select_samples(oracle, test, poisoned, 17, seed=1)
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
    chosen = results.select_samples(oracle, test, poisoned, 10, seed=0)
    counts = chosen.table.groupby("rule").size().tolist()
    assert counts[:2] == [1, 2] and sorted(counts[2:]) == [3, 4]
    flips[:] = False
    flips[np.flatnonzero(rule == 2)[:3]] = True
    oracle = _oracle(test, poisoned, correct, flips)
    with pytest.warns(UserWarning, match="only 3 of"):
        short = results.select_samples(oracle, test, poisoned, 8, seed=0)
    assert short.ids == np.flatnonzero(rule == 2)[:3].tolist()
    flips[:] = False
    oracle = _oracle(test, poisoned, correct, flips)
    with pytest.raises(ValueError, match="no candidate passes the filter"):
        results.select_samples(oracle, test, poisoned, 4)
    with pytest.raises(ValueError, match="n \\(number of samples\\) must be an integer >= 1"):
        results.select_samples(oracle, test, poisoned, 0)


def test_tuning_and_evaluation_samples_use_their_rule_sets(cfg: config.Config) -> None:
    held_out = cfg.replace(rules=cfg.tuning_rules)
    _, test = data.load_scenes(held_out)
    poisoned = data.poisoned_test(test, held_out.rules, seed=cfg.seed)
    oracle = _oracle(test, poisoned, np.ones(len(test), bool), np.ones(len(poisoned), bool))
    chosen = results.tuning_samples(cfg, oracle)
    assert len(chosen) == cfg.tuning_samples
    assert [r.name for r in chosen.poisoned.rules] == [
        r.name for r in trojan.rule_set(cfg.tuning_rules)]
    _, test = data.load_scenes(cfg)
    poisoned = data.poisoned_test(test, cfg.rules, seed=cfg.seed)
    oracle = _oracle(test, poisoned, np.ones(len(test), bool), np.ones(len(poisoned), bool))
    chosen = results.evaluation_samples(cfg, oracle)
    assert len(chosen) == cfg.samples
    assert [r.name for r in chosen.poisoned.rules] == [r.name for r in trojan.rule_set(cfg.rules)]


# --------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------

VARIANTS = {"dense": None, "spade": 0.9, "isd": results.Variant("isd", 0.9, other_image=True),
            "spade-l2": "only:layers.2:0.6"}


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _run(cfg, model, samples, **kw) -> pd.DataFrame:
    kw.setdefault("variants", ("dense", "spade", "isd"))
    return results.evaluate(cfg, model, samples, ["Saliency"], progress=False, **kw)


def test_table_shape_columns_and_order(cfg, model, samples) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = _run(cfg, model, samples, variants=VARIANTS)
    assert list(table.columns) == list(results.COLUMNS)
    assert len(table) == 3 * 1 * 4
    assert table["sample"].tolist() == [3] * 4 + [100] * 4 + [500] * 4
    assert table["variant"].tolist() == list(VARIANTS) * 3
    assert table["config_hash"].nunique() == 1 and len(table["config_hash"][0]) == 12
    dense = table[table["variant"] == "dense"]
    assert (dense["trace_seconds"] == 0).all() and (dense["donor"] == -1).all()
    assert (table.loc[table["variant"] != "dense", "trace_seconds"] > 0).all()
    assert ((table["donor"] >= 0) == (table["variant"] == "isd")).all()
    assert table["keeps_prediction"].dtype == bool
    assert (table["keeps_prediction"] == (table["prediction"] == table["target"])).all()
    store = results.ResultStore(cfg.cache_path("results", table["config_hash"][0]))
    assert store.done() == {3, 100, 500} and store.read_meta()["key"] == table["config_hash"][0]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_dense_and_spade_rows_equal_a_direct_computation(cfg, model, samples) -> None:
    table = _run(cfg, model, samples, variants=("dense", "spade"), store=False)
    for _, row in samples.table.iterrows():
        s, target = int(row["sample"]), int(row["target"])
        image, mask = samples.poisoned.float_images([s]), samples.poisoned.masks[s][None]
        pruned = trace(model, image[0], sparsity=cfg.sparsity, pruner=cfg.pruner,
                       n_augmentations=cfg.n_augmentations, recipe=cfg.augment,
                       seed=results.sample_seed(cfg.seed, s)).model
        for variant, net in (("dense", model), ("spade", pruned)):
            want = metrics.trojan_scores(attribution.attribute(net, image, target, "Saliency"),
                                         mask).iloc[0]
            got = table[(table["sample"] == s) & (table["variant"] == variant)].iloc[0]
            for col in metrics.SCORE_COLUMNS:
                assert _same(got[col], want[col]), (s, variant, col)
            assert got["prediction"] == int(net(image).argmax(1))


def test_isd_prunes_with_another_image(cfg, model, samples) -> None:
    table = _run(cfg, model, samples, variants=("spade", "isd"), store=False)
    isd = table[table["variant"] == "isd"].set_index("sample")
    test = samples.test
    for _, row in samples.table.iterrows():
        s = int(row["sample"])
        donor = int(isd.loc[s, "donor"])
        assert donor != int(row["test_index"])
        assert int(test.clean_labels[donor]) not in (int(row["clean_label"]), int(row["target"]))
        seed = results.sample_seed(cfg.seed, s)
        assert donor == results.isd_donor(test, int(row["clean_label"]), int(row["target"]), seed)
        pruned = trace(model, test.float_images([donor])[0], sparsity=cfg.sparsity,
                       pruner=cfg.pruner, n_augmentations=cfg.n_augmentations,
                       recipe=cfg.augment, seed=seed).model
        image = samples.poisoned.float_images([s])
        want = metrics.trojan_scores(
            attribution.attribute(pruned, image, int(row["target"]), "Saliency"),
            samples.poisoned.masks[s][None]).iloc[0]
        assert _same(isd.loc[s, "auc_abs"], want["auc_abs"])
    assert isd["donor"].nunique() == 3 and isd["auc_abs"].notna().all()
    spade = table[table["variant"] == "spade"].set_index("sample")
    assert not np.allclose(spade["auc_abs"], isd["auc_abs"])


class Interrupted(Exception):
    pass


def test_interrupted_run_resumes_without_recomputing(cfg, model, samples, monkeypatch,
                                                      tmp_path: Path) -> None:
    real = results.run_sample
    computed: list[int] = []

    def flaky(cfg_, model_, samples_, position, *args, **kwargs):
        if len(computed) == 2:
            raise Interrupted
        computed.append(samples_.ids[position])
        return real(cfg_, model_, samples_, position, *args, **kwargs)

    monkeypatch.setattr(results, "run_sample", flaky)
    with pytest.raises(Interrupted):
        _run(cfg, model, samples)
    assert computed == [3, 100]
    (key,) = [p.name for p in cfg.cache_path("results", "x").parent.iterdir()]
    store = results.ResultStore(cfg.cache_path("results", key))
    assert store.done() == {3, 100}
    (store.path / ".sample-0000500.parquet.999.dead.tmp").write_bytes(b"half a file")

    computed.clear()

    def counting(cfg_, model_, samples_, position, *args, **kwargs):
        computed.append(samples_.ids[position])
        return real(cfg_, model_, samples_, position, *args, **kwargs)

    monkeypatch.setattr(results, "run_sample", counting)
    resumed = _run(cfg, model, samples)
    assert computed == [500]
    assert store.done() == {3, 100, 500}
    whole = _run(cfg, model, samples, store=tmp_path / "elsewhere")
    assert computed == [500, 3, 100, 500]
    pd.testing.assert_frame_equal(resumed.drop(columns=SECONDS), whole.drop(columns=SECONDS))
    again = _run(cfg, model, samples)
    assert computed == [500, 3, 100, 500]
    pd.testing.assert_frame_equal(again, resumed)


def test_a_failed_write_leaves_no_file(cfg, model, samples, monkeypatch) -> None:
    store = results.ResultStore(cfg.cache_path("results", "manual", "meta.json").parent)
    rows = results.run_sample(cfg, model, samples, 0, ["Saliency"], [results.Variant("dense")])

    def broken(self, fh, **kwargs):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", broken)
    with pytest.raises(OSError, match="disk full"):
        store.write(3, rows)
    assert store.done() == set() and not list(store.path.iterdir())
    monkeypatch.undo()
    store.write(3, rows)
    pd.testing.assert_frame_equal(store.read([3]), rows)


def test_a_damaged_result_file_is_recomputed_not_read(cfg, model, samples,
                                                      monkeypatch) -> None:
    first = _run(cfg, model, samples, variants=("dense",))
    store = results.ResultStore(cfg.cache_path("results", first["config_hash"][0]))
    whole = store.file(100).read_bytes()
    store.file(100).write_bytes(whole[: len(whole) // 2])      # a copy that broke off
    (store.path / "meta.json").write_text('{"key": ')           # and a truncated meta
    real, computed = results.run_sample, []

    def counting(cfg_, model_, samples_, position, *args, **kwargs):
        computed.append(samples_.ids[position])
        return real(cfg_, model_, samples_, position, *args, **kwargs)

    monkeypatch.setattr(results, "run_sample", counting)
    with pytest.warns(results.DamagedResultWarning) as seen:
        again = _run(cfg, model, samples, variants=("dense",))
    messages = " ".join(str(w.message) for w in seen)
    assert "sample-0000100.parquet" in messages and "meta.json" in messages
    assert computed == [100]
    pd.testing.assert_frame_equal(again.drop(columns=SECONDS), first.drop(columns=SECONDS))
    assert store.done() == {3, 100, 500} and store.read_meta()["key"] == first["config_hash"][0]
    assert store.read_meta()["numerics"]["torch_threads"] >= 1


def test_store_key_changes_with_what_matters(cfg, model, samples) -> None:
    v = results.resolve_variants(cfg, model, ("dense", "spade"))
    key = results.results_key(cfg, model, ["Saliency"], v)
    assert results.results_key(cfg.replace(samples=7, name="x"), model, ["Saliency"], v) == key
    assert results.results_key(cfg.replace(n_augmentations=9), model, ["Saliency"], v) != key
    assert results.results_key(cfg, model, ["Saliency", "InputXGradient"], v) != key
    assert results.results_key(cfg, model, ["Saliency"], v[:1]) != key
    other = build_model("resnet20", 10, 8, 32)
    assert results.results_key(cfg, other, ["Saliency"], v) != key
    assert results.results_key(cfg, model, ["Saliency"], v, rules=["moon"]) != key


def test_bad_inputs_fail_before_any_work(cfg, model, samples, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(results, "run_sample", boom)
    with pytest.raises(ValueError, match="unknown attribution method 'Saliancy'"):
        results.evaluate(cfg, model, samples, ["Saliancy"], progress=False)
    with pytest.raises(ValueError, match="unknown variant 'sparse'.*dense, spade, isd"):
        results.evaluate(cfg, model, samples, ["Saliency"], ["dense", "sparse"], progress=False)
    with pytest.raises(ValueError, match="variant 'x'.*outside"):
        results.evaluate(cfg, model, samples, ["Saliency"], {"x": 1.5}, progress=False)
    with pytest.raises(ValueError, match="variant 'x'.*unknown layer.*'nope'"):
        results.evaluate(cfg, model, samples, ["Saliency"], {"x": {"nope": 0.5}}, progress=False)
    with pytest.raises(ValueError, match="duplicate variant names \\['spade'\\]"):
        results.evaluate(cfg, model, samples, ["Saliency"],
                         ["spade", results.Variant("spade", 0.5)], progress=False)
    with pytest.raises(ValueError, match="Saliency has no option 'n_steps'"):
        results.evaluate(cfg, model, samples, ["Saliency"], progress=False,
                         method_options={"Saliency": {"n_steps": 3}})
    with pytest.raises(ValueError, match="prunes no layer"):
        results.evaluate(cfg, model, samples, ["Saliency"], {"x": 0.0}, progress=False)
    with pytest.raises(ValueError, match="sample ids \\[99999\\] are outside"):
        results.Samples.from_ids(samples.poisoned, samples.test, [99999])


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

def _frame() -> pd.DataFrame:
    """Two methods, three samples, dense and spade, with chosen scores."""
    rows = []
    values = {
        ("A", "dense"): ([0.5, 0.6, 0.7], [0.8, 0.8, 0.8], [0, 0, 1], [1, 1, 0]),
        ("A", "spade"): ([0.9, 1.0, 0.8], [0.7, 0.7, 0.7], [1, 1, 1], [0, 0, 0]),
        ("B", "dense"): ([0.6, 0.6, 0.6], [0.5, 0.5, 0.5], [1, 0, 0], [0, 0, 0]),
        ("B", "spade"): ([0.5, 0.5, 0.5], [0.7, 0.6, 0.8], [1, 1, 0], [0, 0, 0]),
    }
    for (method, variant), (a_sum, a_abs, p_sum, p_abs) in values.items():
        for i in range(3):
            rows.append({"sample": i, "method": method, "variant": variant,
                         "auc_sum": a_sum[i], "auc_abs": a_abs[i], "pointing_sum": p_sum[i],
                         "pointing_abs": p_abs[i], "keeps_prediction": variant == "dense" or i < 2})
    return pd.DataFrame(rows)


def test_summary_has_the_table_b2_layout() -> None:
    table = results.summary(_frame())
    assert list(table.index) == ["A", "B", "Average"]
    assert list(table.columns) == [
        "auc_dense", "auc_spade", "auc_delta", "auc_se", "auc_aggregation", "auc_n_dense",
        "auc_n_spade", "pointing_dense", "pointing_spade", "pointing_delta", "pointing_se",
        "pointing_aggregation", "pointing_n_dense", "pointing_n_spade", "n", "keeps_prediction"]
    # A: dense best is abs (0.8), spade best is sum (0.9); per-sample deltas 0.1, 0.2, 0.0
    assert table.loc["A", "auc_dense"] == pytest.approx(80.0)
    assert table.loc["A", "auc_spade"] == pytest.approx(90.0)
    assert table.loc["A", "auc_delta"] == pytest.approx(10.0)
    assert table.loc["A", "auc_aggregation"] == "abs/sum"
    assert table.loc["A", "auc_se"] == pytest.approx(100 * np.std([0.1, 0.2, 0.0], ddof=1)
                                                     / math.sqrt(3))
    # B: dense sum 0.6, spade abs 0.7
    assert table.loc["B", "auc_delta"] == pytest.approx(10.0)
    assert table.loc["B", "auc_aggregation"] == "sum/abs"
    assert table.loc["Average", "auc_dense"] == pytest.approx(70.0)
    assert table.loc["Average", "auc_spade"] == pytest.approx(80.0)
    per_sample = (np.array([0.1, 0.2, 0.0]) + np.array([0.1, 0.0, 0.2])) / 2
    assert table.loc["Average", "auc_se"] == pytest.approx(
        100 * np.std(per_sample, ddof=1) / math.sqrt(3))
    # Pointing Game: A dense abs 2/3 vs spade sum 1; B dense sum 1/3 vs spade sum 2/3
    assert table.loc["A", "pointing_delta"] == pytest.approx(100 / 3)
    assert table.loc["Average", "pointing_dense"] == pytest.approx(50.0)
    assert table.loc["Average", "pointing_spade"] == pytest.approx(100 * 5 / 6)
    assert (table["n"] == 3).all()
    assert table["keeps_prediction"].iloc[0] == pytest.approx(2 / 3)
    raw = results.summary(_frame(), percent=False)
    assert raw.loc["A", "auc_spade"] == pytest.approx(0.9)


def test_variant_table_and_prediction_kept() -> None:
    frame = _frame()
    table = results.variant_table(frame, "auc")
    assert list(table.columns) == ["dense", "spade"] and list(table.index) == ["A", "B", "Average"]
    assert table.loc["A", "spade"] == pytest.approx(90.0)
    assert table.loc["Average", "dense"] == pytest.approx(70.0)
    assert table.attrs["aggregation"].loc["A", "dense"] == "abs"
    kept = results.prediction_kept(frame)
    assert kept["dense"] == 1.0 and kept["spade"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="unknown variant\\(s\\) \\['isd'\\]"):
        results.summary(frame, variant="isd")
    with pytest.raises(ValueError, match="unknown metric 'iou'"):
        results.variant_table(frame, "iou")


def test_sample_maps_are_the_maps_behind_the_rows(cfg, model, samples) -> None:
    table = _run(cfg, model, samples, variants=("dense", "spade", "isd"), store=False)
    for pos in (0, 2):
        s = samples.ids[pos]
        maps = results.sample_maps(cfg, model, samples, pos, ["Saliency"],
                                   ("dense", "spade", "isd"))
        assert list(maps) == ["dense", "spade", "isd"]
        mask = samples.poisoned.masks[s][None]
        for variant, per_method in maps.items():
            got = metrics.trojan_scores(per_method["Saliency"], mask).iloc[0]
            row = table[(table["sample"] == s) & (table["variant"] == variant)].iloc[0]
            for col in metrics.SCORE_COLUMNS:
                assert _same(got[col], row[col]), (s, variant, col)
    dense, spade = maps["dense"]["Saliency"].map, maps["spade"]["Saliency"].map
    assert not torch.equal(dense, spade)


def test_merge_methods_only_merges_equal_scores() -> None:
    frame = _frame()
    twin = frame[frame["method"] == "A"].assign(method="A2")
    both = pd.concat([frame, twin], ignore_index=True)
    assert results.score_gap(both, ["A", "A2"]) == 0.0
    merged = results.merge_methods(both, ["A", "A2"], "A / A2")
    assert list(dict.fromkeys(merged["method"])) == ["A / A2", "B"]
    assert len(merged) == len(frame)
    assert results.summary(merged).loc["A / A2", "auc_delta"] == pytest.approx(10.0)
    # the largest gap over every score column: a Pointing Game hit against a miss
    assert results.score_gap(frame, ["A", "B"]) == 1.0
    auc_only = frame.assign(pointing_sum=0, pointing_abs=0)
    assert results.score_gap(auc_only, ["A", "B"]) == pytest.approx(0.5)  # spade sum 1.0 vs 0.5
    with pytest.raises(ValueError, match="differ by up to 1"):
        results.merge_methods(frame, ["A", "B"])
    with pytest.raises(ValueError, match="not in the results"):
        results.merge_methods(frame, ["A", "C"])


def test_wins_count_the_per_sample_differences() -> None:
    table = results.wins(_frame())
    # A: dense abs 0.8 each, spade sum 0.9, 1.0, 0.8 -> better, better, equal
    assert table.loc["A"].to_dict() == {"better": 2, "equal": 1, "worse": 0, "n": 3,
                                        "total": 3}
    # B: dense sum 0.6 each, spade abs 0.7, 0.6, 0.8 -> better, equal, better
    assert table.loc["B"].to_dict() == {"better": 2, "equal": 1, "worse": 0, "n": 3,
                                        "total": 3}
    flipped = results.wins(_frame(), variant="dense", baseline="spade")
    assert flipped.loc["A", "worse"] == 2
    with pytest.raises(ValueError, match="unknown metric"):
        results.wins(_frame(), metric="iou")
