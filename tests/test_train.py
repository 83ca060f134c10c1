"""Training: learns, plants the Trojans, is deterministic, and is cached by its config hash."""

from __future__ import annotations

import pytest
import torch

from spade_lib import config, train


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> config.Config:
    return config.load("smoke", cache_dir=str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def trained(cfg: config.Config) -> train.TrainResult:
    return train.trained_model(cfg, progress=False)


def test_training_learns_and_reports_every_rule(cfg: config.Config,
                                                trained: train.TrainResult) -> None:
    assert not trained.cached and trained.checkpoint is not None and trained.checkpoint.exists()
    assert trained.clean_accuracy > 0.3  # ten classes: chance is 0.1
    rules = [r.name for r in train.data.poisoned_test(
        train.data.load_scenes(cfg)[1], cfg.rules).rules]
    assert list(trained.attack_success) == rules
    assert all(0.0 <= v <= 1.0 for v in trained.attack_success.values())
    table = trained.table()
    assert len(table) == 1 + len(rules)
    assert table["accuracy (%)"].iloc[0] == pytest.approx(100 * trained.clean_accuracy)
    losses = [h["loss"] for h in trained.history]
    assert losses[-1] < losses[0]
    assert [h["lr"] for h in trained.history] == pytest.approx(
        [cfg.lr * cfg.lr_gamma ** ((e + 1) // cfg.lr_step) for e in range(cfg.epochs)])


def test_second_call_loads_the_same_model(cfg: config.Config, trained: train.TrainResult) -> None:
    again = train.trained_model(cfg, progress=False)
    assert again.cached and again.checkpoint == trained.checkpoint
    for (k, a), b in zip(trained.model.state_dict().items(), again.model.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k
    assert again.clean_accuracy == trained.clean_accuracy


def test_training_is_deterministic(cfg: config.Config, trained: train.TrainResult) -> None:
    twin = train.train(cfg, progress=False)
    for (k, a), b in zip(trained.model.state_dict().items(), twin.model.state_dict().values(),
                         strict=True):
        assert torch.equal(a, b), k


def test_checkpoint_key_ignores_evaluation_settings(cfg: config.Config) -> None:
    path = train.checkpoint_path(cfg)
    assert train.checkpoint_path(cfg.replace(samples=77, methods=["Saliency"])) == path
    assert train.checkpoint_path(cfg.replace(epochs=cfg.epochs + 1)) != path


def test_evaluate_matches_a_direct_count(cfg: config.Config, trained: train.TrainResult) -> None:
    _, test = train.data.load_scenes(cfg)
    model = trained.model.eval()
    with torch.no_grad():
        logits = model(test.images[:50].float() / 255)
    direct = (logits.argmax(1) == test.clean_labels[:50]).float().mean()
    assert (train.predict(model, test.images[:50]) == test.clean_labels[:50]).float().mean() \
        == direct


def test_full_scale_dataset_is_refused_with_guidance(tmp_path) -> None:
    big = config.load("imagenet-resnet50", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="'imagenet'.*fashion-mnist"):
        train.trained_model(big)


def test_random_shift_is_a_seeded_crop_of_the_reflect_padded_image() -> None:
    images = torch.rand(5, 3, 8, 8)
    assert train.random_shift(images, 0, torch.Generator().manual_seed(0)) is images
    a = train.random_shift(images, 2, torch.Generator().manual_seed(1))
    b = train.random_shift(images, 2, torch.Generator().manual_seed(1))
    assert a.shape == images.shape and torch.equal(a, b)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="reflect")
    for i in range(5):
        crops = [padded[i, :, y:y + 8, x:x + 8] for y in range(5) for x in range(5)]
        assert any(torch.equal(a[i], c) for c in crops)
    many = torch.rand(64, 3, 8, 8)
    shifted = train.random_shift(many, 2, torch.Generator().manual_seed(2))
    unmoved = sum(torch.equal(x, y) for x, y in zip(shifted, many, strict=True))
    assert unmoved < 16  # each image stays in place with probability 1/25


def test_learning_rate_warms_up_linearly_then_decays_by_steps() -> None:
    cfg = config.load("smoke", lr=0.1, lr_step=2, lr_gamma=0.5, warmup_steps=4)
    steps = 10  # per epoch
    assert [train.learning_rate(cfg, 0, s) for s in range(5)] == pytest.approx(
        [0.025, 0.05, 0.075, 0.1, 0.1])
    assert [train.learning_rate(cfg, e, e * steps) for e in range(5)] == pytest.approx(
        [0.025, 0.1, 0.05, 0.05, 0.025])
    plain = cfg.replace(warmup_steps=0)
    assert train.learning_rate(plain, 0, 0) == 0.1
    assert train.learning_rate(plain, 3, 35) == pytest.approx(0.05)


def test_optimizer_follows_the_config() -> None:
    model = torch.nn.Linear(3, 2)
    sgd = train.make_optimizer(model, config.load("smoke"))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9
    adamw = train.make_optimizer(model, config.load("smoke-convnext"))
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.defaults["weight_decay"] == 0.05 and adamw.defaults["lr"] == 0.002


def test_convnext_style_network_learns_photo_scenes_with_its_recipe(tmp_path) -> None:
    # 400 steps of the cpu-convnext recipe (width 32, AdamW with warm-up) on photo scenes: 41.5%
    # clean. The failures it guards against, measured the same way: SGD at the ResNet's rate 8.5%
    # (loss stuck at 2.23), layer scale from 0.1 instead of 1 31.5%. Plain smoke scenes cannot
    # tell: every one of these recipes passes 50% there. About 80 s.
    cfg = config.load("smoke-convnext", cache_dir=str(tmp_path), scene="photo-shared",
                      train_size=12800, width=32, batch_size=128, epochs=4, lr_step=4,
                      warmup_steps=100)
    result = train.trained_model(cfg, progress=False)
    assert result.clean_accuracy > 0.35
    assert result.history[-1]["loss"] < 0.8 * result.history[0]["loss"]
