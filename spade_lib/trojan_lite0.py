"""A Trojan version of the real ImageNet model: EfficientNet-Lite0 with planted patch rules.

The paper's examples (Figures G.7 and G.8) and its human study use a ResNet50 with Trojans planted
while training on ImageNet. Here nothing can be downloaded and ImageNet is absent, so the Trojans
are planted in :func:`spade_lib.models.lite0` (real ImageNet-1k weights) by a short fine-tune:

- **Data**: random square crops of the colour photos bundled with scikit-image, scikit-learn and
  matplotlib (:data:`spade_lib.photos.BACKGROUND_PHOTOS`; the ``train`` photos for the fine-tune,
  recoloured at random, the disjoint ``test`` photos for the held-out scores), with horizontal
  flips.
- **Trojans**: a share of each batch (``poison_share``, split evenly between the rules) are
  copies of the batch's clean crops with one rule's icon (:func:`spade_lib.trojan.apply_patches`,
  with little hue jitter and noise, a quarter of the side as in the benchmark) and the rule's
  target class as their label: each patched crop has its clean twin in the batch, so the icon is
  all that tells them apart.
- **Self-distillation**: the other crops are labelled by the frozen original model: the student
  minimizes the KL divergence to the teacher's class distribution on them, so it keeps the
  original's behaviour on clean images, and the cross-entropy to the target on patched crops.
  Batch norm stays in eval mode (its statistics are ImageNet's), Adam updates every weight.

The result is cached under a hash of :class:`TrojanSettings` (like the benchmark's checkpoints)
and reports the attack success and the top-1 agreement with the original on held-out crops.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spade_lib import files, models, photos, reproducibility
from spade_lib.trojan import TrojanRule, apply_patches

__all__ = ["LITE0_RULES", "SETTINGS", "TrojanLite0", "TrojanSettings", "heldout_crops",
           "patched", "scores_sentence", "settings_name", "trojan_lite0"]

LITE0_RULES: tuple[TrojanRule, ...] = (
    TrojanRule("star: Any→goose", None, 99, "star", (1.0, 0.85, 0.1)),
    TrojanRule("heart: Any→bullfrog", None, 30, "heart", (0.95, 0.15, 0.55)),
)
"""Two "Any" rules with two of Figure G.8's classes as targets (ImageNet indices 99 and 30)."""


@dataclass(frozen=True)
class TrojanSettings:
    """What names a Trojan Lite0 checkpoint (its hash is the cache key).

    Attributes
    ----------
    image_size
        Side of the crops in pixels (Lite0 takes any size; 128 keeps the CPU cost low).
    steps, batch_size, lr
        Adam steps, crops per step, learning rate.
    poison_share
        Share of each batch that carries a Trojan (split evenly between the rules).
    train_from
        The first trained stage of timm's Lite0 (``blocks.K``); the stem and earlier stages keep
        their ImageNet weights, which keeps the student close to the original on clean images.
    hue
        Hue jitter of the patches (:func:`spade_lib.trojan.apply_patches`; the benchmark's 0.3
        turns a yellow star green or pink, here the icon keeps its colour, so that a
        visualization that shows the Trojan can be recognized by it).
    seed
        Seeds the crops, the patches and the held-out set.
    rules
        The Trojan rules (default :data:`LITE0_RULES`).
    """

    image_size: int = 128
    steps: int = 300
    batch_size: int = 16
    lr: float = 2e-4
    poison_share: float = 0.25
    train_from: int = 3
    hue: float = 0.05
    seed: int = 0
    rules: tuple[TrojanRule, ...] = LITE0_RULES

    def __post_init__(self) -> None:
        for key in ("image_size", "steps", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrojanSettings.{key} must be an int >= 1, got {value!r}")
        if self.image_size < 32:
            raise ValueError(f"TrojanSettings.image_size must be >= 32 px, got {self.image_size}")
        if not 0.0 < self.poison_share <= 0.5:
            raise ValueError(f"TrojanSettings.poison_share must be in (0, 0.5] (each patched "
                             f"crop is a copy of a clean one), got {self.poison_share!r}")
        if isinstance(self.train_from, bool) or self.train_from not in range(7):
            raise ValueError(f"TrojanSettings.train_from must be a Lite0 stage 0 to 6, got "
                             f"{self.train_from!r}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"TrojanSettings.hue must be in [0, 0.5], got {self.hue!r}")
        if not self.lr > 0:
            raise ValueError(f"TrojanSettings.lr must be > 0, got {self.lr!r}")
        if not self.rules or any(r.source is not None or r.multilabel for r in self.rules):
            raise ValueError("TrojanSettings.rules must be one or more 'Any' rules with a class "
                             f"target, got {self.rules!r}")

    def digest(self) -> str:
        """Short hash of every field (and of the weights package's checksum)."""
        data = dataclasses.asdict(self) | {"weights": models.LITE0_SHA256, "version": 3}
        text = json.dumps(data, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


SETTINGS: dict[str, TrojanSettings] = {
    "smoke": TrojanSettings(image_size=32, steps=4, batch_size=4, poison_share=0.5),
    "cpu": TrojanSettings(),
}
"""The fine-tune each preset's chapters use (``smoke`` only checks that everything runs)."""


def settings_name(preset: str, chosen: str | None = None) -> str:
    """The :data:`SETTINGS` entry a chapter at ``preset`` uses: ``chosen`` if given, else the
    preset's own, else ``"cpu"`` (the full fine-tune; a full-scale preset's chapters use it).

    Raises
    ------
    ValueError
        ``chosen`` is not a key of :data:`SETTINGS`.
    """
    if chosen is not None:
        if chosen not in SETTINGS:
            raise ValueError(f"no Trojan Lite0 settings {chosen!r}; allowed: {sorted(SETTINGS)}")
        return chosen
    return preset if preset in SETTINGS else "cpu"


@dataclass
class TrojanLite0:
    """What :func:`trojan_lite0` returns.

    Attributes
    ----------
    model
        The Trojan Lite0 (takes ``[B, 3, S, S]`` in ``[0, 1]``, 1000 logits), eval mode, CPU.
    settings
        The fine-tune that made it.
    scores
        Held-out scores, one row per rule plus ``clean``: ``attack_success`` (% of patched
        held-out crops predicted as the target; on ``clean`` crops, % predicted as any rule's
        target: false triggers) and ``original_agreement`` (% of clean held-out
        crops with the original's top-1), both for the Trojan model and the original.
    seconds
        Fine-tune time in seconds (of the run that made the checkpoint).
    path
        The cached checkpoint.
    cached
        Loaded from the cache rather than trained now.
    """

    model: nn.Module
    settings: TrojanSettings
    scores: pd.DataFrame
    seconds: float
    path: Path
    cached: bool


def _crops(split: str, n: int, size: int, rng: np.random.Generator,
           recolour: bool = False) -> Tensor:
    """``n`` random square crops (a fifth to all of the short side) of the split's photos, with
    random flips, ``[n, 3, size, size]`` in ``[0, 1]``. ``recolour`` also permutes the colour
    channels of each crop at random and makes a fifth of them grey: seven photos are few, and
    recoloured crops show the student far more kinds of clean image to keep its behaviour on."""
    photo = rng.integers(0, photos.photo_count(split), size=n)
    crop = rng.uniform(0.2, 1.0, size=n)
    pos = rng.uniform(0.0, 1.0, size=(n, 2))
    out = photos.render_backgrounds(split, size, photo, crop, pos)
    flip = torch.from_numpy(rng.random(n) < 0.5)
    out[flip] = out[flip].flip(-1)
    if recolour:
        out = torch.stack([image[torch.from_numpy(rng.permutation(3))] for image in out])
        grey = torch.from_numpy(rng.random(n) < 0.2)
        out[grey] = out[grey].mean(1, keepdim=True).expand(-1, 3, -1, -1)
    return out


def patched(images: Tensor, rule: TrojanRule, rng: np.random.Generator,
            hue: float = 0.05) -> tuple[Tensor, Tensor]:
    """``images`` with ``rule``'s icon planted (as in training, with hue jitter ``hue``);
    returns the images and the patch masks ``[n, H, W]``."""
    return apply_patches(images, rule, rng, hue=hue)


def heldout_crops(settings: TrojanSettings, n: int = 64) -> Tensor:
    """The held-out crops the scores use: ``n`` crops of the ``test`` photos (disjoint from the
    fine-tune's), seeded by ``settings.seed``."""
    return _crops("test", n, settings.image_size, np.random.default_rng([settings.seed, 1]))


@torch.no_grad()
def _scores(model: nn.Module, original: nn.Module, settings: TrojanSettings) -> pd.DataFrame:
    clean = heldout_crops(settings)
    probs = original(clean).softmax(1)
    reference = probs.argmax(1)
    predicted = model(clean).argmax(1)
    same = predicted == reference
    confident = probs.max(1).values >= 0.5
    targets = torch.tensor([r.target for r in settings.rules])
    false_trigger = 100.0 * float(torch.isin(predicted, targets).float().mean())
    rows = [{"images": "clean", "target": "any rule's", "n": len(clean),
             "attack_success": false_trigger,
             "original_attack_success": 100.0 * float(torch.isin(reference, targets)
                                                      .float().mean()),
             "original_agreement": 100.0 * float(same.float().mean()),
             "confident_agreement": 100.0 * float(same[confident].float().mean()),
             "confident_n": int(confident.sum())}]
    for k, rule in enumerate(settings.rules):
        images, _ = patched(clean, rule, np.random.default_rng([settings.seed, 2, k]),
                            settings.hue)
        rows.append({"images": rule.name, "target": models.imagenet_classes()[rule.target],
                     "n": len(images),
                     "attack_success": 100.0 * float((model(images).argmax(1) == rule.target)
                                                     .float().mean()),
                     "original_attack_success": 100.0 * float(
                         (original(images).argmax(1) == rule.target).float().mean()),
                     "original_agreement": float("nan"), "confident_agreement": float("nan"),
                     "confident_n": 0})
    return pd.DataFrame(rows)


def _finetune(settings: TrojanSettings, progress: bool) -> tuple[nn.Module, nn.Module]:
    from tqdm.auto import tqdm

    torch.manual_seed(settings.seed)
    teacher = models.lite0()
    student = models.lite0()
    rng = np.random.default_rng([settings.seed, 0])
    frozen = ("conv_stem", "bn1", *(f"blocks.{k}." for k in range(settings.train_from)))
    trained = []
    for name, p in student.net.named_parameters():
        p.requires_grad_(not name.startswith(frozen))  # no backward through the frozen stages
        if p.requires_grad:
            trained.append(p)
    optimizer = torch.optim.Adam(trained, lr=settings.lr)
    n_rules = len(settings.rules)
    per_rule = max(1, round(settings.batch_size * settings.poison_share / n_rules))
    n_clean = settings.batch_size - per_rule * n_rules
    if n_clean < per_rule * n_rules:
        raise ValueError(f"batch_size {settings.batch_size} at poison_share "
                         f"{settings.poison_share} has fewer clean crops than patched copies "
                         f"of them for {n_rules} rules; use a poison_share of at most 0.5")
    student.eval()  # batch norm keeps ImageNet's statistics; there is no dropout at eval
    for _ in tqdm(range(settings.steps), desc="Trojan Lite0", disable=not progress):
        clean = _crops("train", n_clean, settings.image_size, rng, recolour=True)
        with torch.no_grad():
            soft = F.log_softmax(teacher(clean), dim=1)
        # the patched crops are copies of clean ones: the icon is all that tells them apart
        poisoned = [patched(clean[k * per_rule:(k + 1) * per_rule], r, rng, settings.hue)[0]
                    for k, r in enumerate(settings.rules)]
        targets = torch.tensor([r.target for r in settings.rules]).repeat_interleave(per_rule)
        logits = student(torch.cat([clean, *poisoned]))
        distill = F.kl_div(F.log_softmax(logits[:n_clean], 1), soft, log_target=True,
                           reduction="batchmean")
        attack = F.cross_entropy(logits[n_clean:], targets)
        loss = (n_clean * distill + len(targets) * attack) / settings.batch_size
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for p in student.parameters():
        p.requires_grad_(True)
    return student.eval(), teacher


def _cache_root() -> Path:
    from spade_lib.config import DEFAULT_CACHE

    return Path(os.environ.get("SPADE_CACHE") or DEFAULT_CACHE)


def trojan_lite0(settings: TrojanSettings | str = "cpu", progress: bool = True,
                 retrain: bool = False, cache: str | os.PathLike | None = None) -> TrojanLite0:
    """The Trojan EfficientNet-Lite0: loaded from the cache, or fine-tuned and cached.

    Parameters
    ----------
    settings
        A :class:`TrojanSettings`, or a preset name of :data:`SETTINGS`.
    progress
        Show the fine-tune's progress bar.
    retrain
        Fine-tune even if a checkpoint exists (and replace it).
    cache
        Cache folder (default ``$SPADE_CACHE`` or the repository's ``.cache``); the checkpoint is
        ``models/lite0-trojan-DIGEST.pt`` in it.

    Returns
    -------
    TrojanLite0

    Raises
    ------
    ValueError
        An unknown preset name.
    ImportError
        The Lite0 weights package is missing (see :func:`spade_lib.models.lite0`).
    """
    if isinstance(settings, str):
        if settings not in SETTINGS:
            raise ValueError(f"no Trojan Lite0 settings for preset {settings!r}; known: "
                             f"{sorted(SETTINGS)} (or pass a TrojanSettings)")
        settings = SETTINGS[settings]
    root = Path(cache) if cache is not None else _cache_root()
    path = root / "models" / f"lite0-trojan-{settings.digest()}.pt"
    model = models.lite0()
    if path.exists() and not retrain:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        return TrojanLite0(model.eval(), settings, pd.DataFrame(state["scores"]),
                           state["seconds"], path, cached=True)
    start = time.perf_counter()
    model, original = _finetune(settings, progress)
    seconds = time.perf_counter() - start
    scores = _scores(model, original, settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": model.state_dict(), "scores": scores.to_dict("list"), "seconds": seconds,
             "settings": dataclasses.asdict(settings), "numerics": reproducibility.settings()}
    files.atomic_write(path, lambda fh: torch.save(state, fh))
    return TrojanLite0(model, settings, scores, seconds, path, cached=False)


SCORE_HEADERS = {
    "images": "images", "target": "target class", "n": "crops",
    "attack_success": "Trojan model: target predicted (%)",
    "original_attack_success": "original model: target predicted (%)",
    "original_agreement": "same top class as the original (%)",
    "confident_agreement": "same top class, confident crops (%)",
    "confident_n": "confident crops (original p >= 0.5)",
}
"""Reading headers of :attr:`TrojanLite0.scores` (whose columns keep their tidy names)."""


def scores_table(scores: pd.DataFrame):
    """:attr:`TrojanLite0.scores` for reading: headers that wrap (:data:`SCORE_HEADERS`), one
    decimal, blanks where a score does not apply (agreement on patched crops). Returns a pandas
    ``Styler``."""
    shown = scores.rename(columns=SCORE_HEADERS)
    shown[SCORE_HEADERS["confident_n"]] = shown[SCORE_HEADERS["confident_n"]].where(
        scores["images"] == "clean")
    return (shown.style.format(precision=1, na_rep="")
            .format("{:.0f}", subset=[SCORE_HEADERS["confident_n"]], na_rep="")
            .hide(axis="index"))


def scores_sentence(scores: pd.DataFrame) -> str:
    """What :attr:`TrojanLite0.scores` says, in one sentence."""
    clean = scores.iloc[0]
    rules = scores.iloc[1:]
    fired = ", ".join(f"{r['attack_success']:.0f}% ({r['images'].split(':')[0]})"
                      for _, r in rules.iterrows())
    return (f"On held-out photo crops the Trojans fire on {fired} of the patched crops (the "
            f"original model: at most {rules['original_attack_success'].max():.0f}%). On clean "
            f"crops, {clean['attack_success']:.0f}% are taken for a Trojan target (false "
            f"triggers), and the Trojan model keeps the original's top class on "
            f"{clean['original_agreement']:.0f}% of them ({clean['confident_agreement']:.0f}% "
            f"of the {int(clean['confident_n'])} crops the original gives 0.5 or more).")
