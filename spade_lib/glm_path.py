"""The elastic-net regularization path of a sparse linear classifier, fitted with glm-saga.

Wong, Santurkar and Madry (2021) fit a multinomial elastic-net GLM on standardized features along
a path of penalties with proximal SAGA (their package ``glm-saga``) and choose one point of it on
held-out data. :func:`fit_path` runs that path on given features and labels (seeded, one thread,
glm-saga's log parsed into a tidy table of :data:`PATH_COLUMNS`); :func:`select_point` is their
rule for the point; :data:`FIT_DEFAULTS` are the options (:func:`check_options` checks them).
:mod:`spade_lib.baselines` uses them to refit a network's final layer (the "Sparse FC" baseline).
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm import tqdm

from spade_lib.checks import check_positive_int

__all__ = ["FIT_DEFAULTS", "PATH_COLUMNS", "check_options", "fit_path", "linear_layer",
           "select_point"]

FIT_DEFAULTS: dict[str, Any] = {
    "alpha": 0.99, "n_lambdas": 30, "epsilon": 1e-3, "max_epochs": 50, "lr": 0.1,
    "tol": 1e-3, "lookbehind": 3, "batch_size": 256, "val_fraction": 0.1,
    "max_images": 6000, "accuracy_drop": 0.06,
}
"""Defaults of the fit options of :func:`spade_lib.baselines.sparse_fc` (see its docstring).
Wong et al.'s own defaults
(``main.py`` of MadryLab/DebuggableDeepNetworks) are the same except 100 lambdas, 2000 epochs,
``tol`` 1e-4 and the whole training set; these keep the whole baseline to about a minute on a
2-core CPU. On the ``cpu`` model ``tol`` 1e-4 takes three times the epochs and chooses a head
within one nonzero weight and 0.3 points of validation accuracy of this one; the path's
``converged`` column shows where the epoch cap was hit."""

PATH_COLUMNS = ("lam", "lr", "nonzero", "nonzero_per_class", "sparsity", "train_loss",
                "train_accuracy", "val_loss", "val_accuracy", "epochs", "converged", "seconds")
"""Columns of :attr:`SparseFC.path`, one row per lambda, from the strongest (emptiest head) to
zero: the penalty, SAGA's step size, nonzero weights (total and mean per class), the fraction of
zero weights, glm-saga's elastic-net objective and accuracy on the fit and validation splits
(accuracies as fractions), the SAGA epochs run, whether it stopped before ``max_epochs``, and
the seconds of that point."""



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


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` over :data:`FIT_DEFAULTS`, each checked (a bad one is named)."""
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
# The fit
# --------------------------------------------------------------------------------------------

def linear_layer(weight: Tensor, bias: Tensor) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight`` and ``bias`` (torch's RNG is not drawn)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], device="meta")
    layer.weight = nn.Parameter(weight.detach().clone())
    layer.bias = nn.Parameter(bias.detach().clone())
    return layer


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

    o = check_options(dict(options or {}))
    x, x_val = x.float(), x_val.float()
    mean = x.mean(0)
    std = x.std(0) if len(x) > 1 else torch.zeros_like(mean)
    constant = std == 0
    std = torch.where(constant, torch.ones_like(std), std)
    xs, xs_val = (x - mean) / std, (x_val - mean) / std

    gen = torch.Generator().manual_seed(int(seed))
    loader = _Batches(xs, y, o["batch_size"], gen)
    val_loader = _Batches(xs_val, y_val, 4096)
    linear = linear_layer(torch.zeros(n_classes, x.shape[1]), torch.zeros(n_classes))
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

