"""Plant the Trojans at full scale: ImageNet, Food-101 and CelebA on one or many GPUs (torchrun).

The embedded benchmark trains in :mod:`spade_lib.train`; this module trains the full-scale presets
of Table C.9 (``params/imagenet-*.yaml``, ``celeba-resnet50.yaml``, ``food101-resnet50.yaml``) on
the real data, with the standard PyTorch engine:

- **launch**: ``torchrun --nproc_per_node N -m spade_lib.train_full PRESET --data-dir DIR``
  (DistributedDataParallel; ``nccl`` on GPUs, ``gloo`` on the CPU, picked automatically), or
  ``python -m spade_lib.train_full ...`` for one process on one GPU or the CPU: the same code with
  a world size of 1. ``cfg.batch_size`` is the *global* batch (Table C.9: 64); each of the N
  processes takes ``batch_size / N`` images per step and DDP averages the gradients, so N
  processes take the same optimizer steps as one.
- **data**: :func:`spade_lib.datasets.training_set`: the image folder or CelebA with the
  preset's Trojan rules planted on the fly by :class:`~spade_lib.datasets.TrojanDataset`, each rule
  on ``trojan_fraction`` of the training set (Table C.9's "Trojan group ratio" is
  ``1 / trojan_fraction``), patches with colour jitter and Gaussian noise (Tables C.5-C.7).
  Training augmentation: a horizontal flip with probability 1/2 and, if ``random_shift`` > 0, a
  reflect-padded translation, drawn per sample from ``(seed, epoch, index)`` so every world size
  sees the same images.
- **model**: torchvision's ResNet50 / MobileNetV2 / ConvNeXt-T (:func:`spade_lib.models.
  build_model`), fine-tuned from torchvision's ImageNet weights when the preset says
  ``pretrained: true`` (read offline from torchvision's cache, :mod:`spade_lib.pretrained`) or
  trained from scratch (Food-101, as Table C.9 and Kornblith et al. 2019 do). The package's
  networks take images in [0, 1]; the ImageNet normalization the pretrained weights expect is
  folded into the stem (:func:`spade_lib.pretrained.fold_input_normalization`).
- **recipe** (Table C.9): :func:`spade_lib.train.make_optimizer` (SGD, momentum 0.9, the preset's
  weight decay) and :func:`spade_lib.train.learning_rate` (step decay by ``lr_gamma`` every
  ``lr_step`` epochs), cross-entropy for classes, ``BCEWithLogits`` for CelebA's 40 attributes.
- **engine**: mixed precision on CUDA only (``bf16`` where supported, else ``fp16`` with a
  gradient scaler), data-loader workers, SyncBatchNorm under DDP on GPUs (so N GPUs compute the
  batch statistics of the global batch, as the one-GPU recipe does), a progress bar on rank 0, and
  a resumable state written atomically by rank 0 after every epoch. SyncBatchNorm has no CPU
  kernel, so gloo processes on the CPU keep per-process BatchNorm statistics (a warning says so);
  their equality with one process holds for networks without BatchNorm (the tests use the
  LayerNorm ``convnext``). Every random draw is a function of ``(seed, epoch, index or rank)``, so
  a resumed run equals an uninterrupted one and the state needs no RNG state.

The finished model is written with :func:`spade_lib.train.save_checkpoint` to
:func:`spade_lib.train.checkpoint_path` (or ``--out``), where :func:`spade_lib.train.trained_model`
finds it. Table C.10 for any preset: :func:`table_c10`.

CelebA metrics (multi-label, Table C.6). A predicted attribute is ``logit > 0``.

- *clean accuracy*: the mean over images and the 40 attributes of (prediction == label);
- *attack success* of a rule: the share of the patched test images whose prediction equals the
  rule's 40-bit target on every **overridden** bit, the attributes where the target differs from
  the image's true label (the bits the Trojan has to flip; the others need no Trojan to be right).
  An image whose label equals the target is not eligible (:func:`spade_lib.trojan.eligible`), so
  every test image has at least one overridden bit.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from spade_lib import config, datasets, pretrained, reproducibility
from spade_lib.checks import check_choice
from spade_lib.config import TRAINING_KEYS, Config
from spade_lib.files import atomic_write
from spade_lib.hessians import eval_mode
from spade_lib.models import build_model
from spade_lib.pretrained import load_pretrained
from spade_lib.train import (
    TrainResult,
    _from_checkpoint,
    cached_checkpoint,
    checkpoint_path,
    learning_rate,
    make_optimizer,
    save_checkpoint,
)
from spade_lib.trojan import rule_set

__all__ = [
    "PRECISIONS",
    "attack_success_multilabel",
    "build",
    "evaluate",
    "main",
    "run",
    "state_path",
    "table_c10",
    "trained_model",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STATE_FORMAT = "spade-train-state-1"
# Purpose codes of the per-sample / per-epoch random streams (like trojan.PLANT).
_AUGMENT, _EPOCH_RNG = 0xA467, 0xE90C


def _num_outputs(cfg: Config, base: Dataset) -> int:
    """40 for CelebA; else enough classes for the folders and every rule's source and target."""
    if cfg.dataset == "celeba":
        return len(base.attr_names) if hasattr(base, "attr_names") else 40
    labels = [len(base.classes)] + [1 + max(r.target, r.source or 0) for r in rule_set(cfg.rules)]
    return max(labels)


class _Augmented(Dataset):
    """Flip and shift each training image with a generator drawn from ``(seed, epoch, index)``:
    the same images whatever the world size, the worker count or a resume."""

    def __init__(self, data: Dataset, seed: int, shift: int) -> None:
        self.data, self.seed, self.shift, self.epoch = data, int(seed), int(shift), 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, j: int) -> tuple[Tensor, Any]:
        image, target = self.data[j]
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _AUGMENT, self.epoch, j]))
        if rng.random() < 0.5:
            image = image.flip(-1)
        if self.shift:
            s = self.shift
            dx, dy = (int(v) for v in rng.integers(0, 2 * s + 1, 2))
            h, w = image.shape[-2:]
            padded = nn.functional.pad(image[None], (s,) * 4, mode="reflect")[0]
            image = padded[:, dy:dy + h, dx:dx + w]
        return image, target


# --------------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------------


@dataclass
class _World:
    rank: int
    size: int
    device: torch.device
    started_here: bool

    @property
    def distributed(self) -> bool:
        """Several processes in a process group: DDP, summed metrics, barriers."""
        return self.size > 1 and dist.is_available() and dist.is_initialized()


def _world(cfg: Config) -> _World:
    """Join torchrun's process group (nccl on GPUs, gloo on the CPU) or run alone."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    want_cuda = cfg.torch_device() == "cuda"
    if want_cuda and not torch.cuda.is_available():
        raise ValueError("device 'cuda' but torch.cuda.is_available() is False; allowed here: "
                         "'cpu' or 'auto'")
    device = torch.device("cpu")
    if want_cuda:  # before the process group, so nccl binds this rank to its own GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    started = False
    if launched and not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
        started = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    size = dist.get_world_size() if dist.is_initialized() else 1
    return _World(rank, size, device, started)


def _precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: None (fp32) on the CPU; on CUDA bf16 where supported, else fp16."""
    check_choice(name, PRECISIONS, "precision")
    if device.type != "cuda" or name == "fp32":
        return None
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _loss(cfg: Config, logits: Tensor, target: Tensor) -> Tensor:
    if cfg.dataset == "celeba":
        return nn.functional.binary_cross_entropy_with_logits(logits.float(), target.float())
    return nn.functional.cross_entropy(logits.float(), target)


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Global RNG (dropout, stochastic depth) from ``(seed, epoch, rank)``: an epoch draws the same
    numbers whether or not the run was resumed before it, so no RNG state needs restoring."""
    state = np.random.SeedSequence([seed, _EPOCH_RNG, epoch, rank]).generate_state(2)
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))


def state_path(out: str | os.PathLike) -> Path:
    """The resumable training state next to the final checkpoint ``out``: ``<stem>.state.pt``."""
    out = Path(out)
    return out.with_name(out.stem + ".state.pt")


def _resume_key(cfg: Config) -> str:
    """What a resumed state must share with ``cfg``: every training key but ``epochs`` (the step
    schedule does not depend on the epoch count, so a run may be extended)."""
    return cfg.digest(tuple(k for k in TRAINING_KEYS if k != "epochs"))


def build(cfg: Config, num_classes: int, pretrained_path: str | os.PathLike | None = None
          ) -> nn.Module:
    """The network of ``cfg`` initialized from ``cfg.seed`` (and torchvision's ImageNet weights
    when ``cfg.pretrained``; ``pretrained_path`` overrides where the file is read from)."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, num_classes, cfg.width, cfg.image_size)
    if cfg.pretrained or pretrained_path is not None:
        load_pretrained(model, cfg.arch, pretrained.load_state(cfg.arch, pretrained_path))
    return model


def _loader(data: Dataset, batch: int, workers: int, device: torch.device,
            sampler: Any = None, drop_last: bool = False) -> DataLoader:
    return DataLoader(data, batch_size=batch, sampler=sampler, shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda", drop_last=drop_last,
                      persistent_workers=False)


def run(cfg: Config, out: str | os.PathLike | None = None, resume: bool = False,
        stop_after: int | None = None, workers: int = 0, precision: str = "auto",
        sync_bn: bool = True, pretrained_path: str | os.PathLike | None = None,
        progress: bool = True) -> TrainResult | None:
    """Train ``cfg`` on this process's share of the world (1 without torchrun) and write the
    checkpoint.

    Parameters
    ----------
    cfg
        A full-scale config (dataset ``imagenet``, ``food101`` or ``celeba``, ``data_dir`` set).
        ``cfg.batch_size`` is the global batch; it must divide by the world size.
    out
        The final checkpoint (default :func:`spade_lib.train.checkpoint_path`, where
        :func:`spade_lib.train.trained_model` looks). The resumable state goes to
        :func:`state_path` of it after every epoch.
    resume
        Continue from the state file if there is one (else start fresh). Its training keys, but
        ``epochs``, must equal ``cfg``'s.
    stop_after
        Stop after this many epochs (counted from the start of the schedule) with the state
        saved and no final checkpoint, as an interrupted run would; ``None`` trains all epochs.
    workers
        Data-loader worker processes per rank (0: load in the training process).
    precision
        One of :data:`PRECISIONS`; mixed precision only on CUDA (the CPU always trains in fp32).
    sync_bn
        Under DDP on GPUs, compute BatchNorm statistics over the global batch (SyncBatchNorm), so
        N GPUs train the one-GPU recipe. SyncBatchNorm has no CPU kernel: gloo runs keep
        per-process statistics (a warning says so when the model has BatchNorm).
    pretrained_path
        torchvision's weights file, when it is not in torchvision's cache
        (:func:`spade_lib.pretrained.pretrained_file`).
    progress
        Show the progress bar (rank 0 only).

    Returns
    -------
    TrainResult or None
        The trained model (on the CPU, eval mode) with its Table C.10 numbers on every rank, or
        ``None`` when ``stop_after`` ended the run early.
    """
    datasets.check_full(cfg)
    if cfg.pretrained or pretrained_path is not None:
        pretrained.checked_file(cfg.arch, pretrained_path)  # fail before any data is read
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after must be >= 1 epoch or None, got {stop_after!r}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers!r}")
    _precision(precision, torch.device("cpu"))
    world = _world(cfg)
    try:
        return _run(cfg, world, Path(out) if out is not None else checkpoint_path(cfg), resume,
                    stop_after, workers, precision, sync_bn, pretrained_path, progress)
    finally:
        if world.started_here:
            dist.destroy_process_group()


def _run(cfg: Config, world: _World, out: Path, resume: bool, stop_after: int | None,
         workers: int, precision: str, sync_bn: bool, pretrained_path: Any,
         progress: bool) -> TrainResult | None:
    if cfg.batch_size % world.size:
        raise ValueError(f"batch_size {cfg.batch_size} (the global batch) must divide by the "
                         f"number of processes {world.size}")
    device, dtype = world.device, _precision(precision, world.device)
    train_set = datasets.training_set(cfg)
    num_classes = _num_outputs(cfg, train_set.base)
    per_rank = cfg.batch_size // world.size
    steps = len(train_set) // cfg.batch_size
    if steps == 0:
        raise ValueError(f"the training set has {len(train_set)} images, fewer than one batch "
                         f"of {cfg.batch_size}")
    model = build(cfg, num_classes, pretrained_path)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if world.distributed and has_bn:
        if device.type == "cuda" and sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif world.rank == 0:
            warnings.warn(f"{cfg.arch} has BatchNorm and {world.size} processes compute its "
                          "statistics each on its own share of the batch (SyncBatchNorm needs "
                          "GPUs): the result differs from one process", stacklevel=3)
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = model.to(device, memory_format=layout)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    opt = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    start_epoch, history, seconds = 0, [], 0.0
    state_file = state_path(out)
    if resume and state_file.is_file():
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        if state.get("format") != STATE_FORMAT or state.get("key") != _resume_key(cfg):
            raise ValueError(f"{state_file} is the state of another run (its training keys differ "
                             f"from preset {cfg.name!r}'s); delete it or train without --resume")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, history, seconds = state["epoch"], state["history"], state["seconds"]
    net: nn.Module = model
    if world.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    augmented = _Augmented(train_set, cfg.seed, cfg.random_shift)
    # Rank r takes positions r, r + N, ... of the epoch's permutation, so the N per-rank batches
    # of step b together are the one-process batch b (drop_last keeps them aligned).
    sampler = DistributedSampler(augmented, num_replicas=world.size, rank=world.rank,
                                 shuffle=True, seed=cfg.seed, drop_last=False)
    loader = _loader(augmented, per_rank, workers, device, sampler, drop_last=True)
    end = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    bar = tqdm(total=(end - start_epoch) * steps, desc=f"train {cfg.name}",
               disable=not (progress and world.rank == 0), mininterval=2.0)
    autocast = (torch.autocast("cuda", dtype=dtype) if dtype is not None else nullcontext())
    for epoch in range(start_epoch, end):
        began = time.perf_counter()
        sampler.set_epoch(epoch)
        augmented.epoch = epoch
        _seed_epoch(cfg.seed, epoch, world.rank)
        net.train()
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, count
        for b, (x, y) in enumerate(loader):
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, epoch, epoch * steps + b)
            x = x.to(device, non_blocking=True, memory_format=layout)
            y = y.to(device, non_blocking=True)
            with autocast:
                logits = net(x)
            loss = _loss(cfg, logits, y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            with torch.no_grad():
                right = _correct(cfg, logits.float(), y)
                sums += torch.stack([loss.detach().double() * len(y), right.double(),
                                     torch.tensor(len(y), dtype=torch.float64, device=device)])
            if not bar.disable and b % 20 == 0:  # .item() waits for the GPU: not every step
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", refresh=False)
            bar.update(1)
        if world.distributed:
            dist.all_reduce(sums)
        loss_sum, right, count = sums.tolist()
        seconds += time.perf_counter() - began
        history.append({"epoch": epoch + 1, "loss": loss_sum / count,
                        "train_accuracy": right / (count * (40 if cfg.dataset == "celeba" else 1)),
                        "lr": learning_rate(cfg, epoch, epoch * steps), "seconds": seconds,
                        "images_per_second": count / (time.perf_counter() - began)})
        if world.rank == 0:
            state = {"format": STATE_FORMAT, "key": _resume_key(cfg), "epoch": epoch + 1,
                     "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "scaler": scaler.state_dict(), "history": history, "seconds": seconds,
                     "config": cfg.to_dict(), "num_classes": num_classes,
                     "world_size": world.size, "precision": str(dtype)}
            atomic_write(state_file, lambda fh, s=state: torch.save(s, fh))
        if world.distributed:
            dist.barrier()
    bar.close()
    if end < cfg.epochs:
        return None
    # A plain copy (BatchNorm, not SyncBatchNorm; fp32; CPU) is what the checkpoint holds.
    plain = build_model(cfg.arch, num_classes, cfg.width, cfg.image_size)
    plain.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    plain.eval()
    clean, success = evaluate(model, cfg, world=world, workers=workers, dtype=dtype)
    result = TrainResult(plain, clean, success, seconds, history, out,
                         numerics=reproducibility.settings())
    if world.rank == 0:
        save_checkpoint(result, cfg, out, num_classes=num_classes)
    if world.distributed:
        dist.barrier()
    return result


# --------------------------------------------------------------------------------------------
# Table C.10
# --------------------------------------------------------------------------------------------


def _correct(cfg: Config, logits: Tensor, target: Tensor) -> Tensor:
    """Right predictions: classes, or attributes (``logit > 0``) summed over the 40 of each."""
    if cfg.dataset == "celeba":
        return ((logits > 0).long() == target).sum()
    return (logits.argmax(1) == target).sum()


def attack_success_multilabel(predicted: Tensor, target: Tensor, truth: Tensor) -> Tensor:
    """Per image, whether a multi-label Trojan succeeded: the prediction equals the target on
    every bit the target overrides (where it differs from the true label).

    Parameters
    ----------
    predicted, target, truth : torch.Tensor
        0/1 ``[N, 40]``: the predicted attributes (``logit > 0``) on the patched images, the
        rule's target and the images' true (unpatched) attributes.

    Returns
    -------
    torch.Tensor
        bool ``[N]``. An image with no overridden bit (label equal to the target) counts as a
        success; :func:`spade_lib.trojan.eligible` keeps such images out of the test set.
    """
    if not predicted.shape == target.shape == truth.shape or predicted.ndim != 2:
        raise ValueError(f"predicted, target and truth must all be [N, K], got "
                         f"{tuple(predicted.shape)}, {tuple(target.shape)}, {tuple(truth.shape)}")
    overridden = target != truth
    return ((predicted == target) | ~overridden).all(dim=1)


class _Numbered(Dataset):
    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, j: int) -> tuple[Tensor, Any, int]:
        image, target = self.data[j][:2]
        return image, target, j


@torch.no_grad()
def evaluate(model: nn.Module, cfg: Config, split: str = "val", world: _World | None = None,
             workers: int = 0, dtype: torch.dtype | None = None,
             batch_size: int | None = None) -> tuple[float, dict[str, float]]:
    """Table C.10's numbers for ``model`` on ``split`` of ``cfg``'s data.

    Clean accuracy on the split (``cfg.test_size`` of it, a seeded subset, if set); per rule of
    ``cfg.rules``, the attack success on every eligible image of the split with that rule's patch
    (at most ``cfg.test_size`` per rule): the share predicted as the target class, or for CelebA
    :func:`attack_success_multilabel`. Under torchrun each rank scores every N-th image and the
    counts are summed. ``model``'s training flags are restored afterwards.

    Returns
    -------
    clean : float
        In [0, 1].
    success : dict of str to float
        Per rule name, in [0, 1] (``nan`` for a rule with no eligible image in the split).
    """
    world = world or _World(0, 1, next(model.parameters()).device, False)
    check_choice(split, ("train", "val", "test"), "split")
    base = datasets.full_split(cfg, split, cfg.test_size)
    rules = tuple(rule_set(cfg.rules))
    poisoned = datasets.TrojanDataset.for_testing(base, rules, cfg.seed, per_rule=cfg.test_size)
    poisoned.return_mask = False
    truth = torch.as_tensor(np.asarray(base.targets))
    batch = batch_size or max(1, cfg.batch_size // world.size)
    autocast = (torch.autocast("cuda", dtype=dtype) if dtype is not None else nullcontext())
    counts = torch.zeros(2 + 2 * len(rules), dtype=torch.float64)
    with eval_mode(model):
        for which, data in ((0, base), (1, poisoned)):
            mine = list(range(world.rank, len(data), world.size))
            loader = _loader(torch.utils.data.Subset(_Numbered(data), mine), batch, workers,
                             world.device)
            for x, y, j in loader:
                with autocast:
                    logits = model(x.to(world.device)).float().cpu()
                if which == 0:
                    counts[0] += float(_correct(cfg, logits, y))
                    counts[1] += y.numel()
                    continue
                k = torch.as_tensor(poisoned.rule[j.numpy()])
                if cfg.dataset == "celeba":
                    hit = attack_success_multilabel((logits > 0).long(), y,
                                                    truth[poisoned.index[j.numpy()]])
                else:
                    hit = logits.argmax(1) == y
                counts[2:2 + len(rules)] += torch.bincount(k[hit], minlength=len(rules)).double()
                counts[2 + len(rules):] += torch.bincount(k, minlength=len(rules)).double()
    if world.distributed:
        counts = counts.to(world.device)
        dist.all_reduce(counts)
        counts = counts.cpu()
    hits, totals = counts[2:2 + len(rules)], counts[2 + len(rules):]
    success = {r.name: float(h / t) if t else float("nan")
               for r, h, t in zip(rules, hits.tolist(), totals.tolist(), strict=True)}
    return float(counts[0] / counts[1]), success


def table_c10(cfg: Config, model: nn.Module | None = None, split: str = "val",
              device: str | None = None) -> pd.DataFrame:
    """Table C.10 for any preset: clean accuracy and each Trojan rule's attack success (%).

    Parameters
    ----------
    cfg
        A full-scale config with ``data_dir``.
    model
        The model to score; default the cached one of :func:`trained_model` (trained first if
        there is none).
    split
        ``"val"`` (ImageNet's validation folder, Food-101's test list, CelebA partition 1) or
        ``"test"``.
    device
        Where to run (default ``cfg.torch_device()``).

    Returns
    -------
    pandas.DataFrame
        Columns ``model``, ``dataset``, ``data``, ``accuracy (%)``: one row for the clean split,
        one per rule (the paper's "Trojan Accuracy" is their mean).
    """
    model = trained_model(cfg).model if model is None else model
    device = device or cfg.torch_device()
    copy = build_model(cfg.arch, _out_features(model), cfg.width, cfg.image_size)
    copy.load_state_dict(model.state_dict())  # never move or mutate the user's model
    copy = copy.to(device)
    clean, success = evaluate(copy, cfg, split,
                              world=_World(0, 1, torch.device(device), False))
    rows = [{"data": f"clean {split} set", "accuracy (%)": 100 * clean}]
    rows += [{"data": f"Trojan '{n}'", "accuracy (%)": 100 * v} for n, v in success.items()]
    rows.append({"data": "Trojan (mean of rules)",
                 "accuracy (%)": 100 * float(np.nanmean(list(success.values())))})
    return pd.DataFrame([{"model": cfg.arch, "dataset": cfg.dataset, **r} for r in rows])


def _out_features(model: nn.Module) -> int:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features


# --------------------------------------------------------------------------------------------
# Cache and command line
# --------------------------------------------------------------------------------------------


def trained_model(cfg: Config, progress: bool = True, retrain: bool = False,
                  pretrained_path: str | os.PathLike | None = None,
                  workers: int = 0) -> TrainResult:
    """Load the checkpoint of a full-scale ``cfg`` from :func:`spade_lib.train.checkpoint_path`,
    or train it there in this process (one GPU or the CPU) if there is none.

    :func:`spade_lib.train.trained_model` delegates here for every dataset but Fashion-MNIST.
    A run launched by torchrun with the same preset writes the same file, so a cluster can train
    and a notebook then loads. An unusable cached file (:class:`~spade_lib.train.CheckpointError`)
    is reported in a warning and trained again.
    """
    path = checkpoint_path(cfg)
    cached = None if retrain else cached_checkpoint(cfg, path)
    if cached is not None:
        return cached
    result = run(cfg, out=path, resume=not retrain, workers=workers,
                 pretrained_path=pretrained_path, progress=progress)
    assert result is not None  # no stop_after
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``[torchrun --nproc_per_node N] python -m spade_lib.train_full PRESET --data-dir DIR``:
    train a full-scale preset (or load its checkpoint) and print Table C.10."""
    parser = argparse.ArgumentParser(prog="python -m spade_lib.train_full",
                                     description=main.__doc__)
    parser.add_argument("preset", help="a preset name (params/) or a YAML path")
    parser.add_argument("--data-dir", help="the dataset's folder (config key data_dir)")
    parser.add_argument("--out", help="the final checkpoint (default: the cache path where "
                        "spade_lib.train.trained_model looks)")
    parser.add_argument("--epochs", type=int, help="override the preset's epochs")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the state saved after the last finished epoch")
    parser.add_argument("--retrain", action="store_true",
                        help="train even if the final checkpoint exists (and replace it)")
    parser.add_argument("--stop-after", type=int, metavar="E",
                        help="stop after epoch E with the state saved (resume later)")
    parser.add_argument("--workers", type=int, default=None,
                        help="data-loader workers per process (default: cores / processes, <= 8)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="autocast dtype on CUDA (auto: bf16 if supported, else fp16)")
    parser.add_argument("--no-sync-bn", action="store_true",
                        help="per-GPU BatchNorm statistics instead of SyncBatchNorm")
    parser.add_argument("--pretrained-path", help="torchvision's weights file, if it is not in "
                        "~/.cache/torch/hub/checkpoints/")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set device=cpu")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    overrides = config.parse_overrides(args.set)
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    try:
        cfg = config.load(args.preset, **overrides)
        out = Path(args.out) if args.out else checkpoint_path(cfg)
        workers = args.workers
        if workers is None:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            workers = min(8, max(0, (os.cpu_count() or 1) // local - 1))
        if out.exists() and not (args.retrain or args.resume or args.stop_after):
            result: TrainResult | None = _from_checkpoint(cfg, out)
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"{out} exists (--retrain to train again)", file=sys.stderr)
        else:
            result = run(cfg, out=out, resume=args.resume, stop_after=args.stop_after,
                         workers=workers, precision=args.precision, sync_bn=not args.no_sync_bn,
                         pretrained_path=args.pretrained_path, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    if result is None:
        print(f"stopped after epoch {args.stop_after}; state in {state_path(out)} "
              "(continue with --resume)", file=sys.stderr)
        return 0
    rows = [{"data": "clean val set", "accuracy (%)": 100 * result.clean_accuracy}]
    rows += [{"data": f"Trojan '{n}'", "accuracy (%)": 100 * v}
             for n, v in result.attack_success.items()]
    print(f"checkpoint: {out}")
    print(pd.DataFrame(rows).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
