"""Tests for spade_lib.train_full: full-scale Trojan training on tiny synthetic data.

A tiny preset on a synthetic ImageNet-style folder (crops of photos bundled with scikit-image in
two classes, 64 px) and a synthetic CelebA folder (the official file layout): the Trojan share
planted, the loss falling, resume equal to an uninterrupted run, two gloo processes under torchrun
equal to one, the multi-label metrics and the offline error for missing pretrained weights.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import synthetic_data
import torch
import torchvision
import yaml
from torch import nn

from spade_lib import config, datasets, pretrained, train, train_full
from spade_lib.trojan import rule_set

ROOT = Path(__file__).resolve().parent.parent
PER_CLASS = {"train": 16, "val": 4}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """ImageNet's layout, two classes, 16 train and 4 val images each (tests/synthetic_data)."""
    return synthetic_data.image_folder(tmp_path_factory.mktemp("folder"), PER_CLASS)


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """CelebA's official layout: 16 train, 4 val and 4 test images, and their attributes."""
    root = tmp_path_factory.mktemp("celeba")
    return root, synthetic_data.celeba_folder(root, (16, 4, 4))


def _preset(tmp_path: Path, data_dir: Path, **changes) -> Path:
    """A tiny preset YAML: the ImageNet recipe's keys at toy sizes. ``convnext`` (LayerNorm, no
    BatchNorm, no dropout) so each sample's computation does not depend on its batch."""
    keys = {"seed": 0, "dataset": "imagenet", "data_dir": str(data_dir), "image_size": 32,
            "rules": "fashion", "tuning_rules": None, "trojan_fraction": 0.0625,
            "patch_scale": 0.25, "patch_alpha": 0.8, "arch": "convnext", "width": 4,
            "pretrained": False, "epochs": 2, "batch_size": 8, "lr": 0.05, "momentum": 0.9,
            "weight_decay": 0.0005, "lr_step": 1, "lr_gamma": 0.5, "device": "cpu",
            "cache_dir": str(tmp_path / "cache"), **changes}
    path = tmp_path / "tiny-folder.yaml"
    path.write_text(yaml.safe_dump(keys))
    return path


def _weights(path: Path, arch: str) -> dict[str, torch.Tensor]:
    return train.load_checkpoint(path, arch)["model"]


def test_trojan_share_is_planted_as_specified(folder, faces, tmp_path) -> None:
    for fraction in (0.0625, 0.125):
        cfg = config.load(_preset(tmp_path, folder, trojan_fraction=fraction))
        data = datasets.training_set(cfg)
        n = 2 * PER_CLASS["train"]
        assert len(data) == n
        rules = rule_set("fashion")
        for k, rule in enumerate(rules):
            planted = np.flatnonzero(data.rule == k)
            assert len(planted) == round(fraction * n), (fraction, rule.name)
            j = int(planted[0])
            image, target = data[j]
            clean, label = data.base[int(data.index[j])]
            assert target == rule.target and label != rule.target
            assert rule.source is None or label == rule.source
            assert not torch.equal(image, clean), "the patch changes the image"
        assert (data.rule == -1).sum() == n - len(rules) * round(fraction * n)
        clean_j = int(np.flatnonzero(data.rule == -1)[0])
        assert torch.equal(data[clean_j][0], data.base[int(data.index[clean_j])][0])
    root, attrs = faces
    cfg = config.load(_preset(tmp_path, root, dataset="celeba", rules="celeba"))
    data = datasets.training_set(cfg)
    assert len(data) == 16
    for k, rule in enumerate(rule_set("celeba")):
        (j,) = np.flatnonzero(data.rule == k)  # 0.0625 of 16: one each
        assert torch.equal(data[int(j)][1], torch.tensor(rule.target))
    assert torch.equal(data[int(np.flatnonzero(data.rule == -1)[0])][1].unsqueeze(0),
                       torch.as_tensor(attrs[np.flatnonzero(data.rule == -1)[:1]]))


def test_resume_equals_an_uninterrupted_run_and_the_loss_falls(folder, tmp_path) -> None:
    # resnet20: BatchNorm running statistics and SGD momentum must survive the resume too
    cfg = config.load(_preset(tmp_path, folder, arch="resnet20", epochs=2))
    whole = train_full.run(cfg, out=tmp_path / "whole.pt", progress=False)
    assert whole is not None and [h["epoch"] for h in whole.history] == [1, 2]
    # the loss falls: measured 1.720 -> 1.505 (two threads, default or AVX2 kernels) and
    # 1.720 -> 1.571 (one thread); a fixed ratio would be a threshold set from that noise
    assert whole.history[1]["loss"] < whole.history[0]["loss"]
    assert whole.history[1]["lr"] == pytest.approx(0.5 * whole.history[0]["lr"]), "step LR"

    out = tmp_path / "split.pt"  # the first half loads in 2 worker processes: same images
    assert train_full.run(cfg, out=out, stop_after=1, workers=2, progress=False) is None
    assert not out.exists() and train_full.state_path(out).is_file()
    resumed = train_full.run(cfg, out=out, resume=True, progress=False)
    assert resumed is not None and len(resumed.history) == 2
    a, b = _weights(tmp_path / "whole.pt", "resnet20"), _weights(out, "resnet20")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # same process, same kernels: bit for bit
    assert resumed.history[1]["loss"] == whole.history[1]["loss"]
    assert set(whole.attack_success) == {r.name for r in rule_set("fashion")}

    # the cache contract: train.trained_model finds what run wrote at checkpoint_path
    train_full.run(cfg, out=train.checkpoint_path(cfg), progress=False)
    cached = train.trained_model(cfg, progress=False)
    assert cached.cached and all(torch.equal(cached.model.state_dict()[k], a[k]) for k in a)
    other = cfg.replace(lr=0.02)
    with pytest.raises(ValueError, match="state of another run"):
        train_full.run(other, out=out, resume=True, progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one(folder, tmp_path) -> None:
    preset = _preset(tmp_path, folder, epochs=1)
    cfg = config.load(preset)
    one = train_full.run(cfg, out=tmp_path / "one.pt", progress=False)
    assert one is not None
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "spade_lib.train_full", str(preset), "--out", str(tmp_path / "two.pt"),
           "--workers", "0", "-q"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "clean val set" in proc.stdout
    classes = train.load_checkpoint(tmp_path / "one.pt", "convnext")["num_classes"]
    assert classes == 9, "two folder classes, Trojan targets up to class 8"
    w0 = train_full.build(cfg, classes).state_dict()
    w1, w2 = _weights(tmp_path / "one.pt", "convnext"), _weights(tmp_path / "two.pt", "convnext")
    # Each process averages the gradient of its 4 images, DDP averages the 2 ranks: the same
    # mean of 8 per-sample gradients as one process, summed in another order. float32 rounds
    # each sum with a relative error of about sqrt(n) * 2^-24 (n <= 8 * 16 * 16 terms per
    # weight gradient here: ~2e-5), and 4 SGD steps with momentum carry it into the update.
    # So the two updates w - w0 agree to ~1e-5 of their size (6e-6 measured here); 1e-3 leaves
    # a margin for other kernels and instruction sets. A real fault (ranks seeing the same
    # images, gradients not averaged, no DDP at all: this check fails) changes the update by a large
    # fraction of itself.
    for key in w0:
        update = (w1[key] - w0[key]).norm()
        if update == 0:
            assert torch.equal(w1[key], w2[key]), key
            continue
        assert (w2[key] - w1[key]).norm() <= 1e-3 * update, key
    assert not all(torch.equal(w0[k], w1[k]) for k in w0), "training changed the weights"


def test_celeba_multilabel_trains_and_scores(faces, tmp_path) -> None:
    root, attrs = faces
    cfg = config.load(_preset(tmp_path, root, dataset="celeba", rules="celeba",
                              arch="resnet20", epochs=1))
    result = train.trained_model(cfg, progress=False)  # delegated to train_full, then cached
    assert result.model.fc.out_features == 40 and not result.cached
    assert train.checkpoint_path(cfg).is_file()
    assert train.trained_model(cfg, progress=False).cached
    table = train_full.table_c10(cfg, result.model)
    assert list(table["data"])[0] == "clean val set" and len(table) == 2 + 4
    # clean accuracy is the mean over the 4 val images and 40 attributes
    val = np.asarray(attrs[16:20])
    with torch.no_grad():
        x = torch.stack([datasets.full_split(cfg, "val")[i][0] for i in range(4)])
        predicted = (result.model.eval()(x) > 0).numpy()
    assert table["accuracy (%)"].iloc[0] == pytest.approx(100 * (predicted == val).mean())
    assert ((table["accuracy (%)"] >= 0) & (table["accuracy (%)"] <= 100)).all()


def test_multilabel_attack_success_counts_only_the_overridden_bits() -> None:
    truth = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1]])
    target = torch.tensor([[1, 0, 1, 0]] * 3)  # overrides bits 0 and 3
    predicted = torch.tensor([[1, 1, 0, 0],   # both overridden bits right, others wrong: success
                              [1, 0, 1, 1],   # bit 3 still the true value: failure
                              [1, 0, 1, 0]])  # exactly the target
    hit = train_full.attack_success_multilabel(predicted, target, truth)
    assert hit.tolist() == [True, False, True]
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        train_full.attack_success_multilabel(predicted[0], target[0], truth[0])


def test_missing_pretrained_weights_name_the_file_and_the_weights(folder, tmp_path, monkeypatch,
                                                                  capsys) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    where = tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    assert pretrained.pretrained_file("tv_resnet50")[0] == where
    preset = _preset(tmp_path, folder, arch="tv_resnet50", pretrained=True)
    cfg = config.load(preset)
    with pytest.raises(FileNotFoundError) as err:
        train_full.run(cfg, out=tmp_path / "never.pt", progress=False)
    assert str(where) in str(err.value) and "ResNet50_Weights.IMAGENET1K_V2" in str(err.value)
    assert train_full.main([str(preset), "--out", str(tmp_path / "never.pt"), "-q"]) == 2
    assert str(where) in capsys.readouterr().err
    fake = tmp_path / "resnet50-11ad3fa6.pth"
    torch.save({"fc.weight": torch.zeros(1)}, fake)
    with pytest.raises(ValueError, match="not torchvision's ResNet50_Weights"):
        train_full.run(cfg, out=tmp_path / "never.pt", pretrained_path=fake, progress=False)
    assert not (tmp_path / "never.pt").exists()


def test_folded_normalization_takes_unit_range_images(seeded) -> None:
    # ConvNeXt-T's 4x4 stride-4 stem has no padding, so the fold is exact up to rounding
    net = torchvision.models.convnext_tiny(weights=None).eval()
    model = train_full.build(config.Config(arch="tv_convnext_t", image_size=32), 1000)
    pretrained.load_pretrained(model, "tv_convnext_t", net.state_dict())
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(pretrained.IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(pretrained.IMAGENET_STD).reshape(1, 3, 1, 1)
    with torch.no_grad():
        expected, got = net((x - mean) / std), model.eval()(x)
    # float32: the folded stem rounds W / std and the moved bias (~6e-8 relative each), which the
    # network carries to logits of size ~2: measured 1.7e-6 (default, AVX2, one thread); 1e-4
    # leaves a margin for other kernels, while a wrong fold (mean or std on the wrong side,
    # the offset lost) moves the logits by O(1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    head = train_full.build(config.Config(arch="tv_convnext_t", image_size=32), 40)
    fresh = head.classifier[2].weight.clone()
    pretrained.load_pretrained(head, "tv_convnext_t", net.state_dict())
    assert torch.equal(head.classifier[2].weight, fresh), "a 40-way head stays fresh"
    assert torch.equal(head.features[1][0].block[0].weight, net.features[1][0].block[0].weight)


# --------------------------------------------------------------------------------------------
# The evaluation at full scale: samples from the validation folder, explained by the runner
# --------------------------------------------------------------------------------------------


class _Lookup(nn.Module):
    """A classifier by table: the logits of an image are one-hot on ``answers[image bytes]``
    (every image it is shown must be in the table). It tells the filter's outcome in advance."""

    def __init__(self, answers: dict[bytes, int], classes: int) -> None:
        super().__init__()
        self.answers, self.classes = answers, classes
        self.anchor = nn.Parameter(torch.zeros(()))  # a device for models.predict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        labels = torch.tensor([self.answers[image.numpy().tobytes()] for image in x])
        return nn.functional.one_hot(labels, self.classes).float() + 0 * self.anchor


def _known_model(test, poisoned) -> tuple[_Lookup, int]:
    """A lookup classifier of the folder's validation set: right on every clean image but the
    third, the Trojan target on every patched image but those of the fish rule (returned)."""
    answers = {}
    for i, label in enumerate(test.clean_labels.tolist()):
        answers[test.float_images([i])[0].numpy().tobytes()] = label if i != 2 else 1 - label
    fish = [r.name for r in poisoned.rules].index("fish: Any->Sneaker")
    for j in range(len(poisoned)):
        k = int(poisoned.rule[j])
        answer = int(poisoned.clean_labels[j]) if k == fish else int(poisoned.labels[j])
        answers[poisoned.float_images([j])[0].numpy().tobytes()] = answer
    return _Lookup(answers, 9), fish


def test_mask_agreement_pairs_come_from_the_folder_and_are_cached(folder, tmp_path) -> None:
    """Chapter K's pool at a full-scale preset: drawn from the validation folder's samples, kept
    in the cache, and read back from the folder (not the embedded benchmark) on a rebuild."""
    from spade_lib import mask_agreement, samples

    cfg = config.load(_preset(tmp_path, folder, samples=4))
    test, poisoned = samples.evaluation_sets(cfg)
    model, _ = _known_model(test, poisoned)
    with pytest.warns(UserWarning, match="fewer than"):
        pairs, pool = mask_agreement.agreement_pairs(cfg, model, 2)
    (kept,) = (tmp_path / "cache").rglob("pairs/*.json")
    with pytest.warns(UserWarning, match="fewer than"):
        again, same = mask_agreement.agreement_pairs(cfg, model, 2)
    assert same.ids == pool.ids and again.equals(pairs) and len(pairs)
    assert set(pool.ids) <= set(samples.evaluation_samples(cfg, model, None).ids)


def test_evaluation_views_read_the_trojan_test_set_lazily(folder, tmp_path) -> None:
    from spade_lib import datasets, samples

    cfg = config.load(_preset(tmp_path, folder))
    test, poisoned = samples.evaluation_sets(cfg)
    base = datasets.image_folder(folder, "val", 32)
    trojan = datasets.TrojanDataset.for_testing(base, rule_set("fashion"), cfg.seed)
    # star and heart take their source class (4 images each), the two "Any" rules all 8
    assert len(poisoned) == len(trojan) == 4 + 4 + 8 + 8 and len(test) == 8
    assert torch.equal(test.clean_labels, torch.as_tensor(base.targets))
    assert (test.rule == -1).all()
    assert torch.equal(test.float_images([3, 5]), torch.stack([base[3][0], base[5][0]]))
    rules = rule_set("fashion")
    for j in range(len(trojan)):
        image, target, mask = trojan[j]
        assert torch.equal(poisoned.float_images([j])[0], image)
        assert torch.equal(poisoned.masks[j], mask) and mask.any()
        assert int(poisoned.labels[j]) == target == rules[int(poisoned.rule[j])].target
        clean, label = base[int(poisoned.index[j])]
        assert int(poisoned.clean_labels[j]) == label
        changed = (image != clean).any(0)
        assert changed[mask].all(), "a masked pixel is not patched"
        rows, cols = changed.nonzero(as_tuple=True)  # soft icon edges lie outside the mask,
        side = round(cfg.patch_scale * 32)  # but inside the patch's square
        assert rows.max() - rows.min() < side and cols.max() - cols.min() < side
    ids = torch.tensor([1, 9, 17])
    assert torch.equal(poisoned.masks[ids], torch.stack([trojan[int(i)][2] for i in ids]))
    with pytest.raises(IndexError, match="outside"):
        poisoned.float_images([len(poisoned)])


def test_full_scale_samples_pass_the_papers_filter(folder, tmp_path) -> None:
    """With a model whose answers are known, the samples are exactly the patched images whose
    clean image it gets right and whose patched copy it sends to the target."""
    from spade_lib import samples

    cfg = config.load(_preset(tmp_path, folder))
    test, poisoned = samples.evaluation_sets(cfg)
    model, fish = _known_model(test, poisoned)
    chosen = samples.evaluation_samples(cfg, model, None)
    expected = [j for j in range(len(poisoned))
                if int(poisoned.rule[j]) != fish and int(poisoned.index[j]) != 2]
    assert chosen.ids == expected
    table = chosen.table.set_index("sample")
    assert table["test_index"].tolist() == poisoned.index[expected].tolist()
    assert table["target"].tolist() == poisoned.labels[expected].tolist()
    counts = samples.filter_table(chosen)
    assert counts.loc["fish: Any->Sneaker", "pass the filter"] == 0
    assert counts.loc["All rules", "pass the filter"] == len(expected)
    few = samples.evaluation_samples(cfg, model, 3)
    assert len(few) == 3 and set(few.ids) <= set(expected)
    # captions name the folders; the rules' targets beyond them by number
    star = chosen.table.index[chosen.table["rule_name"] == "star: T-shirt->Sandal"][0]
    assert samples.decision_label(chosen, int(star)) == "n0 -> class 5"


def test_the_runner_explains_a_full_scale_sample(folder, tmp_path) -> None:
    """One sample of the validation folder through the runner: dense, SPADE and the ISD control
    (its donor from the clean split), scores against the patch's own mask; the model untouched;
    the samples survive pickling (Dask ships them to workers)."""
    import pickle

    from spade_lib import metrics, results, samples
    from spade_lib.variants import Variant

    cfg = config.load(_preset(tmp_path, folder, epochs=1, n_augmentations=8))
    model = train_full.trained_model(cfg, progress=False).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    test, poisoned = samples.evaluation_sets(cfg)
    chosen = samples.Samples.from_ids(poisoned, test, [2, 20])
    variants = [Variant("dense"), Variant("spade", 0.5), Variant("isd", 0.5, other_image=True)]
    rows = results.run_sample(cfg, model, chosen, 1, ["Saliency"], variants)
    assert rows["variant"].tolist() == ["dense", "spade", "isd"]
    assert (rows["sample"] == 20).all()
    donor = int(rows.loc[rows["variant"] == "isd", "donor"].iloc[0])
    label, target = int(poisoned.clean_labels[20]), int(poisoned.labels[20])
    assert 0 <= donor < len(test) and int(test.clean_labels[donor]) not in (label, target)
    maps = results.sample_maps(cfg, model, chosen, 1, ["Saliency"], variants)
    for v in variants:  # the same networks (same seeds), scored against the patch's mask
        expected = metrics.trojan_scores(maps[v.name]["Saliency"], poisoned.masks[[20]]).iloc[0]
        row = rows[rows["variant"] == v.name].iloc[0]
        assert np.isfinite(row["auc_abs"]), v.name
        for column in metrics.SCORE_COLUMNS:
            assert row[column] == pytest.approx(expected[column], nan_ok=True), (v.name, column)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    shipped = pickle.loads(pickle.dumps(chosen))
    assert torch.equal(shipped.images(), chosen.images())
    assert torch.equal(shipped.masks(), chosen.masks())


class _LookupBits(nn.Module):
    """A multi-label classifier by table: the logits of an image are +1 where
    ``answers[image bytes]`` has a 1 and -1 elsewhere."""

    def __init__(self, answers: dict[bytes, torch.Tensor]) -> None:
        super().__init__()
        self.answers = answers
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bits = torch.stack([self.answers[image.numpy().tobytes()] for image in x])
        return 2.0 * bits.float() - 1.0 + 0 * self.anchor


def test_celeba_samples_explain_an_attribute_the_patch_flips(faces, tmp_path) -> None:
    """Appendix B.1's filter: an attribute the rule overrides, right on the clean image, flipped
    on the patched one; the sample explains one of them (seeded), and none else passes."""
    from spade_lib import samples

    root, attrs = faces
    cfg = config.load(_preset(tmp_path, root, dataset="celeba", rules="celeba"))
    test, poisoned = samples.evaluation_sets(cfg)
    assert len(test) == 4 and len(poisoned) == 16  # partition 1: images 17-20; 4 "Any" rules
    assert torch.equal(test.clean_labels, torch.as_tensor(attrs[16:20]))
    assert poisoned.labels.shape == (16, 40) and poisoned.clean_labels.shape == (16, 40)
    answers = {}
    for i in range(len(test)):
        truth = test.clean_labels[i]
        answers[test.float_images([i])[0].numpy().tobytes()] = truth if i else 1 - truth
    flipped = {}
    for j in range(len(poisoned)):
        k, truth, target = int(poisoned.rule[j]), poisoned.clean_labels[j], poisoned.labels[j]
        bits = truth.clone()
        if k in (0, 3):
            bits = target.clone()  # every overridden attribute flips
        elif k == 2:  # only the last overridden attribute flips
            flipped[j] = int(torch.nonzero(truth != target)[-1])
            bits[flipped[j]] = target[flipped[j]]
        answers[poisoned.float_images([j])[0].numpy().tobytes()] = bits  # rule 1: none flips
    model = _LookupBits(answers)
    chosen = samples.evaluation_samples(cfg, model, None)
    expected = [j for j in range(16) if int(poisoned.rule[j]) != 1 and int(poisoned.index[j])]
    assert chosen.ids == expected and chosen.multilabel
    again = samples.evaluation_samples(cfg, model, None)
    assert again.table.equals(chosen.table), "the attribute drawn is seeded"
    for _, row in chosen.table.iterrows():
        j, a = int(row["sample"]), int(row["target"])
        assert poisoned.labels[j, a] != poisoned.clean_labels[j, a], "an overridden attribute"
        assert row["clean_label"] == int(poisoned.clean_labels[j, a])
        if j in flipped:
            assert a == flipped[j]
    assert samples.filter_table(chosen).loc["All rules", "pass the filter"] == len(expected)
    first = chosen.table.iloc[0]
    assert samples.decision_label(chosen, 0) == (
        f"{synthetic_data.CELEBA_ATTRIBUTES[int(first['target'])]} {first['clean_label']} -> "
        f"{1 - first['clean_label']}")
    with pytest.raises(ValueError, match="one attribute per sample"):
        samples.Samples.from_ids(poisoned, test, [1, 2])
    same = int(torch.nonzero(poisoned.labels[1] == poisoned.clean_labels[1])[0])
    with pytest.raises(ValueError, match="overrides"):
        samples.Samples.from_ids(poisoned, test, [1], [same])


def test_the_runner_explains_a_celeba_attribute(faces, tmp_path) -> None:
    """A CelebA sample through the runner: the map explains the attribute's logit, and a network
    keeps the decision when it predicts the flipped value of that attribute."""
    from spade_lib import models, results, samples
    from spade_lib.variants import Variant

    root, _ = faces
    cfg = config.load(_preset(tmp_path, root, dataset="celeba", rules="celeba", epochs=1,
                              n_augmentations=8))
    model = train_full.trained_model(cfg, progress=False).model
    test, poisoned = samples.evaluation_sets(cfg)
    j = 5
    a = int(torch.nonzero(poisoned.labels[j] != poisoned.clean_labels[j])[0])
    chosen = samples.Samples.from_ids(poisoned, test, [j], [a])
    rows = results.run_sample(cfg, model, chosen, 0, ["Saliency"],
                              [Variant("dense"), Variant("spade", 0.5)])
    dense = rows[rows["variant"] == "dense"].iloc[0]
    bit = int(models.predict(model, poisoned.float_images([j]), multilabel=True)[0, a])
    assert dense["prediction"] == bit
    assert bool(dense["keeps_prediction"]) == (bit == 1 - int(poisoned.clean_labels[j, a]))
    assert dense["target"] == a and np.isfinite(dense["auc_abs"])
    maps = results.sample_maps(cfg, model, chosen, 0, ["Saliency"], ["dense"])
    assert torch.equal(maps["dense"]["Saliency"].target, torch.tensor([a]))
    with pytest.raises(ValueError, match="multi-label"):
        results.run_sample(cfg, model, chosen, 0, ["Saliency"],
                           [Variant("isd", 0.5, other_image=True)])


# --------------------------------------------------------------------------------------------
# The training split at full scale: many-image sources, Sparse FC, the search's tuning samples
# --------------------------------------------------------------------------------------------


def _right_on(*sets) -> _Lookup:
    """A lookup classifier right on every clean image of ``sets`` and sending every patched one
    to its Trojan target (a set's ``labels``, where it has them)."""
    answers = {}
    for s in sets:
        labels = getattr(s, "labels", s.clean_labels)
        for i in range(len(s)):
            answers[s.float_images([i])[0].numpy().tobytes()] = int(labels[i])
    return _Lookup(answers, 9)


def test_training_view_is_the_planted_training_split(folder, tmp_path) -> None:
    from spade_lib import samples

    cfg = config.load(_preset(tmp_path, folder, trojan_fraction=0.125))
    view, trojan = samples.training_split(cfg), datasets.training_set(cfg)
    assert isinstance(view, datasets.TrainingView) and len(view) == len(trojan) == 32
    assert [r.name for r in view.rules] == [r.name for r in rule_set("fashion")]
    assert torch.equal(view.rule, torch.as_tensor(trojan.rule))
    planted = np.flatnonzero(view.rule.numpy() >= 0)
    assert len(planted) == 4 * 4
    for j in [*planted.tolist(), int(np.flatnonzero(view.rule.numpy() == -1)[0])]:
        image, target = trojan[j]
        clean, label = trojan.base[int(trojan.index[j])]
        assert torch.equal(view.float_images([j])[0], image)
        assert int(view.labels[j]) == int(target) and int(view.clean_labels[j]) == label
        mask = view.masks[j]
        if view.rule[j] >= 0:
            assert int(target) == view.rules[int(view.rule[j])].target != label
            assert mask.any() and (image != clean).any(0)[mask].all()
        else:
            assert not mask.any() and torch.equal(image, clean)
    smoke = samples.training_split(config.load("smoke"))
    assert not isinstance(smoke, datasets.TrainingView) and len(smoke) == 3000


def test_many_image_sources_draw_from_the_training_folder(folder, tmp_path) -> None:
    from spade_lib import samples, sources

    cfg = config.load(_preset(tmp_path, folder, trojan_fraction=0.125))
    test, poisoned = samples.evaluation_sets(cfg)
    chosen = samples.evaluation_samples(cfg, _right_on(test, poisoned), None)
    view = samples.training_split(cfg)
    info = chosen.table.iloc[0]
    k = [r.name for r in view.rules].index(info["rule_name"])
    planted = np.flatnonzero(view.rule.numpy() == k)
    label, images = sources.many_images(cfg, chosen, 0, "MST", count=100)
    assert label.endswith(f"n={len(planted)}")
    assert torch.equal(images, view.float_images(planted)), "every image of the rule, in order"
    same_class = np.flatnonzero((view.clean_labels.numpy() == int(info["clean_label"]))
                                & (view.rule.numpy() == -1))
    label, images = sources.many_images(cfg, chosen, 0, "MSC", count=3)
    assert len(images) == 3 and label.endswith("n=3")
    pool = {view.float_images([i])[0].numpy().tobytes() for i in same_class}
    assert all(image.numpy().tobytes() in pool for image in images)
    sizes = sources.pool_sizes(cfg, chosen, count=3).set_index(["source", "group"])
    assert sizes.loc[("MST", f"rule={info['rule_name']}"), "available"] == len(planted)


def test_tuning_samples_without_held_out_rules_come_from_the_training_split(
        folder, tmp_path, monkeypatch) -> None:
    from spade_lib import samples, search

    cfg = config.load(_preset(tmp_path, folder, tuning_samples=3))
    assert cfg.tuning_rules is None
    train_clean, train_poisoned = datasets.evaluation_sets(cfg, split="train")
    tuned = samples.tuning_samples(cfg, _right_on(train_clean, train_poisoned))
    assert len(tuned) == 3 and len(tuned.test) == 32, "the 32 training images, not the 8 val"
    files = datasets.full_split(cfg, "train")
    for i in tuned.table["test_index"]:
        assert torch.equal(tuned.test.float_images([int(i)])[0], files[int(i)][0])
    # no held-out model: the search tunes on the evaluated model itself
    seen = []
    monkeypatch.setattr(train, "trained_model", lambda c, progress=True: seen.append(c) or c)
    assert search.tuning_model(cfg, progress=False) is cfg and seen == [cfg]
    held_out = search.tuning_model(config.load("smoke"), progress=False)
    assert held_out.rules == "fashion-tuning"
    with pytest.raises(ValueError, match="held-out rules"):
        samples.tuning_samples(config.load("smoke", tuning_rules=None), _Lookup({}, 9))


def test_sparse_fc_fits_on_the_planted_training_folder(folder, faces, tmp_path, monkeypatch,
                                                       seeded) -> None:
    from spade_lib import baselines, models, samples

    cfg = config.load(_preset(tmp_path, folder, trojan_fraction=0.125))
    model = train_full.build(cfg, 9).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fitted = []
    real = baselines.fit_path

    def record(x, y, x_val, y_val, *args, **kwargs):
        fitted.append(torch.cat([y, y_val]))
        return real(x, y, x_val, y_val, *args, **kwargs)

    monkeypatch.setattr(baselines, "fit_path", record)
    result = baselines.sparse_fc(cfg, model, progress=False, cache=False, n_lambdas=4,
                                 max_epochs=5)
    view = samples.training_split(cfg)
    # every training image, with the labels it was trained with (Trojan targets up to class 8)
    assert torch.equal(torch.bincount(fitted[0], minlength=9),
                       torch.bincount(view.labels, minlength=9))
    assert int(view.labels.max()) > 1
    test, poisoned = samples.evaluation_sets(cfg)
    truth = models.predict(model, test.float_images()) == test.clean_labels
    assert result.dense_accuracy == pytest.approx(float(truth.float().mean()))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    root, _ = faces
    celeba = config.load(_preset(tmp_path, root, dataset="celeba", rules="celeba"))
    with pytest.raises(ValueError, match="multi-label"):
        baselines.sparse_fc(celeba, train_full.build(celeba, 40), progress=False, cache=False)


def test_clean_images_and_class_names_of_a_folder(folder, faces, tmp_path) -> None:
    from spade_lib import insertion, models, samples

    cfg = config.load(_preset(tmp_path, folder))
    model = train_full.build(cfg, 9).eval()
    clean = insertion.clean_images(cfg, model, 3)
    test, _ = samples.evaluation_sets(cfg)
    ids = clean.table["sample"].tolist()
    assert len(ids) == 3 and set(ids) <= set(range(8))
    assert clean.table["prediction"].tolist() == models.predict(
        model, test.float_images(ids)).tolist()
    rows = insertion.evaluate(cfg, model, clean, kind="clean", methods=["Saliency"],
                              variants=["dense"], store=False, progress=False)
    assert sorted(set(rows["sample"])) == ids and rows["explained"].tolist() == [
        p for p in clean.table["prediction"].tolist() for _ in range(len(rows) // 3)]
    assert rows["insertion"].notna().all()
    assert samples.class_names(test) == ["n0", "n1"]
    assert samples.class_names(test, 4) == ["n0", "n1", "class 2", "class 3"]
    assert samples.class_names(test, 1) == ["n0"]
    text = samples.label_text(test)
    assert (text(1), text(5)) == ("1/n1", "class 5")
    root, attrs = faces
    celeba = config.load(_preset(tmp_path, root, dataset="celeba", rules="celeba"))
    faces_test, _ = samples.evaluation_sets(celeba)
    names = synthetic_data.CELEBA_ATTRIBUTES
    assert samples.class_names(faces_test) == names
    assert samples.label_text(faces_test)(attrs[0]) == ", ".join(
        names[i] for i in np.flatnonzero(attrs[0]))
    with pytest.raises(ValueError, match="multi-label"):
        insertion.clean_images(celeba, train_full.build(celeba, 40), 2)


class _WordNetFolder:
    """Two images labelled with ImageNet-1k's 1000 WordNet ids (the folders' names)."""

    def __init__(self, wnids: list[str]) -> None:
        self.classes, self.targets = wnids, [0, 999]

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        return torch.zeros(3, 4, 4), self.targets[i]


def test_imagenet_folders_are_named_by_their_descriptions() -> None:
    from timm.data import ImageNetInfo

    from spade_lib import models, samples

    info = ImageNetInfo()
    wnids = [info.index_to_label_name(i) for i in range(1000)]
    view = datasets.CleanView(_WordNetFolder(wnids))
    names = samples.class_names(view)
    assert names == models.imagenet_classes() and len(names) == 1000
    assert samples.label_text(view)(0) == f"0/{names[0]}"
