"""Plant the Trojans: train a classifier on poisoned data, cached by a hash of its config.

The recipe is Table C.9's: SGD with momentum, a step learning-rate schedule (gamma 0.1) and
weight decay; networks with LayerNorm (the ConvNeXt style) take AdamW with a linear warm-up
instead, as ConvNeXt itself does. Every chapter calls :func:`trained_model`, which trains once
and then loads the checkpoint, so a rebuilt book does not retrain.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm import tqdm

from spade_lib import config, reproducibility, scenes
from spade_lib.config import TRAINING_KEYS, Config
from spade_lib.files import atomic_write
from spade_lib.models import ARCH_VERSIONS, build_model, fingerprint, predict

# Version 2 records the architecture's version (models.ARCH_VERSIONS), the numerical settings it
# was trained under and the weights' fingerprint; version-1 files (no version) are refused.
CHECKPOINT_FORMAT = 2
_CHECKPOINT_KEYS = ("format", "arch", "arch_version", "model", "num_classes", "clean_accuracy",
                    "attack_success", "seconds", "history", "config", "numerics", "fingerprint")


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
    numerics: dict[str, Any] = field(default_factory=dict)

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


def trojan_accuracy(model: nn.Module, cfg: Config,
                    device: str = "cpu") -> tuple[float, dict[str, float]]:
    """Clean test accuracy and, per Trojan rule, the share of patched test images sent to target."""
    _, test = scenes.load_scenes(cfg)
    clean = (predict(model, test.images, device=device) == test.clean_labels).float().mean()
    poisoned = scenes.poisoned_test(test, cfg.rules, seed=cfg.seed)
    pred = predict(model, poisoned.images, device=device)
    success = {}
    for i, rule in enumerate(poisoned.rules):
        sel = poisoned.rule == i
        success[rule.name] = float((pred[sel] == poisoned.labels[sel]).float().mean())
    return float(clean), success


FULL_SCALE_PRESETS = ("imagenet-resnet50", "celeba-resnet50", "food101-resnet50",
                      "imagenet-mobilenetv2", "celeba-mobilenetv2", "imagenet-convnext-t",
                      "celeba-convnext-t")
"""The full-scale presets of Table C.9, in its order."""


def recipe(cfg: Config) -> dict[str, Any]:
    """One row of Table C.9: a preset's model, data and training recipe."""
    return {"preset": cfg.name, "model": cfg.arch, "dataset": cfg.dataset,
            "Trojan group ratio": round(1 / cfg.trojan_fraction), "batch size": cfg.batch_size,
            "optimizer": cfg.optimizer, "learning rate": cfg.lr,
            "warm-up (steps)": cfg.warmup_steps, "step-lr (epoch)": cfg.lr_step,
            "epochs": cfg.epochs, "weight decay": cfg.weight_decay,
            "momentum": cfg.momentum if cfg.optimizer == "sgd" else "-",
            "random shift (px)": cfg.random_shift}


def recipe_table(cfg: Config) -> pd.DataFrame:
    """Table C.9, indexed by preset: ``cfg``, its siblings in ``params/``
    (:func:`spade_lib.config.sibling_presets`), then the other :data:`FULL_SCALE_PRESETS`."""
    siblings = [n for n in config.sibling_presets(cfg.name).values() if n is not None]
    names = dict.fromkeys(n for n in [*siblings, *FULL_SCALE_PRESETS] if n != cfg.name)
    rows = [recipe(cfg)] + [recipe(config.load(name)) for name in names]
    return pd.DataFrame(rows).set_index("preset")


def checkpoint_path(cfg: Config) -> Path:
    """Where the checkpoint of ``cfg`` lives: keyed by the hash of the training keys only."""
    return cfg.cache_path("models", f"{cfg.arch}-{cfg.digest(TRAINING_KEYS)}.pt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable (truncated, not a PyTorch file), foreign (not
    written by :func:`save_checkpoint`), or saved for another architecture or another version of
    its architecture (:data:`spade_lib.models.ARCH_VERSIONS`)."""


def save_checkpoint(result: TrainResult, cfg: Config, path: str | Path,
                    num_classes: int = 10) -> Path:
    """Write ``result``'s model and numbers to ``path`` atomically (a killed writer leaves no file
    that loads), with the architecture version, the numerical settings of this process
    (:func:`spade_lib.reproducibility.settings`) and the weights' fingerprint."""
    state = {"format": CHECKPOINT_FORMAT, "arch": cfg.arch,
             "arch_version": ARCH_VERSIONS[cfg.arch], "model": result.model.state_dict(),
             "num_classes": num_classes, "clean_accuracy": result.clean_accuracy,
             "attack_success": result.attack_success, "seconds": result.seconds,
             "history": result.history, "config": cfg.to_dict(),
             "numerics": reproducibility.settings(), "fingerprint": fingerprint(result.model)}
    return atomic_write(path, lambda fh: torch.save(state, fh))


def load_checkpoint(path: str | Path, arch: str) -> dict[str, Any]:
    """Read and check a checkpoint of :func:`save_checkpoint` for architecture ``arch``.

    Raises
    ------
    FileNotFoundError
        If there is no file at ``path``.
    CheckpointError
        If the file is truncated or not a PyTorch file, lacks any of the keys a checkpoint has,
        was saved before architecture versions were recorded, or for another ``arch`` or another
        version of it. The message names the file and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for damaged files; all mean the same
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({type(e).__name__}: "
                              f"{str(e)[:200]}); is it truncated or not a checkpoint?") from e
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{str(path)!r} is not a spade_lib checkpoint (no 'model' entry)")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format {state.get('format', 1)}, this version reads "
            f"format {CHECKPOINT_FORMAT} (format 1 recorded no architecture version, so what its "
            "parameters mean cannot be checked); delete it to retrain")
    missing = [k for k in _CHECKPOINT_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {missing}")
    if state["arch"] != arch:
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {state['arch']!r}, not {arch!r}")
    if state["arch_version"] != ARCH_VERSIONS[arch]:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds {arch!r} version {state['arch_version']}, but "
            f"{arch!r} is now version {ARCH_VERSIONS[arch]} (its parameters changed meaning); "
            "delete it to retrain")
    return state


def _from_checkpoint(cfg: Config, path: Path) -> TrainResult:
    state = load_checkpoint(path, cfg.arch)
    model = build_model(cfg.arch, state["num_classes"], cfg.width, cfg.image_size)
    model.load_state_dict(state["model"])
    model.eval()
    return TrainResult(model, state["clean_accuracy"], state["attack_success"],
                       state["seconds"], state["history"], path, cached=True,
                       numerics=state["numerics"])


def cached_checkpoint(cfg: Config, path: Path) -> TrainResult | None:
    """The checkpoint at ``path`` for ``cfg``, or ``None`` if there is none or it cannot be used
    (:class:`CheckpointError`: a warning names it, and the caller trains again)."""
    if not path.exists():
        return None
    try:
        return _from_checkpoint(cfg, path)
    except CheckpointError as e:
        warnings.warn(f"{e}. Training it again.", stacklevel=3)
        return None


def trained_model(cfg: Config, progress: bool = True, retrain: bool = False,
                  pinned: bool = True) -> TrainResult:
    """Load the cached checkpoint for ``cfg``, or train it (and cache it) if there is none.

    Parameters
    ----------
    cfg
        The experiment; only :data:`spade_lib.config.TRAINING_KEYS` name the checkpoint.
    progress
        Show the training progress bar.
    retrain
        Train even if a checkpoint exists (and replace it).
    pinned
        On the CPU, train in a new process under :data:`spade_lib.reproducibility.PINNED`, so the
        weights are the same bit for bit whatever this machine's instruction set, thread count
        or environment (the checkpoint records the settings). ``False`` trains in this process.

    Full-scale datasets (ImageNet, Food-101, CelebA) go to
    :func:`spade_lib.train_full.trained_model`: the same cache path, filled by a torchrun job
    (``python -m spade_lib.train_full``) or trained in this process; ``pinned`` does not apply.

    A cached checkpoint that cannot be used (:class:`CheckpointError`: truncated, foreign, or of
    an older version of the architecture) is never loaded: a warning names it and the model is
    trained again.
    """
    if cfg.dataset != "fashion-mnist":
        # full scale (ImageNet, Food-101, CelebA): same cache path, trained by torchrun or here
        from spade_lib import train_full

        return train_full.trained_model(cfg, progress=progress, retrain=retrain)
    path = checkpoint_path(cfg)
    cached = None if retrain else cached_checkpoint(cfg, path)
    if cached is not None:
        return cached
    if pinned and cfg.torch_device() == "cpu" and not reproducibility.is_pinned():
        with tempfile.TemporaryDirectory() as tmp:
            spec = Path(tmp) / "config.json"
            spec.write_text(json.dumps(cfg.to_dict()))
            args = ["--config-json", str(spec), "--out", str(path)]
            reproducibility.run_pinned("spade_lib.train", args + ([] if progress else ["-q"]),
                                       echo=progress)
        result = _from_checkpoint(cfg, path)
        result.cached = False
        return result
    result = train(cfg, progress=progress)
    save_checkpoint(result, cfg, path)
    result.checkpoint = path
    result.numerics = reproducibility.settings()
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
    train_set, _ = scenes.load_scenes(cfg)
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
    clean, success = trojan_accuracy(model, cfg, device=device)
    return TrainResult(model.cpu(), clean, success, seconds, history)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m spade_lib.train PRESET``: train (or load) a preset's model and print Table C.10.

    ``--config-json FILE --out PATH`` trains the config in ``FILE`` and writes the checkpoint to
    ``PATH`` in this process, as :func:`trained_model` does in its pinned child process.
    """
    parser = argparse.ArgumentParser(prog="python -m spade_lib.train", description=main.__doc__)
    parser.add_argument("preset", nargs="?", help="a preset name (params/) or YAML path")
    parser.add_argument("--config-json", help="a config saved as JSON (internal use)")
    parser.add_argument("--out", help="where to write the checkpoint (with --config-json)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.config_json:
        if not args.out:
            parser.error("--config-json needs --out")
        cfg = config.from_dict(json.loads(Path(args.config_json).read_text()))
        save_checkpoint(train(cfg, progress=not args.quiet), cfg, args.out)
        return
    if not args.preset:
        parser.error("give a preset name or --config-json")
    result = trained_model(config.load(args.preset), progress=not args.quiet)
    print(result.table().to_string(index=False))


if __name__ == "__main__":
    main()
