"""Evaluation runner: variants, one sample's rows, the resumable store, the maps behind the rows."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from spade_lib import attribution, data, metrics, results, sources
from spade_lib.models import build_model
from spade_lib.trace import trace, trace_images

SECONDS = ["trace_seconds", "attribution_seconds"]


pytestmark = pytest.mark.usefixtures("one_thread", "quiet")


@pytest.fixture
def samples(scenes: tuple[data.SceneSet, data.PoisonedSet]) -> results.Samples:
    test, poisoned = scenes
    return results.Samples.from_ids(poisoned, test, [3, 100, 500])



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


def test_single_image_sources_prune_with_their_donor(cfg, model, samples) -> None:
    table = _run(cfg, model, samples, variants=("ist", "isc"), store=False)
    for position, row in samples.table.iterrows():
        s, seed = int(row["sample"]), results.sample_seed(cfg.seed, int(row["sample"]))
        for variant, source in (("ist", "IST"), ("isc", "ISC")):
            image, donor = sources.single_image(samples, position, source, seed)
            pruned = trace(model, image, sparsity=cfg.sparsity, pruner=cfg.pruner,
                           n_augmentations=cfg.n_augmentations, recipe=cfg.augment,
                           seed=seed).model
            want = metrics.trojan_scores(
                attribution.attribute(pruned, samples.poisoned.float_images([s]),
                                      int(row["target"]), "Saliency"),
                samples.poisoned.masks[s][None]).iloc[0]
            got = table[(table["sample"] == s) & (table["variant"] == variant)].iloc[0]
            assert got["donor"] == donor and _same(got["auc_abs"], want["auc_abs"])


def test_many_image_networks_are_made_once_per_group(cfg, model, samples) -> None:
    mst = results.Variant("mst", cfg.sparsity, source="MST", images=40)
    shared: dict = {}
    nets = [results.variant_network(cfg, model, samples, p, mst, shared)
            for p in range(len(samples))]
    rules = samples.table["rule"].tolist()
    assert len(shared) == len(set(rules))
    for i in range(len(samples)):
        for j in range(len(samples)):
            assert (nets[i][0] is nets[j][0]) == (rules[i] == rules[j])
    _, images = sources.many_images(cfg, samples, 0, "MST", 40)
    alone = trace_images(model, images, sparsity=cfg.sparsity, pruner=cfg.pruner,
                         batch_size=results.TRACE_BATCH).model
    assert torch.equal(alone.fc.weight, nets[0][0].fc.weight) and nets[0][2] == -1
    table = _run(cfg, model, samples, variants={"mst": mst}, store=False)
    assert (table["trace_seconds"] > 0).all() and (table["donor"] == -1).all()


def test_recipe_and_augmentation_count_reach_the_trace(cfg, model, samples) -> None:
    v = results.Variant("g", cfg.sparsity, recipe="G+RC", n_augmentations=5)
    got = results.variant_network(cfg, model, samples, 0, v)[0]
    s = int(samples.table.iloc[0]["sample"])
    want = trace(model, samples.poisoned.float_images([s])[0], sparsity=cfg.sparsity,
                 pruner=cfg.pruner, n_augmentations=5, recipe="G+RC",
                 seed=results.sample_seed(cfg.seed, s)).model
    assert torch.equal(got.fc.weight, want.fc.weight)
    default = results.variant_network(cfg, model, samples, 0, results.Variant("s", cfg.sparsity))
    assert not torch.equal(got.fc.weight, default[0].fc.weight)


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


def test_a_store_holds_one_run(tmp_path: Path) -> None:
    store = results.ResultStore(tmp_path / "run")
    results.check_store_meta(store, "abc", {"key": "abc", "x": 1})  # a new store: meta written
    assert store.read_meta() == {"key": "abc", "x": 1}
    results.check_store_meta(store, "abc", {"key": "abc", "x": 2})  # the same run's: kept as is
    assert store.read_meta() == {"key": "abc", "x": 1}
    with pytest.raises(ValueError, match="holds results of run 'abc', not 'def'"):
        results.check_store_meta(store, "def", {"key": "def"})
    assert store.read_meta() == {"key": "abc", "x": 1}


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


# --------------------------------------------------------------------------------------------
# Other architectures
# --------------------------------------------------------------------------------------------

def _pair_frame(gap: float) -> pd.DataFrame:
    """Dense and SPADE rows of three methods on two samples; DeepLift off by ``gap``."""
    rows = []
    for s in (0, 1):
        for variant in ("dense", "spade"):
            for m in ("Saliency", "InputXGradient", "DeepLift"):
                base = 0.5 + 0.1 * s + (0.2 if variant == "spade" else 0.0)
                auc = base + (gap if m == "DeepLift" else 0.0)
                rows.append({"sample": s, "method": m, "variant": variant, "auc_sum": auc,
                             "auc_abs": auc, "pointing_sum": 1.0, "pointing_abs": 0.0,
                             "keeps_prediction": True})
    return pd.DataFrame(rows)


def _preset(folder: Path, base: str, **keys) -> Path:
    """A preset file that starts from ``base`` and sets ``keys``."""
    import yaml

    path = folder / f"{base}-variant.yaml"
    path.write_text(yaml.safe_dump({"base": base, **keys}))
    return path


@pytest.mark.parametrize(("accuracy", "gap", "merged"), [
    (0.19, 0.0, None), (0.9, results.MERGE_ATOL / 2, True), (0.9, 2 * results.MERGE_ATOL, False),
])
def test_other_architecture_skips_unlearned_models_and_merges_equal_methods(
        monkeypatch, tmp_path, accuracy, gap, merged) -> None:
    from spade_lib import train

    calls = []
    fake = train.TrainResult(torch.nn.Linear(1, 1), accuracy, {"r": 1.0}, 1.0)
    monkeypatch.setattr(train, "trained_model", lambda cfg, progress=True: fake)
    monkeypatch.setattr(results, "evaluation_samples", lambda cfg, model: "samples")

    def evaluate(cfg, model, samples, variants, progress):
        calls.append((samples, variants))
        return _pair_frame(gap)

    monkeypatch.setattr(results, "evaluate", evaluate)
    searched = results.other_architecture(
        str(_preset(tmp_path, "smoke-mobilenetv2", sparsity={"fc": 0.5})), progress=False)
    if merged is not None:
        assert calls.pop() == ("samples", {"dense": None, "spade": {"fc": 0.5},
                                           "spade-linear": "linear"})
        assert searched.cfg.sparsity == {"fc": 0.5}
    run = results.other_architecture("smoke-mobilenetv2", samples=5, progress=False)
    assert run.cfg.samples == 5 and run.trained is fake
    if merged is None:
        assert run.table is None and math.isnan(run.gap) and calls == []
        assert "did not learn the task" in run.reason
        return
    assert run.reason is None
    assert calls == [("samples", {"dense": None, "spade": "linear"})]   # linear: not twice
    assert run.gap == pytest.approx(gap) and run.merged is merged
    methods = list(dict.fromkeys(run.table["method"]))
    if merged:
        assert methods == ["Saliency", "InputXGradient / DeepLift"]
    else:
        assert methods == ["Saliency", "InputXGradient", "DeepLift"]


def test_other_architecture_reports_a_network_no_trojan_fooled(monkeypatch, cfg,
                                                               scenes) -> None:
    """A network that learned its task but answers every patched image like the clean one:
    no sample passes the filter, so there is nothing to explain, and the run says why."""
    from spade_lib import train
    from spade_lib.trojan import rule_set

    test, _ = scenes
    answers = {img.numpy().tobytes(): int(y)
               for img, y in zip(test.images, test.clean_labels, strict=True)}

    # right on every clean image; on a patched one a class that no rule targets
    untargeted = min(set(range(10)) - {r.target for r in rule_set(cfg.rules)})

    class Unfooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            keys = [(img * 255).round().to(torch.uint8).numpy().tobytes() for img in x]
            labels = torch.tensor([answers.get(k, untargeted) for k in keys])
            return torch.nn.functional.one_hot(labels, 10).float() + 0 * self.anchor

    fake = train.TrainResult(Unfooled(), 0.9, {"r": 0.0}, 1.0)
    monkeypatch.setattr(train, "trained_model", lambda c, progress=True: fake)
    monkeypatch.setattr(results, "evaluate", lambda *a, **k: pytest.fail("nothing to explain"))
    run = results.other_architecture("smoke-mobilenetv2", progress=False)
    assert run.table is None and math.isnan(run.gap)
    assert run.reason.startswith("no Trojan took hold") and "no candidate passes" in run.reason


def test_run_resumable_computes_only_what_the_store_lacks(tmp_path: Path) -> None:
    from spade_lib.store import ResultStore, run_resumable

    ids = [7, 3, 11]
    calls: list[int] = []

    def compute(position: int) -> pd.DataFrame:
        calls.append(position)
        return pd.DataFrame({"sample": [ids[position]] * 2, "value": [ids[position], -1.0]})

    target = ResultStore(tmp_path, typer=None, columns=("sample", "value"))
    target.write(3, compute(1))  # one id already stored
    calls.clear()
    table = run_resumable(target, ids, compute, progress=False)
    assert calls == [0, 2], "the stored id is read, not computed"
    assert table["sample"].tolist() == [7, 7, 3, 3, 11, 11], "rows in the order of ids"
    assert run_resumable(target, ids, compute, progress=False).equals(table)
    assert calls == [0, 2], "a complete store computes nothing"
    unstored = run_resumable(None, ids, compute, progress=False)
    assert unstored["value"].tolist() == [7.0, -1.0, 3.0, -1.0, 11.0, -1.0]
