"""The Sparse FC baseline: the model's final linear layer refitted as a sparse elastic-net GLM.

Wong, Santurkar and Madry (2021, "Leveraging Sparse Linear Layers for Debuggable Deep Networks")
keep a trained network's features frozen and replace its last linear layer by a sparse one: the
penultimate features of the training set are standardized, an elastic-net multinomial regression
is fitted along a regularization path with proximal SAGA (their package ``glm-saga``), and one
point of the path is chosen on held-out training images. The SPADE paper uses the network with
that head ("Sparse FC") as a baseline: its saliency maps are the "Sparse FC" column of Tables
F.15, I.16 and J.18.

:func:`sparse_fc` does that for a config's trained model and caches the fit like a checkpoint;
:func:`final_linear` finds the head it replaces and :func:`select_point` is the path-point rule.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm import tqdm

from spade_lib import scenes
from spade_lib.checks import check_positive_int
from spade_lib.config import Config
from spade_lib.files import atomic_write
from spade_lib.models import device_of, fingerprint

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

FIT_DEFAULTS: dict[str, Any] = {
    "alpha": 0.99, "n_lambdas": 30, "epsilon": 1e-3, "max_epochs": 50, "lr": 0.1,
    "tol": 1e-3, "lookbehind": 3, "batch_size": 256, "val_fraction": 0.1,
    "max_images": 6000, "accuracy_drop": 0.06,
}
"""Defaults of :func:`sparse_fc`'s fit options (see its docstring). Wong et al.'s own defaults
(``main.py`` of MadryLab/DebuggableDeepNetworks) are the same except 100 lambdas, 2000 epochs,
``tol`` 1e-4 and the whole training set; these keep the whole baseline to about a minute on a
2-core CPU. On the ``cpu`` model ``tol`` 1e-4 takes three times the epochs and chooses a head
within one nonzero weight and 0.3 points of validation accuracy of this one; the path's
``converged`` column shows where the epoch cap was hit."""

EVAL_BATCH = 512
"""Forward batch size; the same as :func:`spade_lib.models.predict`'s, so the test accuracy
computed here equals :func:`spade_lib.train.trojan_accuracy` of the returned model bit for bit."""

PATH_COLUMNS = ("lam", "lr", "nonzero", "nonzero_per_class", "sparsity", "train_loss",
                "train_accuracy", "val_loss", "val_accuracy", "epochs", "converged", "seconds")
"""Columns of :attr:`SparseFC.path`, one row per lambda, from the strongest (emptiest head) to
zero: the penalty, SAGA's step size, nonzero weights (total and mean per class), the fraction of
zero weights, glm-saga's elastic-net objective and accuracy on the fit and validation splits
(accuracies as fractions), the SAGA epochs run, whether it stopped before ``max_epochs``, and
the seconds of that point."""


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


def select_point(path: pd.DataFrame, accuracy_drop: float = 0.06) -> tuple[int, str]:
    """Wong et al.'s choice of the sparse model on a regularization path.

    Their ``select_sparse_model`` (``helpers/decisionlayer_helpers.py`` of
    MadryLab/DebuggableDeepNetworks, default ``selection_criterion='absolute', factor=6``) takes,
    among the points whose validation accuracy is at most the path's best minus ``accuracy_drop``,
    the one with the highest validation accuracy (the first, i.e. sparsest, on ties): the densest
    head that has given up about ``accuracy_drop`` of accuracy for its sparsity. Points with no
    nonzero weight are never chosen; when no nonempty point is that far below the best, the
    sparsest nonempty point is.

    Parameters
    ----------
    path
        Rows in path order with columns ``val_accuracy`` (fraction) and ``nonzero``.
    accuracy_drop
        In accuracy units (0.06 = 6 percentage points), in [0, 1).

    Returns
    -------
    (int, str)
        The row position chosen and the rule that chose it, in words.

    Raises
    ------
    ValueError
        If ``accuracy_drop`` is out of range or no point has a nonzero weight.
    """
    accuracy_drop = _check_fraction(accuracy_drop, "accuracy_drop", low_open=False)
    acc = path["val_accuracy"].to_numpy(float)
    nonempty = path["nonzero"].to_numpy() > 0
    if not nonempty.any():
        raise ValueError("every point of the regularization path has all weights zero; "
                         "lower epsilon or raise max_epochs")
    best = float(np.nanmax(acc))
    below = np.flatnonzero(nonempty & (acc <= best - accuracy_drop))
    if len(below):
        index = int(below[np.argmax(acc[below])])
        rule = (f"highest validation accuracy among points at most {accuracy_drop:.3g} below "
                f"the best ({best:.4f}), Wong et al.'s 'absolute' rule")
    else:
        index = int(np.flatnonzero(nonempty)[0])
        rule = (f"no nonempty point is {accuracy_drop:.3g} below the best validation accuracy "
                f"({best:.4f}); the sparsest nonempty point")
    return index, rule


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------

def _check_fraction(value: Any, name: str, low_open: bool = True, high: float = 1.0,
                    high_open: bool = True) -> float:
    ok = isinstance(value, int | float | np.floating) and not isinstance(value, bool) \
        and math.isfinite(value) \
        and (value > 0 if low_open else value >= 0) \
        and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}0, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(FIT_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown Sparse FC option(s) {unknown}; allowed: "
                        f"{', '.join(FIT_DEFAULTS)}")
    o = {**FIT_DEFAULTS, **options}
    o["alpha"] = _check_fraction(o["alpha"], "alpha", high_open=False)
    o["epsilon"] = _check_fraction(o["epsilon"], "epsilon")
    o["val_fraction"] = _check_fraction(o["val_fraction"], "val_fraction", high=0.5,
                                        high_open=False)
    o["accuracy_drop"] = _check_fraction(o["accuracy_drop"], "accuracy_drop", low_open=False)
    for name in ("lr", "tol"):
        v = o[name]
        if isinstance(v, bool) or not isinstance(v, int | float) or not (0 < v < math.inf):
            raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        o[name] = float(v)
    for name in ("n_lambdas", "max_epochs", "lookbehind", "batch_size"):
        o[name] = check_positive_int(o[name], name)
    if o["max_images"] is not None:
        o["max_images"] = check_positive_int(o["max_images"], "max_images")
        if o["max_images"] < 20:
            raise ValueError(f"max_images must be None or at least 20 (a fit split and a "
                             f"validation split), got {o['max_images']!r}")
    return o


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def _features(net: nn.Module, head: str, images: Tensor, device: str, progress: bool,
              desc: str) -> tuple[Tensor, Tensor]:
    """Inputs of ``head`` and outputs of ``net`` (eval mode) for uint8 or [0, 1] images, on the
    CPU; checks that the model returns ``head``'s output unchanged."""
    layer = net.get_submodule(head)
    seen: dict[str, Tensor] = {}

    def hook(_m: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        seen["x"], seen["y"] = inputs[0], output

    handle = layer.register_forward_hook(hook)
    feats, logits = [], []
    try:
        for start in tqdm(range(0, len(images), EVAL_BATCH), desc=desc, disable=not progress,
                          mininterval=2.0):
            batch = images[start:start + EVAL_BATCH]
            batch = batch.float().div_(255.0) if batch.dtype == torch.uint8 else batch.float()
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
# The fit
# --------------------------------------------------------------------------------------------

_POINT = re.compile(r"^\((\d+)\) lambda")
_STOP = re.compile(r"\[early stop at (\d+)\]")
_NO_STOP = re.compile(r"did not converge at (\d+) iterations")


class _Log(io.TextIOBase):
    """glm-saga prints its progress; keep the lines and advance a bar at each path point."""

    def __init__(self, on_point: Callable[[], None]) -> None:
        self.lines: list[str] = []
        self._buffer = ""
        self._on_point = on_point

    def write(self, text: str) -> int:
        self._buffer += text
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            self.lines.append(line)
            if _POINT.match(line):
                self._on_point()
        return len(text)


class _Batches:
    """Mini-batches of in-memory tensors as glm-saga's loaders yield them: ``(x, y, index)``
    in a fresh order drawn from ``generator`` on each pass, or ``(x, y)`` in order without one.

    A ``DataLoader`` over glm-saga's ``IndexedTensorDataset`` does the same one sample at a
    time (a Python call and a collation per sample), which costs more than SAGA itself here.
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int,
                 generator: torch.Generator | None = None) -> None:
        self.x, self.y, self.batch_size, self.generator = x, y, batch_size, generator

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __iter__(self):
        n = len(self.y)
        if self.generator is None:
            for start in range(0, n, self.batch_size):
                yield self.x[start:start + self.batch_size], self.y[start:start + self.batch_size]
            return
        order = torch.randperm(n, generator=self.generator)
        for start in range(0, n, self.batch_size):
            index = order[start:start + self.batch_size]
            yield self.x[index], self.y[index], index


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run SAGA's small tensor operations on one thread (the number is restored afterwards):
    splitting a [256, 10] product over threads costs more than it saves, and on a busy machine
    it made the cpu preset's fit 19 times slower (217 s against 11.5 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _epochs(lines: Sequence[str]) -> list[tuple[float, bool]]:
    """(epochs run, stopped early) per path point, read from glm-saga 0.1.2's log."""
    out, pending = [], (math.nan, False)
    for line in lines:
        if m := _STOP.search(line):
            pending = (int(m.group(1)) + 1, True)
        elif m := _NO_STOP.search(line):
            pending = (int(m.group(1)), False)
        elif _POINT.match(line):
            out.append(pending)
            pending = (math.nan, False)
    return out


def fit_path(x: Tensor, y: Tensor, x_val: Tensor, y_val: Tensor, n_classes: int,
             options: dict[str, Any] | None = None, seed: int = 0,
             progress: bool = False) -> tuple[pd.DataFrame, Tensor, Tensor, dict[str, Any]]:
    """Fit glm-saga's elastic-net path on standardized features (Wong et al.'s recipe).

    The features are standardized with the fit split's mean and (unbiased) standard deviation,
    which is what glm-saga's ``NormalizedRepresentation`` computes; a constant feature (standard
    deviation 0, e.g. a ReLU unit that never fires) is divided by 1 instead, so its standardized
    value is 0 and its weight stays 0. The SAGA batches are shuffled by a generator seeded with
    ``seed`` and torch's global RNG is seeded too (in a forked state: the caller's is left as it
    was), so the same inputs give the same path.

    Parameters
    ----------
    x, y
        Fit split: float features ``[n, d]`` and int64 labels ``[n]`` in ``[0, n_classes)``.
    x_val, y_val
        Validation split, same layout.
    n_classes
        Number of classes ``k``.
    options
        Fit options (:data:`FIT_DEFAULTS`; ``max_images``, ``val_fraction`` and
        ``accuracy_drop`` are not used here).
    seed
        Seed of the shuffling.
    progress
        Show a bar over the path's points.

    Returns
    -------
    path : pandas.DataFrame
        One row per lambda, columns :data:`PATH_COLUMNS`.
    weights, biases : torch.Tensor
        ``[points, k, d]`` and ``[points, k]``, per point, on the RAW features (the
        standardization folded in: ``W / sigma`` and ``b - (W / sigma) @ mu``), float32, CPU.
    info : dict
        ``constant_features`` (count), ``mean``, ``std`` (``[d]``) and ``log`` (glm-saga's lines).
    """
    from glm_saga.elasticnet import glm_saga

    o = _check_options(dict(options or {}))
    x, x_val = x.float(), x_val.float()
    mean = x.mean(0)
    std = x.std(0) if len(x) > 1 else torch.zeros_like(mean)
    constant = std == 0
    std = torch.where(constant, torch.ones_like(std), std)
    xs, xs_val = (x - mean) / std, (x_val - mean) / std

    gen = torch.Generator().manual_seed(int(seed))
    loader = _Batches(xs, y, o["batch_size"], gen)
    val_loader = _Batches(xs_val, y_val, 4096)
    linear = _linear(torch.zeros(n_classes, x.shape[1]), torch.zeros(n_classes))
    total = o["n_lambdas"] + 1
    with tqdm(total=total, desc="Sparse FC path", disable=not progress) as bar:
        log = _Log(lambda: bar.update(1))
        # glm-saga draws nothing from torch's global RNG that we know of; seeding it anyway
        # (in a forked state, so the caller's random numbers do not change) makes sure
        with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(log), \
                warnings.catch_warnings(), _one_thread():
            torch.manual_seed(int(seed))
            # glm-saga 0.1.2 calls F.softmax without dim (dim 1 is what it means for [B, k])
            warnings.filterwarnings("ignore", message="Implicit dimension choice for softmax")
            result = glm_saga(linear, loader, o["lr"], o["max_epochs"], o["alpha"],
                              n_ex=len(xs), n_classes=n_classes, tol=o["tol"],
                              epsilon=o["epsilon"], k=o["n_lambdas"], do_zero=True,
                              val_loader=val_loader, lookbehind=o["lookbehind"], group=False)
    points = result["path"]
    epochs = _epochs(log.lines)
    if len(epochs) != len(points):  # the log format is glm-saga 0.1.2's; say if it changed
        epochs = [(math.nan, False)] * len(points)
    w_std = torch.stack([p["weight"] for p in points]).float()
    b_std = torch.stack([p["bias"] for p in points]).float()
    weights = w_std / std
    biases = b_std - weights @ mean
    nonzero = (w_std != 0).sum((1, 2))
    path = pd.DataFrame({
        "lam": [float(p["lam"]) for p in points],
        "lr": [float(p["lr"]) for p in points],
        "nonzero": nonzero.tolist(),
        "nonzero_per_class": (nonzero / n_classes).tolist(),
        "sparsity": (1 - nonzero / w_std[0].numel()).tolist(),
        "train_loss": [float(p["metrics"]["loss_tr"]) for p in points],
        "train_accuracy": [float(p["metrics"]["acc_tr"]) for p in points],
        "val_loss": [float(p["metrics"]["loss_val"]) for p in points],
        "val_accuracy": [float(p["metrics"]["acc_val"]) for p in points],
        "epochs": [e for e, _ in epochs],
        "converged": [c for _, c in epochs],
        "seconds": [float(p["time"]) for p in points],
    }, columns=list(PATH_COLUMNS))
    info = {"constant_features": int(constant.sum()), "mean": mean, "std": std,
            "log": log.lines}
    return path, weights, biases, info


# --------------------------------------------------------------------------------------------
# The baseline
# --------------------------------------------------------------------------------------------

def cache_key(cfg: Config, model: nn.Module, options: dict[str, Any]) -> str:
    """Short hash naming a fit: the model's weights (:func:`spade_lib.models.fingerprint`), the
    config's :data:`DATA_KEYS` and the fit options (all of them, defaults filled in)."""
    blob = json.dumps({"format": CACHE_FORMAT, "model": fingerprint(model),
                       "data": cfg.digest(DATA_KEYS), "options": _check_options(options)},
                      sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _linear(weight: Tensor, bias: Tensor) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight`` and ``bias`` (torch's RNG is not drawn)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], device="meta")
    layer.weight = nn.Parameter(weight.detach().clone())
    layer.bias = nn.Parameter(bias.detach().clone())
    return layer


def _replace_head(model: nn.Module, head: str, weight: Tensor, bias: Tensor) -> nn.Module:
    old = model.get_submodule(head)
    new = _linear(weight, bias).to(device=old.weight.device, dtype=old.weight.dtype)
    parent_name, _, child = head.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
    return model.eval()


def _success(pred: Tensor, poisoned: scenes.PoisonedSet) -> dict[str, float]:
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
       trained on them (:func:`spade_lib.scenes.load_scenes`, Trojan patches and overridden
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
        ``nn.Linear`` or does not return its output, or ``cfg.dataset`` is not the embedded
        benchmark.
    """
    start = time.perf_counter()
    head = final_linear(model)
    o = _check_options(options)
    layer = model.get_submodule(head)
    shape = tuple(layer.weight.shape)
    key = cache_key(cfg, model, o)
    file = cfg.cache_path("baselines", f"sparse-fc-{key}.pt")
    if cache and file.exists():
        try:
            state = _load(file, key, shape)
        except SparseFCCacheError as e:
            warnings.warn(f"{e}. Fitting it again.", stacklevel=2)
        else:
            net = _replace_head(copy.deepcopy(model), head, state["weight"], state["bias"])
            return SparseFC(
                net, head, pd.DataFrame(state["path"], columns=list(PATH_COLUMNS)),
                dict(state["chosen"]), state["accuracy"], state["dense_accuracy"],
                float((state["weight"] == 0).float().mean()),
                {**state["seconds"], "loaded": True}, dict(state["attack_success"]),
                dict(state["dense_attack_success"]), state["constant_features"], file)

    train_set, test_set = scenes.load_scenes(cfg)
    device = cfg.torch_device()
    net = copy.deepcopy(model).to(device).eval()
    t0 = time.perf_counter()
    fit_idx, val_idx = _split(len(train_set), o, cfg.seed)
    images = train_set.images[torch.cat([fit_idx, val_idx])]
    feats, _ = _features(net, head, images, device, progress, "Sparse FC features")
    x, x_val = feats[:len(fit_idx)], feats[len(fit_idx):]
    y, y_val = train_set.labels[fit_idx], train_set.labels[val_idx]
    t1 = time.perf_counter()
    path, weights, biases, info = fit_path(x, y, x_val, y_val, shape[0], o, seed=cfg.seed,
                                           progress=progress)
    t2 = time.perf_counter()
    index, rule = select_point(path, o["accuracy_drop"])
    chosen = {"index": index, **path.iloc[index].to_dict(),
              "best_val_accuracy": float(path["val_accuracy"].max()),
              "accuracy_drop": o["accuracy_drop"], "rule": rule}
    chosen = {k: v.item() if isinstance(v, np.generic) else v for k, v in chosen.items()}
    weight, bias = weights[index], biases[index]

    poisoned = scenes.poisoned_test(test_set, cfg.rules, seed=cfg.seed)
    new_head = _linear(weight, bias).requires_grad_(False)
    preds = {}
    for name, images in (("clean", test_set.images), ("poisoned", poisoned.images)):
        feats, logits = _features(net, head, images, device, progress, f"Sparse FC {name} test")
        # the head on the same batches as models.predict: the sparse model's logits, bit for bit
        sparse_logits = torch.cat([new_head(feats[i:i + EVAL_BATCH])
                                   for i in range(0, len(feats), EVAL_BATCH)])
        preds[name] = logits.argmax(1), sparse_logits.argmax(1)
    dense_accuracy, accuracy = (float((p == test_set.clean_labels).float().mean())
                                for p in preds["clean"])
    dense_success, success = (_success(p, poisoned) for p in preds["poisoned"])
    sparse = _replace_head(net, head, weight, bias)
    t3 = time.perf_counter()
    seconds = {"features": t1 - t0, "fit": t2 - t1, "evaluate": t3 - t2, "total": t3 - start}
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
