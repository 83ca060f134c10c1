"""Plant the Trojans: train a classifier on poisoned data, cached by a hash of its config.

The recipe is Table C.9's: SGD with momentum, a step learning-rate schedule (gamma 0.1) and
weight decay; networks with LayerNorm (the ConvNeXt style) take AdamW with a linear warm-up
instead, as ConvNeXt itself does. Every chapter calls :func:`trained_model`, which trains once
and then loads the checkpoint, so a rebuilt book does not retrain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm import tqdm

from spade_lib import data
from spade_lib.config import TRAINING_KEYS, Config
from spade_lib.models import build_model


@dataclass
class TrainResult:
    """A trained (Trojaned) model with what it reaches on clean and poisoned test data."""

    model: nn.Module
    clean_accuracy: float
    attack_success: dict[str, float]
    seconds: float
    history: list[dict] = field(default_factory=list)
    checkpoint: Path | None = None
    cached: bool = False

    def table(self) -> pd.DataFrame:
        """Table C.10 for this model: clean accuracy and each rule's attack success (%)."""
        rows = [{"data": "clean test set", "accuracy (%)": 100 * self.clean_accuracy}]
        rows += [{"data": f"Trojan '{name}'", "accuracy (%)": 100 * acc}
                 for name, acc in self.attack_success.items()]
        return pd.DataFrame(rows)


def _set_seed(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def random_shift(images: Tensor, pixels: int, generator: torch.Generator) -> Tensor:
    """Translate each image by up to ``pixels`` in x and y (reflect padding), seeded.

    The standard CIFAR "pad and random crop"; reflection instead of zeros keeps photo scenes free
    of black borders.
    """
    if pixels == 0:
        return images
    n, _, h, w = images.shape
    padded = nn.functional.pad(images, (pixels,) * 4, mode="reflect")
    dx, dy = torch.randint(0, 2 * pixels + 1, (2, n), generator=generator).tolist()
    return torch.stack([padded[i, :, y:y + h, x:x + w] for i, (x, y) in
                        enumerate(zip(dx, dy, strict=True))])


def _as_float(images: Tensor) -> Tensor:
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int = 512, device: str = "cpu") -> Tensor:
    """Predicted labels (argmax) for a stack of images (uint8 or float in [0, 1])."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = _as_float(images[start:start + batch_size]).to(device)
        out.append(model(batch).argmax(1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def evaluate(model: nn.Module, cfg: Config, device: str = "cpu") -> tuple[float, dict[str, float]]:
    """Clean test accuracy and, per Trojan rule, the share of patched test images sent to target."""
    _, test = data.load_scenes(cfg)
    clean = (predict(model, test.images, device=device) == test.clean_labels).float().mean()
    poisoned = data.poisoned_test(test, cfg.rules, seed=cfg.seed)
    pred = predict(model, poisoned.images, device=device)
    success = {}
    for i, rule in enumerate(poisoned.rules):
        sel = poisoned.rule == i
        success[rule.name] = float((pred[sel] == poisoned.labels[sel]).float().mean())
    return float(clean), success


def checkpoint_path(cfg: Config) -> Path:
    """Where the checkpoint of ``cfg`` lives: keyed by the hash of the training keys only."""
    return cfg.cache_path("models", f"{cfg.arch}-{cfg.digest(TRAINING_KEYS)}.pt")


def trained_model(cfg: Config, progress: bool = True, retrain: bool = False) -> TrainResult:
    """Load the cached checkpoint for ``cfg``, or train it (and cache it) if there is none."""
    path = checkpoint_path(cfg)
    num_classes = 10 if cfg.dataset == "fashion-mnist" else None
    if path.exists() and not retrain:
        state = torch.load(path, map_location="cpu", weights_only=False)
        model = build_model(cfg.arch, state["num_classes"], cfg.width, cfg.image_size)
        model.load_state_dict(state["model"])
        model.eval()
        return TrainResult(model, state["clean_accuracy"], state["attack_success"],
                           state["seconds"], state["history"], path, cached=True)
    if num_classes is None:
        raise ValueError(
            f"dataset {cfg.dataset!r}: the built-in trainer covers the embedded 'fashion-mnist' "
            "benchmark; train full-scale models with your own loop (see README) and load them "
            "with spade_lib.models.build_model"
        )
    result = train(cfg, progress=progress)
    torch.save({"model": result.model.state_dict(), "num_classes": num_classes,
                "clean_accuracy": result.clean_accuracy, "attack_success": result.attack_success,
                "seconds": result.seconds, "history": result.history, "config": cfg.to_dict()},
               path)
    result.checkpoint = path
    return result


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """SGD with momentum (Table C.9) or AdamW (ConvNeXt's), with ``cfg``'s weight decay."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def learning_rate(cfg: Config, epoch: int, step: int) -> float:
    """The rate at optimizer ``step`` (counted from 0) in ``epoch``: step decay by ``lr_gamma``
    every ``lr_step`` epochs, times a linear warm-up over the first ``warmup_steps`` steps."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    return cfg.lr * cfg.lr_gamma ** (epoch // cfg.lr_step) * warm


def train(cfg: Config, progress: bool = True) -> TrainResult:
    """Train ``cfg.arch`` on the poisoned training split with the Table C.9 recipe (no caching)."""
    gen = _set_seed(cfg.seed)
    device = cfg.torch_device()
    train_set, _ = data.load_scenes(cfg)
    # channels-last runs the convolutions ~15% faster on CPU; the weights go back to the default
    # layout before the model is returned, so pruning code sees ordinary contiguous tensors.
    layout = torch.channels_last
    model = build_model(cfg.arch, 10, cfg.width, cfg.image_size).to(device, memory_format=layout)
    opt = make_optimizer(model, cfg)
    n = len(train_set.labels)
    steps = (n + cfg.batch_size - 1) // cfg.batch_size
    history: list[dict] = []
    start = time.perf_counter()
    bar = tqdm(total=cfg.epochs * steps, desc=f"train {cfg.arch}", disable=not progress,
               mininterval=2.0)
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(n, generator=gen)
        total_loss, correct = 0.0, 0
        for b in range(steps):
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, epoch, epoch * steps + b)
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            x = _as_float(train_set.images[idx])
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x[flip] = x[flip].flip(-1)
            x = random_shift(x, cfg.random_shift, gen)
            x = x.to(device, memory_format=layout)
            y = train_set.labels[idx].to(device)
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total_loss += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", refresh=False)
            bar.update(1)
        history.append({"epoch": epoch + 1, "loss": total_loss / n, "train_accuracy": correct / n,
                        "lr": learning_rate(cfg, epoch + 1, (epoch + 1) * steps),
                        "seconds": time.perf_counter() - start})
    bar.close()
    seconds = time.perf_counter() - start
    model = model.to(memory_format=torch.contiguous_format).eval()
    clean, success = evaluate(model, cfg, device=device)
    return TrainResult(model.cpu(), clean, success, seconds, history)
