"""Sparse FC (Wong et al. 2021): the path fit, the point choice, the replaced head, the cache."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from nets import Tiny
from torch import nn

from spade_lib import baselines, config, train
from spade_lib.models import fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = {"max_images": 1500, "n_lambdas": 8, "max_epochs": 20}
"""Options that keep a smoke fit to a few seconds."""


def sparse_problem(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian features [n, 12] with non-zero means and scales, labels of 3 classes drawn from a
    softmax GLM that reads only features 0, 1 and 2; returns x, y and the true logits."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 12, generator=gen)
    x = 3.0 + z * torch.linspace(0.5, 2.0, 12)  # standardization must undo these
    w = torch.zeros(3, 12)
    w[0, 0], w[1, 1], w[2, 2], w[2, 0] = 4.0, 4.0, 4.0, -2.0
    logits = z @ w.T
    y = torch.multinomial(torch.softmax(logits, 1), 1, generator=gen).squeeze(1)
    return x, y, logits


@pytest.fixture(scope="module")
def synthetic() -> dict:
    x, y, logits = sparse_problem(3000)
    x_val, y_val, logits_val = sparse_problem(1000, seed=1)
    path, weights, biases, info = baselines.fit_path(
        x, y, x_val, y_val, 3, {"n_lambdas": 12, "max_epochs": 40}, seed=0)
    return {"x": x, "y": y, "x_val": x_val, "y_val": y_val, "logits_val": logits_val,
            "path": path, "weights": weights, "biases": biases, "info": info}


def test_path_selects_the_true_features_first(synthetic: dict) -> None:
    path, weights = synthetic["path"], synthetic["weights"]
    assert len(path) == 12 + 1 and path["lam"].iloc[-1] == 0.0
    assert list(path.columns) == list(baselines.PATH_COLUMNS)
    assert path["nonzero"].tolist() == (weights != 0).sum((1, 2)).tolist()
    # the penalty falls along the path, so the support grows (up to SAGA's noise at the end)
    assert path["lam"].is_monotonic_decreasing
    used = (weights != 0).any(1)  # [points, features]
    informative = used[:, :3].any(1)
    first = int(informative.float().argmax())
    assert path["nonzero"].iloc[first] > 0
    # every point with at most as many nonzero weights as the true GLM uses only true features
    small = path["nonzero"].to_numpy() <= 4
    assert small.any() and not used[torch.from_numpy(small)][:, 3:].any()


def test_path_beats_chance_and_nears_the_true_model(synthetic: dict) -> None:
    path, y_val = synthetic["path"], synthetic["y_val"]
    bayes = float((synthetic["logits_val"].argmax(1) == y_val).float().mean())
    se = math.sqrt(bayes * (1 - bayes) / len(y_val))
    best = path["val_accuracy"].max()
    assert best >= bayes - 3 * se > 1 / 3 + 0.2
    index, rule = baselines.select_point(path)
    chosen = path.iloc[index]
    assert chosen["nonzero"] > 0 and "absolute" in rule
    assert chosen["val_accuracy"] <= best - 0.06 + 1e-12
    low = path["val_accuracy"][path["val_accuracy"] <= best - 0.06]
    assert (low <= chosen["val_accuracy"]).all()


def test_folded_weights_reproduce_the_standardized_glm(synthetic: dict) -> None:
    """The path's weights act on raw features; their predictions are glm-saga's accuracies."""
    x_val, y_val, path = synthetic["x_val"], synthetic["y_val"], synthetic["path"]
    for i in range(len(path)):
        logits = x_val @ synthetic["weights"][i].T + synthetic["biases"][i]
        accuracy = float((logits.argmax(1) == y_val).float().mean())
        # float32 round-off can flip an exact tie of two logits, at most one sample in a thousand
        assert abs(accuracy - path["val_accuracy"].iloc[i]) <= 1 / len(y_val) + 1e-6


def test_fit_is_deterministic(synthetic: dict) -> None:
    x, y = synthetic["x"][:600], synthetic["y"][:600]
    fits = [baselines.fit_path(x, y, synthetic["x_val"], synthetic["y_val"], 3,
                               {"n_lambdas": 4, "max_epochs": 10}, seed=3) for _ in range(2)]
    assert torch.equal(fits[0][1], fits[1][1]) and torch.equal(fits[0][2], fits[1][2])
    pd.testing.assert_frame_equal(fits[0][0].drop(columns="seconds"),
                                  fits[1][0].drop(columns="seconds"))


def test_constant_feature_gets_no_weight() -> None:
    x, y, _ = sparse_problem(400)
    x[:, 5] = 0.0  # a ReLU unit that never fires
    path, weights, _, info = baselines.fit_path(x[:300], y[:300], x[300:], y[300:], 3,
                                                {"n_lambdas": 3, "max_epochs": 10})
    assert info["constant_features"] == 1
    assert torch.isfinite(weights).all() and not weights[:, :, 5].any()


def test_select_point_rules() -> None:
    path = pd.DataFrame({"val_accuracy": [0.1, 0.5, 0.8, 0.85, 0.9, 0.88],
                         "nonzero": [0, 2, 5, 9, 20, 40]})
    assert baselines.select_point(path, 0.06)[0] == 2  # 0.8 is the best at or below 0.84
    assert baselines.select_point(path, 0.0)[0] == 4  # the best itself
    index, rule = baselines.select_point(path, 0.85)  # only the empty point is that low
    assert index == 1 and "sparsest nonempty" in rule
    with pytest.raises(ValueError, match="all weights zero"):
        baselines.select_point(path.assign(nonzero=0))
    with pytest.raises(ValueError, match="accuracy_drop must be .* got 1.5"):
        baselines.select_point(path, 1.5)


def test_final_linear() -> None:
    assert baselines.final_linear(Tiny()) == "fc"
    assert baselines.final_linear(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))) \
        == "2"
    with pytest.raises(ValueError, match="Conv2d has no nn.Linear"):
        baselines.final_linear(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="Sequential has no nn.Linear"):
        baselines.final_linear(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        baselines.final_linear("fc")


@pytest.mark.parametrize("option, value, message", [
    ("alpha", 0, r"alpha must be a number in \(0, 1\], got 0"),
    ("alpha", 1.5, r"alpha must be .* got 1.5"),
    ("val_fraction", 0.7, r"val_fraction must be a number in \(0, 0.5\], got 0.7"),
    ("epsilon", 1.0, r"epsilon must be .* got 1.0"),
    ("accuracy_drop", -0.1, r"accuracy_drop must be a number in \[0, 1\), got -0.1"),
    ("max_images", 5, r"max_images must be None or at least 20 .* got 5"),
    ("max_images", 2.5, r"max_images must be an integer .* got 2.5"),
    ("n_lambdas", 0, r"n_lambdas must be an integer >= 1 .* got 0"),
    ("max_epochs", True, r"max_epochs must be an integer .* got True"),
    ("lr", -1.0, r"lr must be a positive finite number, got -1.0"),
    ("tol", float("nan"), r"tol must be a positive finite number, got nan"),
])
def test_bad_options_refused(cfg: config.Config, option: str, value: object,
                             message: str) -> None:
    with pytest.raises(ValueError, match=message):
        baselines.sparse_fc(cfg, Tiny(), progress=False, **{option: value})


def test_unknown_option_refused(cfg: config.Config) -> None:
    with pytest.raises(TypeError, match=r"unknown Sparse FC option\(s\) \['lambdas'\]"):
        baselines.sparse_fc(cfg, Tiny(), progress=False, lambdas=3)


def test_model_must_end_with_its_linear(cfg: config.Config) -> None:
    class Scaled(Tiny):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    with pytest.raises(ValueError, match="not the output of its last nn.Linear 'fc'"):
        baselines.sparse_fc(cfg, Scaled(), progress=False, cache=False, **FAST)


# --------------------------------------------------------------------------------------------
# The baseline on the smoke model
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    dense = train.trained_model(config.load("smoke"), progress=False).model
    dense.train()  # a user's model in training mode must come back in training mode
    cfg = config.load("smoke", cache_dir=str(tmp_path_factory.mktemp("cache")))
    before = fingerprint(dense)
    rng = torch.get_rng_state()
    result = baselines.sparse_fc(cfg, dense, progress=False, **FAST)
    return {"cfg": cfg, "dense": dense, "before": before, "result": result,
            "rng_kept": torch.equal(rng, torch.get_rng_state())}


def test_dense_model_untouched(smoke: dict) -> None:
    dense, result = smoke["dense"], smoke["result"]
    assert fingerprint(dense) == smoke["before"]
    assert smoke["rng_kept"]  # the caller's random numbers are not changed either
    assert all(m.training for m in dense.modules())
    assert result.model is not dense and not result.model.training
    assert dense.fc is not result.model.fc
    heads = {"fc.weight", "fc.bias"}
    new = result.model.state_dict()
    for name, tensor in dense.state_dict().items():
        if name not in heads:
            assert torch.equal(tensor, new[name]), name


def test_replaced_head_is_the_chosen_sparse_glm(smoke: dict) -> None:
    cfg, dense, result = smoke["cfg"], smoke["dense"], smoke["result"]
    assert result.head == "fc"
    assert result.sparsity == float((result.weight == 0).float().mean())
    assert result.sparsity == pytest.approx(result.chosen["sparsity"], abs=1e-6)
    assert len(result.path) == FAST["n_lambdas"] + 1
    index, rule = baselines.select_point(result.path)
    assert result.chosen["index"] == index and result.chosen["rule"] == rule
    assert 0 < result.chosen["nonzero"] == int((result.weight != 0).sum())
    # the model's logits are the new head applied to the dense model's penultimate features
    images = train.scenes.load_scenes(cfg)[1].float_images(range(64))
    feats = []
    hook = dense.fc.register_forward_hook(lambda _m, i, _o: feats.append(i[0]))
    try:
        dense.eval()
        with torch.no_grad():
            dense(images)
            logits = result.model(images)
    finally:
        hook.remove()
        dense.train()
    expected = feats[0] @ result.weight.T + result.bias
    # round-off of a d-term float32 dot product: d * eps times the sum of the terms' magnitudes
    scale = float((feats[0].abs() @ result.weight.abs().T + result.bias.abs()).max())
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(logits, expected, rtol=0, atol=4 * feats[0].shape[1] * eps * scale)


def test_accuracies_are_train_definitions(smoke: dict) -> None:
    cfg, dense, result = smoke["cfg"], smoke["dense"], smoke["result"]
    clean, success = train.trojan_accuracy(result.model, cfg)
    assert result.accuracy == clean and result.attack_success == success
    clean, success = train.trojan_accuracy(dense, cfg)
    assert result.dense_accuracy == clean and result.dense_attack_success == success
    assert set(result.seconds) == {"features", "fit", "evaluate", "total"}
    assert result.seconds["total"] >= result.seconds["features"] + result.seconds["fit"]


def test_cache_hit_returns_the_same_fit(smoke: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, dense, result = smoke["cfg"], smoke["dense"], smoke["result"]
    assert result.cache_file is not None and result.cache_file.is_file()
    assert result.cache_file.parent == cfg.cache_path("baselines")

    def no_fit(*args: object, **kwargs: object) -> None:
        raise AssertionError("refitted despite the cache")

    monkeypatch.setattr(baselines, "fit_path", no_fit)
    again = baselines.sparse_fc(cfg, dense, progress=False, **FAST)
    assert torch.equal(again.weight, result.weight) and torch.equal(again.bias, result.bias)
    assert again.seconds == {**result.seconds, "loaded": True}
    pd.testing.assert_frame_equal(again.path, result.path)
    assert again.chosen == result.chosen and again.accuracy == result.accuracy
    # another option is another fit
    assert baselines.cache_key(cfg, dense, {**FAST, "alpha": 0.9}) != \
        baselines.cache_key(cfg, dense, FAST)


def test_damaged_cache_is_refitted_identically(smoke: dict) -> None:
    cfg, dense, result = smoke["cfg"], smoke["dense"], smoke["result"]
    result.cache_file.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="cannot read .* Fitting it again"):
        again = baselines.sparse_fc(cfg, dense, progress=False, **FAST)
    assert "loaded" not in again.seconds
    assert torch.equal(again.weight, result.weight) and torch.equal(again.bias, result.bias)
    assert again.accuracy == result.accuracy
