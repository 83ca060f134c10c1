"""Bad inputs at the public boundary: each is refused before any work, naming what is allowed.

One table row per bad input: the call, the exception type and a regex that the message must match
(the bad value and the allowed ones). Every row runs with the expensive steps replaced by functions
that fail the test if called (augmentation, Hessians, the pruning solver, training, attribution
methods, the dataset download), so "refused" also means "refused before any work started".
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from nets import Tiny
from torch import nn

from spade_lib import attribution, config, data, hessians, metrics, pruning

trace_mod = importlib.import_module("spade_lib.trace")
augment_mod = importlib.import_module("spade_lib.augment")
train_mod = importlib.import_module("spade_lib.train")

AUGMENT = augment_mod.augment  # the real one, for the rows that call it directly
SIDE = 16
NAN, INF = math.nan, math.inf


def _work(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("work started before the bad input was refused")


@pytest.fixture(autouse=True)
def no_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every expensive step fails the test if it is reached."""
    monkeypatch.setattr(augment_mod, "augment", _work)
    monkeypatch.setattr(augment_mod, "_crop_boxes", _work)
    monkeypatch.setattr(hessians, "layer_hessians", _work)
    monkeypatch.setattr(pruning, "_solve", _work)
    monkeypatch.setattr(train_mod, "train", _work)
    monkeypatch.setattr(data, "_download_fashion_mnist", _work)
    monkeypatch.setattr(data, "FASHION_SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setattr(data, "_download_dir", lambda: tmp_path / "download-cache")
    monkeypatch.delenv("SPADE_DATA_DIR", raising=False)
    for name, method in list(attribution._REGISTRY.items()):
        monkeypatch.setitem(attribution._REGISTRY, name, dataclasses.replace(method, fn=_work))


@pytest.fixture
def ctx(tmp_path: Path, one_thread: None, seeded: None) -> SimpleNamespace:
    gelu = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 3))
    (tmp_path / "empty").mkdir()
    return SimpleNamespace(tmp=tmp_path, net=Tiny().eval(), gelu=gelu,
                           image=torch.rand(3, SIDE, SIDE), x=torch.rand(2, 3, SIDE, SIDE))


Row = tuple[str, Callable[[SimpleNamespace], Any], type[Exception], str]


def _run(ctx: SimpleNamespace, call: Callable[[SimpleNamespace], Any], error: type[Exception],
         match: str) -> None:
    match = match.replace("{tmp}", re.escape(str(ctx.tmp)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=match):
            call(ctx)


def _table(rows: list[Row]) -> Any:
    return pytest.mark.parametrize(("call", "error", "match"),
                                   [pytest.param(c, e, m, id=i) for i, c, e, m in rows])


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

CONFIG: list[Row] = [
    ("preset-unknown", lambda c: config.load("nope"), ValueError,
     r"unknown preset 'nope'; allowed: .*smoke.* or a path"),
    ("preset-not-a-name", lambda c: config.load(5), TypeError,
     r"preset must be a preset name \(.*smoke.*\) or a path to a YAML file, got 5"),
    ("preset-none", lambda c: config.from_namespace(None, {}), TypeError,
     r"preset must be a preset name \(.*cpu.*\).*got None"),
    ("namespace-not-mapping", lambda c: config.from_namespace("smoke", ["epochs"]), TypeError,
     r"namespace must be a mapping such as globals\(\), got list"),
    ("config-not-mapping", lambda c: config.from_dict([("epochs", 1)]), TypeError,
     r"config must be a mapping of config keys to values, got list"),
    ("key-unknown", lambda c: config.from_dict({"batchsize": 4}), ValueError,
     r"unknown config key\(s\) \['batchsize'\]; allowed keys: .*batch_size"),
    ("key-unknown-override", lambda c: config.load("smoke", bogus=1), ValueError,
     r"unknown config key\(s\) \['bogus'\]; allowed keys: arch, "),
    ("key-unknown-namespace", lambda c: config.from_namespace("nope", {}), ValueError,
     r"unknown preset 'nope'"),
    ("int-as-str", lambda c: config.from_dict({"epochs": "3"}), ValueError,
     r"config key 'epochs' has value '3' of type str; allowed: int"),
    ("int-as-bool", lambda c: config.from_dict({"epochs": True}), ValueError,
     r"config key 'epochs' has value True of type bool; allowed: int"),
    ("int-out-of-range", lambda c: config.load("smoke", epochs=0), ValueError,
     r"config key 'epochs' has value 0; allowed range: \[1, 1000\]"),
    ("float-nan", lambda c: config.from_dict({"lr": NAN}), ValueError,
     r"config key 'lr' has value nan; allowed range: \[1e-07, 10.0\]"),
    ("float-inf", lambda c: config.from_dict({"trojan_fraction": INF}), ValueError,
     r"config key 'trojan_fraction' has value inf; allowed range: \[0.0, 0.25\]"),
    ("literal", lambda c: config.from_dict({"dataset": "mnist"}), ValueError,
     r"config key 'dataset' has value 'mnist' of type str; allowed: one of 'fashion-mnist'"),
    ("pruner-unknown", lambda c: config.from_dict({"pruner": "sparsegpt"}), ValueError,
     r"'pruner' has value 'sparsegpt'.*allowed: one of 'obc', 'fastobc', 'magnitude'"),
    ("n-aug-zero", lambda c: config.from_dict({"n_augmentations": 0}), ValueError,
     r"'n_augmentations' has value 0; allowed range: \[1, 100000\]"),
    ("n-aug-float", lambda c: config.from_dict({"n_augmentations": 2.5}), ValueError,
     r"'n_augmentations' has value 2.5 of type float; allowed: int"),
    ("n-aug-bool", lambda c: config.from_dict({"n_augmentations": True}), ValueError,
     r"'n_augmentations' has value True of type bool; allowed: int"),
    ("sparsity-one", lambda c: config.from_dict({"sparsity": 1.0}), ValueError,
     r"config key 'sparsity': value 1.0 is outside the allowed range \[0, 1\)"),
    ("sparsity-negative", lambda c: config.from_dict({"sparsity": -0.5}), ValueError,
     r"config key 'sparsity': value -0.5 is outside the allowed range \[0, 1\)"),
    ("sparsity-nan", lambda c: config.from_dict({"sparsity": NAN}), ValueError,
     r"config key 'sparsity': value nan is outside the allowed range \[0, 1\)"),
    ("sparsity-schedule", lambda c: config.from_dict({"sparsity": "cubic"}), ValueError,
     r"config key 'sparsity': unknown sparsity spec 'cubic'; allowed: .*'linear:FIRST:LAST'"),
    ("sparsity-dict", lambda c: config.from_dict({"sparsity": {"fc": 1.5}}), ValueError,
     r"config key 'sparsity': sparsity of 'fc' 1.5 is outside the allowed range \[0, 1\)"),
    ("methods-unknown", lambda c: config.from_dict({"methods": ["Saliency", "Gradcam"]}),
     ValueError, r"'methods': unknown attribution method\(s\) \['Gradcam'\]; allowed: Saliency, "
     r".*GradientShap"),
]


@_table(CONFIG)
def test_config(ctx, call, error, match):
    _run(ctx, call, error, match)


# --------------------------------------------------------------------------------------------
# Sparsity, layers and pruners
# --------------------------------------------------------------------------------------------

W, H = torch.rand(4, 6), torch.eye(6)
VALID = r"valid layers: stem, conv, conv2, fc"

PRUNING: list[Row] = [
    ("sparsity-one", lambda c: pruning.resolve_sparsity(c.net, 1.0), ValueError,
     r"sparsity 1.0 is outside the allowed range \[0, 1\)"),
    ("sparsity-negative", lambda c: pruning.resolve_sparsity(c.net, -0.1), ValueError,
     r"sparsity -0.1 is outside the allowed range \[0, 1\)"),
    ("sparsity-nan", lambda c: pruning.resolve_sparsity(c.net, NAN), ValueError,
     r"sparsity nan is outside the allowed range \[0, 1\)"),
    ("sparsity-bool", lambda c: pruning.resolve_sparsity(c.net, True), ValueError,
     r"sparsity must be a number in \[0, 1\), got True"),
    ("sparsity-none", lambda c: pruning.resolve_sparsity(c.net, None), ValueError,
     r"sparsity must be a number in \[0, 1\), got None"),
    ("schedule-unknown", lambda c: pruning.resolve_sparsity(c.net, "cubic"), ValueError,
     r"unknown sparsity spec 'cubic'; allowed: a float in \[0, 1\), 'linear'"),
    ("schedule-bad-last", lambda c: pruning.resolve_sparsity(c.net, "linear:0:1.2"), ValueError,
     r"bad sparsity spec 'linear:0:1.2': last 1.2 is outside the allowed range \[0, 1\)"),
    ("dict-unknown-layer", lambda c: pruning.resolve_sparsity(c.net, {"conv3": 0.5}), ValueError,
     r"unknown layer\(s\) in sparsity dict: 'conv3'; keys are layer names or block prefixes "
     r"of: conv, conv2, fc"),
    ("dict-key-not-str", lambda c: pruning.resolve_sparsity(c.net, {5: 0.5}), ValueError,
     r"unknown layer\(s\) in sparsity dict: 5; keys are layer names or block prefixes of: conv"),
    ("dict-value", lambda c: pruning.resolve_sparsity(c.net, {"fc": 1.0}), ValueError,
     r"sparsity of 'fc' 1.0 is outside the allowed range \[0, 1\)"),
    ("dict-value-str", lambda c: pruning.resolve_sparsity(c.net, {"fc": "0.5"}), ValueError,
     r"sparsity of 'fc' must be a number in \[0, 1\), got '0.5'"),
    ("only-unknown-block", lambda c: pruning.resolve_sparsity(c.net, pruning.only("nope", 0.5)),
     ValueError, r"block 'nope' contains none of the pruned layers; valid layers: conv, conv2"),
    ("layers-unknown", lambda c: pruning.resolve_sparsity(c.net, 0.5, ["conv3"]), ValueError,
     r"unknown layer: 'conv3'; " + VALID),
    ("layers-grouped", lambda c: pruning.resolve_sparsity(c.net, 0.5, ["dw"]), ValueError,
     r"layer is not a Conv2d \(groups=1\) or Linear: 'dw'; " + VALID),
    ("select-no-match", lambda c: pruning.select_layers(c.net, "block*"), ValueError,
     r"layer pattern 'block\*' matches no Conv2d \(groups=1\) or Linear layer; " + VALID),
    ("select-not-str", lambda c: pruning.select_layers(c.net, [5]), ValueError,
     r"layer pattern 5 matches no .*" + VALID),
    ("select-int", lambda c: pruning.select_layers(c.net, 5), ValueError,
     r"layers must be a name or pattern, or a non-empty sequence of them, got 5; " + VALID),
    ("select-empty", lambda c: pruning.select_layers(c.net, []), ValueError,
     r"layers must be .* non-empty sequence of them, got \[\]; " + VALID),
    ("linear-last", lambda c: pruning.linear(0.5, 1.0), ValueError,
     r"last 1.0 is outside the allowed range \[0, 1\)"),
    ("prune-unknown-pruner", lambda c: pruning.prune_layer(W, H, 0.5, "sparsegpt"), ValueError,
     r"unknown pruning method 'sparsegpt'; valid methods: fastobc, obc, magnitude"),
    ("prune-pruner-none", lambda c: pruning.prune_layer(W, H, 0.5, None), ValueError,
     r"unknown pruning method None; valid methods: fastobc, obc, magnitude"),
    ("prune-sparsity", lambda c: pruning.prune_layer(W, H, 1.0), ValueError,
     r"sparsity 1.0 is outside the allowed range \[0, 1\)"),
    ("prune-option", lambda c: pruning.prune_layer(W, H, 0.5, "obc", blocksize=4), ValueError,
     r"unknown option\(s\) blocksize for method 'obc'; allowed: damp, batch_bytes"),
    ("prune-batch-pruner", lambda c: pruning.prune_layer_batch(W, H[None], 0.5, "x"), ValueError,
     r"unknown pruning method 'x'; valid methods: fastobc, obc, magnitude"),
    ("prune-hessian-shape", lambda c: pruning.prune_layer(W, torch.eye(5), 0.5), ValueError,
     r"hessian must have shape \[6, 6\] to match weight \(4, 6\), got \(5, 5\)"),
    ("prune-nan-weight", lambda c: pruning.prune_layer(torch.full((4, 6), NAN), H, 0.5),
     ValueError, r"weight contains NaN or inf"),
]


@_table(PRUNING)
def test_pruning(ctx, call, error, match):
    _run(ctx, call, error, match)


# --------------------------------------------------------------------------------------------
# Traces and augmentation
# --------------------------------------------------------------------------------------------

def _trace(c: SimpleNamespace, image: Any = None, **kwargs: Any) -> Any:
    kwargs = {"n_augmentations": 4, "batch_size": 4, **kwargs}
    return trace_mod.trace(c.net, c.image if image is None else image, **kwargs)


def _batch(c: SimpleNamespace, images: Any = None, **kwargs: Any) -> Any:
    kwargs = {"n_augmentations": 4, "batch_size": 4, **kwargs}
    return trace_mod.trace_batch(c.net, c.x if images is None else images, **kwargs)


SHAPE = r"image must have shape \[3, H, W\] or \[1, 3, H, W\].*, got "

TRACE: list[Row] = [
    ("pruner-unknown", lambda c: _trace(c, pruner="sparsegpt"), ValueError,
     r"unknown pruning method 'sparsegpt'; valid methods: fastobc, obc, magnitude"),
    ("pruner-none", lambda c: _trace(c, pruner=None), ValueError,
     r"unknown pruning method None; valid methods"),
    ("pruner-option", lambda c: _trace(c, bogus=1), ValueError,
     r"unknown option\(s\) bogus for method 'fastobc'; allowed: damp, mask_group, block_size"),
    ("sparsity-one", lambda c: _trace(c, sparsity=1.0), ValueError,
     r"sparsity 1.0 is outside the allowed range \[0, 1\)"),
    ("sparsity-dict-unknown", lambda c: _trace(c, sparsity={"conv3": 0.5}), ValueError,
     r"'conv3'; keys are layer names or block prefixes of: conv, conv2, fc"),
    ("sparsity-schedule", lambda c: _trace(c, sparsity="linear:0:1.2"), ValueError,
     r"'linear:0:1.2': last 1.2 is outside the allowed range \[0, 1\)"),
    ("layers-no-match", lambda c: _trace(c, layers=["block*"]), ValueError,
     r"layer pattern 'block\*' matches no .*" + VALID),
    ("layers-int", lambda c: _trace(c, layers=5), ValueError,
     r"layers must be a name or pattern, or a non-empty sequence of them, got 5; " + VALID),
    ("layers-empty", lambda c: _trace(c, layers=[]), ValueError,
     r"non-empty sequence of them, got \[\]; " + VALID),
    ("n-aug-zero", lambda c: _trace(c, n_augmentations=0), ValueError,
     r"n_augmentations must be an int >= 1, got 0"),
    ("n-aug-negative", lambda c: _trace(c, n_augmentations=-3), ValueError,
     r"n_augmentations must be an int >= 1, got -3"),
    ("n-aug-float", lambda c: _trace(c, n_augmentations=2.0), ValueError,
     r"n_augmentations must be an int >= 1, got 2.0"),
    ("n-aug-bool", lambda c: _trace(c, n_augmentations=True), ValueError,
     r"n_augmentations must be an int >= 1, got True"),
    ("n-aug-str", lambda c: _trace(c, n_augmentations="8"), ValueError,
     r"n_augmentations must be an int >= 1, got '8'"),
    ("batch-size-zero", lambda c: _trace(c, batch_size=0), ValueError,
     r"batch_size must be an int >= 1, got 0"),
    ("recipe-unknown", lambda c: _trace(c, recipe="strong"), ValueError,
     r"unknown augmentation recipe 'strong'; valid: default, convnext"),
    ("seed-str", lambda c: _trace(c, seed="a"), ValueError, r"seed must be an int, got 'a'"),
    ("seed-float", lambda c: _trace(c, seed=1.5), ValueError, r"seed must be an int, got 1.5"),
    ("model-not-module", lambda c: trace_mod.trace("net", c.image), ValueError,
     r"model must be a torch.nn.Module, got str"),
    ("image-numpy", lambda c: _trace(c, c.image.numpy()), ValueError,
     r"image must be a torch.Tensor, got ndarray"),
    ("image-one-channel", lambda c: _trace(c, torch.rand(1, SIDE, SIDE)), ValueError,
     SHAPE + r"\[1, 16, 16\]"),
    ("image-batch", lambda c: _trace(c, c.x), ValueError, SHAPE + r"\[2, 3, 16, 16\]"),
    ("image-2d", lambda c: _trace(c, torch.rand(SIDE, SIDE)), ValueError, SHAPE + r"\[16, 16\]"),
    ("image-empty", lambda c: _trace(c, torch.rand(3, 0, 0)), ValueError,
     r"image must have shape \[3, H, W\] or \[1, 3, H, W\] with H, W >= 1, got \[3, 0, 0\]"),
    ("image-uint8", lambda c: _trace(c, torch.zeros(3, SIDE, SIDE, dtype=torch.uint8)),
     ValueError, r"image must be a float tensor with values in \[0, 1\], got torch.uint8"),
    ("image-float64", lambda c: _trace(c, c.image.double()), ValueError,
     r"image dtype torch.float64 differs from the model's torch.float32; allowed: torch.float32"),
    ("image-nan", lambda c: _trace(c, torch.full((3, SIDE, SIDE), NAN)), ValueError,
     r"image contains NaN or inf"),
    ("image-inf", lambda c: _trace(c, torch.full((3, SIDE, SIDE), INF)), ValueError,
     r"image contains NaN or inf"),
    ("batch-empty", lambda c: _batch(c, torch.rand(0, 3, SIDE, SIDE)), ValueError,
     r"images must be a \[S, 3, H, W\] tensor with S >= 1, got \[0, 3, 16, 16\]"),
    ("batch-3d", lambda c: _batch(c, c.image), ValueError,
     r"images must be a \[S, 3, H, W\] tensor.*, got \[3, 16, 16\]"),
    ("batch-nan", lambda c: _batch(c, torch.stack([c.image, c.image * NAN])), ValueError,
     r"images\[1\]: image contains NaN or inf"),
    ("batch-float64", lambda c: _batch(c, c.x.double()), ValueError,
     r"images\[0\]: image dtype torch.float64 differs from the model's torch.float32"),
    ("batch-n-aug", lambda c: _batch(c, n_augmentations=0), ValueError,
     r"n_augmentations must be an int >= 1, got 0"),
    ("augment-n-zero", lambda c: AUGMENT(c.image, 0), ValueError,
     r"number of augmentations must be an int >= 1, got 0"),
    ("augment-n-float", lambda c: AUGMENT(c.image, 2.0), ValueError,
     r"number of augmentations must be an int >= 1, got 2.0"),
    ("augment-n-bool", lambda c: AUGMENT(c.image, True), ValueError,
     r"number of augmentations must be an int >= 1, got True"),
    ("augment-recipe", lambda c: AUGMENT(c.image, 2, "strong"), ValueError,
     r"unknown augmentation recipe 'strong'; valid: default, convnext"),
    ("augment-image", lambda c: AUGMENT(c.x, 2), ValueError, SHAPE + r"\[2, 3, 16, 16\]"),
]


@_table(TRACE)
def test_trace(ctx, call, error, match):
    _run(ctx, call, error, match)


# --------------------------------------------------------------------------------------------
# Attribution (dense and through SPADE)
# --------------------------------------------------------------------------------------------

SPADE = {"n_augmentations": 4, "batch_size": 4}
TARGET_TYPE = r"target must be an int or a sequence/tensor of 2 ints, got "
RANGE = r"out of range; the model has 5 classes \(0\.\.4\)"


def _attr(c: SimpleNamespace, target: Any = 0, method: str = "Saliency", images: Any = None,
          **kwargs: Any) -> Any:
    return attribution.attribute(c.net, c.x if images is None else images, target, method,
                                 **kwargs)


def _spade(c: SimpleNamespace, target: Any = 0, method: str = "Saliency", **kwargs: Any) -> Any:
    return _attr(c, target, method, spade=SPADE, **kwargs)


ATTRIBUTION: list[Row] = [
    ("method-unknown", lambda c: _attr(c, method="Gradcam"), ValueError,
     r"unknown attribution method 'Gradcam'; valid: Saliency, InputXGradient, .*GradientShap"),
    ("method-none", lambda c: _attr(c, method=None), ValueError,
     r"unknown attribution method None; valid: Saliency"),
    ("option-unknown", lambda c: _attr(c, n_steps=4), ValueError,
     r"Saliency has no option 'n_steps'; allowed: abs"),
    ("images-3d", lambda c: _attr(c, images=c.image), ValueError,
     r"images must have shape \[N, C, H, W\] .*got \(3, 16, 16\)"),
    ("images-list", lambda c: _attr(c, images=[c.image]), ValueError,
     r"images must be a torch.Tensor \[N, C, H, W\], got list"),
    ("images-int", lambda c: _attr(c, images=torch.zeros(1, 3, SIDE, SIDE, dtype=torch.int64)),
     ValueError, r"images must be a float tensor, got torch.int64"),
    ("images-empty", lambda c: _attr(c, images=torch.rand(0, 3, SIDE, SIDE)), ValueError,
     r"images is an empty batch"),
    ("images-nan", lambda c: _attr(c, images=torch.full((1, 3, SIDE, SIDE), NAN)), ValueError,
     r"images contain NaN or inf"),
    ("images-inf", lambda c: _attr(c, images=torch.full((1, 3, SIDE, SIDE), -INF)), ValueError,
     r"images contain NaN or inf"),
    ("target-high", lambda c: _attr(c, 5), ValueError, r"target \[5\] " + RANGE),
    ("target-negative", lambda c: _attr(c, -1), ValueError, r"target \[-1\] " + RANGE),
    ("target-one-bad", lambda c: _attr(c, [0, 9]), ValueError, r"target \[9\] " + RANGE),
    ("target-float", lambda c: _attr(c, 1.0), ValueError, TARGET_TYPE + r"1.0"),
    ("target-bool", lambda c: _attr(c, True), ValueError, TARGET_TYPE + r"True"),
    ("target-none", lambda c: _attr(c, None), ValueError, TARGET_TYPE + r"None"),
    ("target-str", lambda c: _attr(c, "3"), ValueError, TARGET_TYPE + r"'3'"),
    ("target-float-tensor", lambda c: _attr(c, torch.tensor([0.0, 1.0])), ValueError,
     r"target must hold integers, got dtype torch.float32"),
    ("target-short", lambda c: _attr(c, [1]), ValueError,
     r"target must be one int or 2 ints \(one per image\), got shape \(1,\)"),
    ("target-long", lambda c: _attr(c, [0, 1, 2]), ValueError,
     r"target must be one int or 2 ints \(one per image\), got shape \(3,\)"),
    ("lrp-gelu", lambda c: attribution.attribute(c.gelu, c.x, 0, "LRP"), ValueError,
     r"LRP needs a ReLU network .*this model has GELU"),
    ("spade-method-unknown", lambda c: _spade(c, method="Gradcam"), ValueError,
     r"unknown attribution method 'Gradcam'; valid: Saliency"),
    ("spade-option-unknown", lambda c: _spade(c, n_steps=4), ValueError,
     r"Saliency has no option 'n_steps'; allowed: abs"),
    ("spade-images-nan", lambda c: attribution.attribute(
        c.net, torch.full((1, 3, SIDE, SIDE), NAN), 0, "Saliency", spade=SPADE), ValueError,
     r"images contain NaN or inf"),
    ("spade-target-high", lambda c: _spade(c, 5), ValueError, r"target \[5\] " + RANGE),
    ("spade-target-negative", lambda c: _spade(c, -1), ValueError, r"target \[-1\] " + RANGE),
    ("spade-target-second-bad", lambda c: _spade(c, [0, 9]), ValueError,
     r"target \[9\] " + RANGE),
    ("spade-target-float", lambda c: _spade(c, 1.5), ValueError, TARGET_TYPE + r"1.5"),
    ("spade-target-bool", lambda c: _spade(c, True), ValueError, TARGET_TYPE + r"True"),
    ("spade-target-none", lambda c: _spade(c, None), ValueError, TARGET_TYPE + r"None"),
    ("spade-target-str", lambda c: _spade(c, "3"), ValueError, TARGET_TYPE + r"'3'"),
    ("spade-target-long", lambda c: _spade(c, [0, 1, 2]), ValueError,
     r"target must be one (int or 2 ints \(one per image\), got shape \(3,\)"
     r"|class or 2 classes, got 3)"),  # the second: the wording before the shared check
    ("spade-not-options", lambda c: _attr(c, spade="yes"), TypeError,
     r"spade must be None, False, True or a mapping of trace options, got 'yes'"),
    ("spade-int", lambda c: _attr(c, spade=2), TypeError,
     r"spade must be None, False, True or a mapping of trace options, got 2"),
    ("spade-n-aug", lambda c: _attr(c, spade={"n_augmentations": 0}), ValueError,
     r"n_augmentations must be an int >= 1, got 0"),
    ("spade-pruner", lambda c: _attr(c, spade={"pruner": "sparsegpt"}), ValueError,
     r"unknown pruning method 'sparsegpt'; valid methods: fastobc, obc, magnitude"),
    ("spade-sparsity", lambda c: _attr(c, spade={"sparsity": 1.0}), ValueError,
     r"sparsity 1.0 is outside the allowed range \[0, 1\)"),
    ("spade-lrp-gelu", lambda c: attribution.attribute(c.gelu, c.x, 0, "LRP", spade=SPADE),
     ValueError, r"LRP needs a ReLU network .*this model has GELU"),
]


@_table(ATTRIBUTION)
def test_attribution(ctx, call, error, match):
    _run(ctx, call, error, match)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------

MAP, MASK = torch.rand(4, 4), torch.zeros(4, 4, dtype=torch.bool)
LINEAR = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
IMAGE8, SAL8 = torch.rand(3, 8, 8), torch.rand(8, 8)


def _curves(image: Any = IMAGE8, saliency: Any = SAL8, target: Any = 0, **kwargs: Any) -> Any:
    return metrics.insertion_deletion_curves(LINEAR, image, saliency, target, **kwargs)


METRICS: list[Row] = [
    ("auc-map-3d", lambda c: metrics.trojan_auc(MAP[None], MASK[None]), ValueError,
     r"saliency map must be \[H, W\], got shape \(1, 4, 4\)"),
    ("auc-mask-shape", lambda c: metrics.trojan_auc(MAP, MASK[None]), ValueError,
     r"mask shape \(1, 4, 4\) differs from map shape \(4, 4\)"),
    ("auc-mask-values", lambda c: metrics.trojan_auc(MAP, torch.full((4, 4), 0.5)), ValueError,
     r"mask must be boolean \(or hold only 0 and 1\)"),
    ("auc-map-nan", lambda c: metrics.trojan_auc(MAP * NAN, MASK), ValueError,
     r"saliency map contains NaN or inf"),
    ("auc-batch-inf", lambda c: metrics.trojan_auc_batch((MAP * INF)[None], MASK[None]),
     ValueError, r"saliency map contains NaN or inf"),
    ("pointing-ties", lambda c: metrics.pointing_game(MAP, MASK, ties="first"), ValueError,
     r"unknown ties rule 'first'; allowed: all, any, fraction"),
    ("scores-3d", lambda c: metrics.trojan_scores(torch.rand(3, 4, 4), MASK[None]), ValueError,
     r"attr must be \[N, C, H, W\] maps or an Attribution, got \(3, 4, 4\)"),
    ("scores-nan", lambda c: metrics.trojan_scores(torch.full((1, 3, 4, 4), NAN), MASK[None]),
     ValueError, r"saliency map contains NaN or inf"),
    ("aggregate-how", lambda c: metrics.aggregate(torch.rand(3, 4, 4), "max"), ValueError,
     r"unknown aggregation 'max'; allowed: sum, abs"),
    ("curves-image-numpy", lambda c: _curves(IMAGE8.numpy()), TypeError,
     r"image must be a torch.Tensor, got ndarray"),
    ("curves-saliency-numpy", lambda c: _curves(saliency=SAL8.numpy()), TypeError,
     r"saliency_2d must be a torch.Tensor, got ndarray"),
    ("curves-image-uint8", lambda c: _curves((IMAGE8 * 255).to(torch.uint8)), ValueError,
     r"image must be a float tensor, got torch.uint8"),
    ("curves-image-2d", lambda c: _curves(SAL8), ValueError,
     r"image must be \[C, H, W\], got \(8, 8\)"),
    ("curves-shape", lambda c: _curves(saliency=MAP), ValueError,
     r"saliency map shape \(4, 4\) does not match the image's \(8, 8\)"),
    ("curves-nan", lambda c: _curves(IMAGE8 * NAN), ValueError,
     r"image and saliency map must be finite"),
    ("curves-steps", lambda c: _curves(steps=0), ValueError,
     r"steps must be an int in 1..64 \(pixels\), got 0"),
    ("curves-baseline", lambda c: _curves(baseline="noise"), ValueError,
     r"unknown baseline 'noise'; allowed: zero, blur"),
    ("curves-target-float", lambda c: _curves(target=1.0), ValueError,
     r"target must be an int, got 1.0"),
    ("curves-target-high", lambda c: _curves(target=9), ValueError,
     r"target 9 out of range for logits of shape \(1, 4\)"),
    ("curves-target-negative", lambda c: _curves(target=-1), ValueError,
     r"target -1 out of range for logits of shape \(1, 4\)"),
]


@_table(METRICS)
def test_metrics(ctx, call, error, match):
    _run(ctx, call, error, match)


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------

def _celeba_files(root: Path, attr: str, partition: str) -> Path:
    (root / "img_align_celeba").mkdir(parents=True)
    (root / "list_attr_celeba.txt").write_text(attr)
    (root / "list_eval_partition.txt").write_text(partition)
    return root


NAMES = " ".join(f"A{i}" for i in range(40))
HOW_TO_GET = (r"(?s)Looked in:.*{tmp}.*apt-get install dataset-fashion-mnist.*pass data_dir=\.\.\. "
              r"or set SPADE_DATA_DIR")


def _scenes_cfg(c: SimpleNamespace) -> Any:
    return data.load_scenes(config.load("smoke", data_dir=str(c.tmp / "empty")))


def _fashion_env(c: SimpleNamespace) -> Any:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPADE_DATA_DIR", str(c.tmp / "empty"))
        return data.load_fashion_mnist("test", download=False)


DATA: list[Row] = [
    ("fashion-split", lambda c: data.load_fashion_mnist("val"), ValueError,
     r"unknown split 'val'; allowed: train, test"),
    ("fashion-missing-data-dir", lambda c: data.load_fashion_mnist(
        "train", data_dir=c.tmp / "empty", download=False), FileNotFoundError,
     r"(?s)Fashion-MNIST \(train split\) was not found.*data_dir / SPADE_DATA_DIR: {tmp}/empty "
     r"\(no idx files there\).*2\. {tmp}/system \(not there\).*download=False.*apt-get install "
     r"dataset-fashion-mnist"),
    ("fashion-missing-env", _fashion_env, FileNotFoundError, HOW_TO_GET),
    ("fashion-missing-no-dir", lambda c: data.load_fashion_mnist("test", download=False),
     FileNotFoundError, r"(?s)data_dir / SPADE_DATA_DIR: not given.*{tmp}/system"),
    ("fashion-download-fails", lambda c: data.load_fashion_mnist("test"), FileNotFoundError,
     r"(?s)torchvision download into {tmp}/download-cache \(failed: work started"),
    ("fashion-missing-config", _scenes_cfg, FileNotFoundError, HOW_TO_GET),
    ("folder-missing", lambda c: data.image_folder(c.tmp / "nowhere", "train", 16),
     FileNotFoundError, r"image folder root {tmp}/nowhere does not exist"),
    ("folder-empty", lambda c: data.image_folder(c.tmp / "empty", "train", 16),
     FileNotFoundError, r"no train images under {tmp}/empty: expected {tmp}/empty/train with one "
     r"folder per class, or Food-101's images/ and meta/train.txt"),
    ("folder-empty-class", lambda c: (c.tmp / "empty" / "val" / "cat").mkdir(parents=True)
     or data.image_folder(c.tmp / "empty", "val", 16), FileNotFoundError,
     r"no images \(\.jpg, .*\) under {tmp}/empty/val"),
    ("folder-no-classes", lambda c: (c.tmp / "empty" / "train").mkdir()
     or data.image_folder(c.tmp / "empty", "train", 16), FileNotFoundError,
     r"{tmp}/empty/train has no class folders"),
    ("folder-split", lambda c: data.image_folder(c.tmp, "dev", 16), ValueError,
     r"unknown split 'dev'; allowed: train, val, test"),
    ("folder-size", lambda c: data.image_folder(c.tmp, "train", 0), ValueError,
     r"image_size must be an integer >= 1 \(a positive integer\), got 0"),
    ("celeba-missing", lambda c: data.celeba(c.tmp / "nowhere", "train", 16), FileNotFoundError,
     r"CelebA is incomplete under {tmp}/nowhere; missing: {tmp}/nowhere/img_align_celeba, .*"
     r"list_attr_celeba.txt, .*list_eval_partition.txt\. Get img_align_celeba"),
    ("celeba-empty-folder", lambda c: data.celeba(c.tmp / "empty", "train", 16),
     FileNotFoundError, r"CelebA is incomplete under {tmp}/empty; missing: {tmp}/empty/img_align"),
    ("celeba-empty-lists", lambda c: data.celeba(_celeba_files(c.tmp / "cb", "", ""), "val", 16),
     ValueError, r"{tmp}/cb/list_attr_celeba.txt is not a CelebA attribute list: expected a "
     r"count line, a line of attribute names"),
    ("celeba-no-split-images", lambda c: data.celeba(
        _celeba_files(c.tmp / "cb", f"0\n{NAMES}\n", ""), "test", 16), FileNotFoundError,
     r"no CelebA test images: {tmp}/cb/list_eval_partition.txt lists none with partition 2 "
     r"\(0 train, 1 val, 2 test\)"),
    ("celeba-split", lambda c: data.celeba(c.tmp, "dev", 16), ValueError,
     r"unknown split 'dev'; allowed: train, val, test"),
]


@_table(DATA)
def test_data(ctx, call, error, match):
    _run(ctx, call, error, match)


SENTINELS: list[Row] = [
    ("trace", lambda c: _trace(c), AssertionError, "work started"),
    ("trace-batch", lambda c: _batch(c), AssertionError, "work started"),
    ("augment", lambda c: AUGMENT(c.image, 2), AssertionError, "work started"),
    ("prune-layer", lambda c: pruning.prune_layer(W, H, 0.5), AssertionError, "work started"),
    ("attribute", lambda c: _attr(c), AssertionError, "work started"),
    ("attribute-spade", lambda c: _spade(c), AssertionError, "work started"),
]


@_table(SENTINELS)
def test_valid_calls_reach_the_sentinels(ctx, call, error, match):
    """The same calls with good inputs do reach the work, so the rows above prove "before"."""
    _run(ctx, call, error, match)
