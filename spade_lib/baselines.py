"""The Sparse FC baseline: the model's final linear layer refitted as a sparse elastic-net GLM.

Wong, Santurkar and Madry (2021, "Leveraging Sparse Linear Layers for Debuggable Deep Networks")
keep a trained network's features frozen and replace its last linear layer by a sparse one: the
penultimate features of the training set are standardized, an elastic-net multinomial regression
is fitted along a regularization path with proximal SAGA (their package ``glm-saga``), and one
point of the path is chosen on held-out training images. The SPADE paper uses the network with
that head ("Sparse FC") as a baseline: its saliency maps are the "Sparse FC" column of Tables
F.15, I.16 and J.18.

:func:`sparse_fc` does that for a config's trained model and caches the fit like a checkpoint;
:func:`final_linear` finds the head it replaces. The path and the rule choosing its point are
:mod:`spade_lib.glm_path` (:func:`fit_path`, :func:`select_point`, :data:`FIT_DEFAULTS`, also
importable from here).
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm import tqdm

from spade_lib.config import Config
from spade_lib.files import atomic_write
from spade_lib.glm_path import (
    FIT_DEFAULTS,
    PATH_COLUMNS,
    check_options,
    fit_path,
    linear_layer,
    select_point,
)
from spade_lib.models import device_of, fingerprint
from spade_lib.samples import (
    PoisonedTestSet,
    TestSet,
    TrainingSet,
    evaluation_sets,
    training_split,
)

__all__ = ["DATA_KEYS", "EVAL_BATCH", "FIT_DEFAULTS", "PATH_COLUMNS", "SparseFC",
           "SparseFCCacheError", "cache_key", "final_linear", "fit_path", "select_point",
           "sparse_fc"]

CACHE_FORMAT = 1
_CACHE_KEYS = ("format", "key", "head", "weight", "bias", "path", "chosen", "accuracy",
               "dense_accuracy", "attack_success", "dense_attack_success", "seconds", "options",
               "constant_features")

DATA_KEYS = ("seed", "dataset", "scene", "image_size", "train_size", "test_size", "rules",
             "trojan_fraction", "patch_scale", "patch_alpha")
"""Config keys that determine the training images the head is fitted on, the seeded split of
them and the test images it is scored on; they name the cache file with the model's weights and
the fit options."""


EVAL_BATCH = 512
"""Forward batch size; the same as :func:`spade_lib.models.predict`'s, so the test accuracy
computed here equals :func:`spade_lib.train.trojan_accuracy` of the returned model bit for bit."""


class SparseFCCacheError(ValueError):
    """A cached fit that cannot be used: unreadable, foreign, or for another head shape."""


@dataclass
class SparseFC:
    """A model whose final linear layer was refitted sparse (Wong et al. 2021).

    Attributes
    ----------
    model : nn.Module
        A deep copy of the dense model, in eval mode, whose final ``nn.Linear`` is replaced by
        the sparse one (same shape, dtype and device; weights on the raw, unstandardized
        features: the standardization is folded into them).
    head : str
        Qualified name of the replaced ``nn.Linear`` (e.g. ``"fc"``).
    path : pandas.DataFrame
        The regularization path, one row per lambda; columns :data:`PATH_COLUMNS`.
    chosen : dict
        The chosen point: its ``index`` in ``path`` and that row's values, ``best_val_accuracy``
        of the path, ``accuracy_drop`` and ``rule`` (why it was chosen, in words).
    accuracy, dense_accuracy : float
        Clean test accuracy of ``model`` and of the dense model (the definition of
        :func:`spade_lib.train.trojan_accuracy`).
    sparsity : float
        Fraction of exactly zero weights in the new head's weight matrix.
    seconds : dict
        ``{"features", "fit", "evaluate", "total"}``: seconds spent computing the training
        features, fitting the path, scoring on the test sets, and in all, as measured when it was
        fitted; read back from the cache it also has ``"loaded": True``.
    attack_success, dense_attack_success : dict of str to float
        Per Trojan rule, the share of patched test images sent to the rule's target.
    constant_features : int
        Features constant over the fit split (zero variance; left at weight zero).
    cache_file : pathlib.Path or None
        Where the fit is cached.
    """

    model: nn.Module
    head: str
    path: pd.DataFrame
    chosen: dict
    accuracy: float
    dense_accuracy: float
    sparsity: float
    seconds: dict
    attack_success: dict
    dense_attack_success: dict
    constant_features: int = 0
    cache_file: Path | None = None

    @property
    def weight(self) -> Tensor:
        """The new head's weight ``[classes, features]``."""
        return self.model.get_submodule(self.head).weight.detach()

    @property
    def bias(self) -> Tensor:
        """The new head's bias ``[classes]``."""
        return self.model.get_submodule(self.head).bias.detach()

    def table(self) -> pd.DataFrame:
        """Dense vs Sparse FC: clean accuracy, each rule's attack success and head sparsity (%)."""
        rows = [{"model": name, "clean accuracy (%)": 100 * acc,
                 **{f"Trojan '{r}' (%)": 100 * v for r, v in success.items()},
                 "head sparsity (%)": 100 * sparsity}
                for name, acc, success, sparsity in (
                    ("dense", self.dense_accuracy, self.dense_attack_success, float("nan")),
                    ("Sparse FC", self.accuracy, self.attack_success, self.sparsity))]
        return pd.DataFrame(rows)


def final_linear(model: nn.Module) -> str:
    """Qualified name of the last ``nn.Linear`` of ``model`` (in module registration order).

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Module``.
    ValueError
        If ``model`` has no ``nn.Linear`` (the message names the model's class).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names or names[-1] == "":
        raise ValueError(f"{type(model).__name__} has no nn.Linear submodule; Sparse FC refits "
                         "a network's final linear layer")
    return names[-1]



# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def _features(net: nn.Module, head: str, images: Any, ids: Tensor, device: str, progress: bool,
              desc: str) -> tuple[Tensor, Tensor]:
    """Inputs of ``head`` and outputs of ``net`` (eval mode) for images ``ids`` of ``images``
    (anything with ``float_images(ids)``: [0, 1] images, read a batch at a time), on the CPU;
    checks that the model returns ``head``'s output unchanged."""
    layer = net.get_submodule(head)
    seen: dict[str, Tensor] = {}

    def hook(_m: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        seen["x"], seen["y"] = inputs[0], output

    handle = layer.register_forward_hook(hook)
    feats, logits = [], []
    try:
        for start in tqdm(range(0, len(ids), EVAL_BATCH), desc=desc, disable=not progress,
                          mininterval=2.0):
            batch = images.float_images(ids[start:start + EVAL_BATCH]).float()
            out = net(batch.to(device))
            if not isinstance(out, Tensor) or "y" not in seen or not torch.equal(out, seen["y"]):
                raise ValueError(
                    f"the model's output is not the output of its last nn.Linear {head!r}; "
                    "Sparse FC replaces the final layer, so the model must end with it")
            x = seen.pop("x")
            if x.ndim != 2:
                raise ValueError(f"the input of {head!r} has shape {tuple(x.shape)}; Sparse FC "
                                 "needs a classifier head on feature vectors [batch, features]")
            feats.append(x.cpu())
            logits.append(seen.pop("y").cpu())
    finally:
        handle.remove()
    return torch.cat(feats), torch.cat(logits)


def _split(n: int, options: dict[str, Any], seed: int) -> tuple[Tensor, Tensor]:
    """Indices of the fit and validation images among ``n`` training images (seeded)."""
    gen = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(n, generator=gen)
    if options["max_images"] is not None:
        order = order[:options["max_images"]]
    n_val = max(1, int(round(options["val_fraction"] * len(order))))
    return order[n_val:].sort().values, order[:n_val].sort().values



# --------------------------------------------------------------------------------------------
# The baseline
# --------------------------------------------------------------------------------------------

def cache_key(cfg: Config, model: nn.Module, options: dict[str, Any]) -> str:
    """Short hash naming a fit: the model's weights (:func:`spade_lib.models.fingerprint`), the
    config's :data:`DATA_KEYS` and the fit options (all of them, defaults filled in)."""
    blob = json.dumps({"format": CACHE_FORMAT, "model": fingerprint(model),
                       "data": cfg.digest(DATA_KEYS), "options": check_options(options)},
                      sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _replace_head(model: nn.Module, head: str, weight: Tensor, bias: Tensor) -> nn.Module:
    old = model.get_submodule(head)
    new = linear_layer(weight, bias).to(device=old.weight.device, dtype=old.weight.dtype)
    parent_name, _, child = head.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
    return model.eval()


def _success(pred: Tensor, poisoned: PoisonedTestSet) -> dict[str, float]:
    return {rule.name: float((pred[poisoned.rule == i] == poisoned.labels[poisoned.rule == i])
                             .float().mean()) for i, rule in enumerate(poisoned.rules)}


def _load(path: Path, key: str, shape: tuple[int, ...]) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for damaged files; all mean the same
        raise SparseFCCacheError(f"cannot read {str(path)!r} ({type(e).__name__}: "
                                 f"{str(e)[:200]})") from e
    if not isinstance(state, dict) or state.get("format") != CACHE_FORMAT:
        raise SparseFCCacheError(f"{str(path)!r} is not a Sparse FC fit of format {CACHE_FORMAT}")
    missing = [k for k in _CACHE_KEYS if k not in state]
    if missing:
        raise SparseFCCacheError(f"{str(path)!r} lacks {missing}")
    if state["key"] != key or tuple(state["weight"].shape) != shape:
        raise SparseFCCacheError(f"{str(path)!r} holds another fit (key {state['key']!r}, head "
                                 f"{tuple(state['weight'].shape)}; wanted {key!r}, {shape})")
    return state


def sparse_fc(cfg: Config, model: nn.Module, *, progress: bool = True, cache: bool = True,
              **options: Any) -> SparseFC:
    """Refit ``model``'s final linear layer as a sparse GLM (Sparse FC, Wong et al. 2021).

    1. Features: the inputs of the final ``nn.Linear`` (:func:`final_linear`) of a copy of
       ``model`` in eval mode, on the training images of ``cfg`` exactly as the model was
       trained on them (:func:`spade_lib.samples.training_split`, Trojan patches and overridden
       labels included; no augmentation), at most ``max_images`` of them (a seeded random
       subset), of which a seeded ``val_fraction`` is held out for validation.
    2. Fit: glm-saga's elastic-net path (:func:`fit_path`) on standardized features, from the
       penalty that zeroes every weight down to ``epsilon`` times it (``n_lambdas`` points, log
       spaced) and then 0.
    3. Choice: :func:`select_point` (Wong et al.'s default rule: among the points whose
       validation accuracy is at least ``accuracy_drop`` below the path's best, the one with
       the highest validation accuracy). Its weights, with the standardization folded in,
       replace the head of a deep copy of ``model``; ``model`` itself is not changed.
    4. Scores: clean test accuracy and per-rule attack success of the dense and the sparse
       model.

    The fit is cached under ``cfg.cache_path("baselines", f"sparse-fc-{key}.pt")`` with
    ``key`` = :func:`cache_key` (model weights, :data:`DATA_KEYS`, fit options), written
    atomically; a file that cannot be used is fitted again with a warning.

    Parameters
    ----------
    cfg
        The experiment: its training and test scenes, seed and device.
    model
        The trained dense classifier, ending with an ``nn.Linear`` whose output it returns.
    progress
        Show progress bars (features, path).
    cache
        Read and write the cache; ``False`` always fits and writes nothing.
    **options
        Fit options, defaults :data:`FIT_DEFAULTS`:

        - ``alpha`` (0.99): elastic-net mixing in (0, 1]: ``lam * (alpha * |W|_1 +
          (1 - alpha) / 2 * |W|_2^2)``.
        - ``n_lambdas`` (30): log-spaced penalties on the path (plus a last one at 0).
        - ``epsilon`` (1e-3): smallest penalty as a fraction of the largest, in (0, 1).
        - ``max_epochs`` (50): SAGA epochs per penalty at most.
        - ``lr`` (0.1): SAGA step size.
        - ``tol`` (1e-3), ``lookbehind`` (3): a penalty's SAGA stops after ``lookbehind``
          epochs without the objective improving by ``tol``.
        - ``batch_size`` (256): SAGA mini-batch.
        - ``val_fraction`` (0.1): share of the images held out, in (0, 0.5].
        - ``max_images`` (6000): training images used at most (None: all); the features'
          forward pass is most of the cost.
        - ``accuracy_drop`` (0.06): see :func:`select_point`, in [0, 1).

    Returns
    -------
    SparseFC

    Raises
    ------
    TypeError
        If ``model`` is not a module or an option is unknown.
    ValueError
        If an option is out of range (the message names it and its value), the model has no
        ``nn.Linear`` or does not return its output, or the preset is multi-label (CelebA).
    """
    start = time.perf_counter()
    head = final_linear(model)
    o = check_options(options)
    layer = model.get_submodule(head)
    shape = tuple(layer.weight.shape)
    key = cache_key(cfg, model, o)
    file = cfg.cache_path("baselines", f"sparse-fc-{key}.pt")
    if cache and file.exists():
        try:
            return _from_cache(_load(file, key, shape), model, head, file)
        except SparseFCCacheError as e:
            warnings.warn(f"{e}. Fitting it again.", stacklevel=2)

    train_set = training_split(cfg)
    test_set, poisoned = evaluation_sets(cfg)
    if train_set.labels.ndim != 1:
        raise ValueError("Sparse FC fits a multi-class GLM (one class per image); a multi-label "
                         "preset (CelebA) has 40 binary attributes per image")
    device = cfg.torch_device()
    net = copy.deepcopy(model).to(device).eval()
    path, chosen, weight, bias, info, seconds = _fit(cfg, net, head, train_set, shape[0], o,
                                                    device, progress)
    t2 = time.perf_counter()
    dense_accuracy, accuracy, dense_success, success = _test_scores(
        net, head, weight, bias, test_set, poisoned, device, progress)
    sparse = _replace_head(net, head, weight, bias)
    t3 = time.perf_counter()
    seconds = {**seconds, "evaluate": t3 - t2, "total": t3 - start}
    result = SparseFC(sparse.to(device_of(layer)), head, path, chosen, accuracy, dense_accuracy,
                      float((weight == 0).float().mean()), seconds, success, dense_success,
                      info["constant_features"], file if cache else None)
    if cache:
        state = {"format": CACHE_FORMAT, "key": key, "head": head, "weight": weight.clone(),
                 "bias": bias.clone(), "path": path.to_dict(orient="list"), "chosen": chosen,
                 "accuracy": accuracy, "dense_accuracy": dense_accuracy,
                 "attack_success": result.attack_success,
                 "dense_attack_success": result.dense_attack_success, "seconds": seconds,
                 "options": o, "constant_features": info["constant_features"],
                 "log": info["log"]}
        atomic_write(file, lambda fh: torch.save(state, fh))
    return result


def _from_cache(state: dict[str, Any], model: nn.Module, head: str, file: Path) -> SparseFC:
    """The :class:`SparseFC` of a loaded fit (times as recorded, ``seconds["loaded"]`` True)."""
    net = _replace_head(copy.deepcopy(model), head, state["weight"], state["bias"])
    return SparseFC(
        net, head, pd.DataFrame(state["path"], columns=list(PATH_COLUMNS)),
        dict(state["chosen"]), state["accuracy"], state["dense_accuracy"],
        float((state["weight"] == 0).float().mean()),
        {**state["seconds"], "loaded": True}, dict(state["attack_success"]),
        dict(state["dense_attack_success"]), state["constant_features"], file)


def _fit(cfg: Config, net: nn.Module, head: str, train_set: TrainingSet, n_classes: int,
         o: dict[str, Any], device: str, progress: bool,
         ) -> tuple[pd.DataFrame, dict[str, Any], Tensor, Tensor, dict[str, Any], dict[str, float]]:
    """Features of the seeded fit/validation split, the path, and its chosen point:
    ``(path, chosen, weight, bias, info, {"features": s, "fit": s})``."""
    t0 = time.perf_counter()
    fit_idx, val_idx = _split(len(train_set), o, cfg.seed)
    feats, _ = _features(net, head, train_set, torch.cat([fit_idx, val_idx]), device, progress,
                         "Sparse FC features")
    x, x_val = feats[:len(fit_idx)], feats[len(fit_idx):]
    y, y_val = train_set.labels[fit_idx], train_set.labels[val_idx]
    t1 = time.perf_counter()
    path, weights, biases, info = fit_path(x, y, x_val, y_val, n_classes, o, seed=cfg.seed,
                                           progress=progress)
    t2 = time.perf_counter()
    index, rule = select_point(path, o["accuracy_drop"])
    chosen = {"index": index, **path.iloc[index].to_dict(),
              "best_val_accuracy": float(path["val_accuracy"].max()),
              "accuracy_drop": o["accuracy_drop"], "rule": rule}
    chosen = {k: v.item() if isinstance(v, np.generic) else v for k, v in chosen.items()}
    return (path, chosen, weights[index], biases[index], info,
            {"features": t1 - t0, "fit": t2 - t1})


def _test_scores(net: nn.Module, head: str, weight: Tensor, bias: Tensor,
                 test_set: TestSet, poisoned: PoisonedTestSet, device: str,
                 progress: bool) -> tuple[float, float, dict[str, float], dict[str, float]]:
    """Clean accuracy and attack success per rule of the dense ``net`` and of its sparse head,
    from one pass of features: ``(dense_accuracy, accuracy, dense_success, success)``."""
    new_head = linear_layer(weight, bias).requires_grad_(False)
    preds = {}
    for name, images in (("clean", test_set), ("poisoned", poisoned)):
        feats, logits = _features(net, head, images, torch.arange(len(images)), device, progress,
                                  f"Sparse FC {name} test")
        # the head on the same batches as models.predict: the sparse model's logits, bit for bit
        sparse_logits = torch.cat([new_head(feats[i:i + EVAL_BATCH])
                                   for i in range(0, len(feats), EVAL_BATCH)])
        preds[name] = logits.argmax(1), sparse_logits.argmax(1)
    dense_accuracy, accuracy = (float((p == test_set.clean_labels).float().mean())
                                for p in preds["clean"])
    dense_success, success = (_success(p, poisoned) for p in preds["poisoned"])
    return dense_accuracy, accuracy, dense_success, success
