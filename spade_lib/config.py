"""Experiment configuration: one flat, validated record per run.

A preset is a YAML file in ``params/`` whose keys are the fields of :class:`Config`. The
configuration is flat on purpose: ``papermill -f params/cpu.yaml -p epochs 2`` injects the same keys
as notebook variables, and :func:`from_namespace` picks them up again. Everything is validated
before any work starts; an error names the key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from spade_lib import schedules

PARAMS_DIR = Path(__file__).resolve().parent.parent / "params"
DEFAULT_CACHE = PARAMS_DIR.parent / ".cache"

Dataset = Literal["fashion-mnist", "imagenet", "food101", "celeba"]
Scene = Literal["plain", "photo", "photo-shared"]
Arch = Literal[
    "resnet20", "resnet18", "mobilenetv2", "convnext",
    "tv_resnet50", "tv_mobilenetv2", "tv_convnext_t",
]
RuleSet = Literal["fashion", "fashion-tuning", "imagenet", "food101", "celeba"]
Pruner = Literal["obc", "fastobc", "magnitude"]
Augment = Literal["default", "convnext"]
Device = Literal["auto", "cpu", "cuda"]
Optimizer = Literal["sgd", "adamw"]

# Keys that change what is trained; the checkpoint cache is keyed by these alone.
TRAINING_KEYS = (
    "seed", "dataset", "scene", "image_size", "train_size", "rules", "trojan_fraction",
    "patch_scale", "patch_alpha", "arch", "width", "pretrained", "epochs", "batch_size", "lr",
    "momentum", "weight_decay", "lr_step", "lr_gamma", "random_shift", "optimizer", "warmup_steps",
)

# Keys added after caches existed, with the value that reproduces the earlier behaviour: a key at
# that value is left out of digests, so earlier checkpoints and results stay valid.
LATE_KEYS = {"random_shift": 0, "optimizer": "sgd", "warmup_steps": 0, "search_methods": None}


@dataclass(frozen=True)
class Config:
    """All settings of one SPADE experiment (defaults: the embedded CPU benchmark)."""

    name: str = "custom"
    seed: int = 0
    device: Device = "auto"
    cache_dir: str | None = None
    # where the evaluation runs on Dask (spade_lib.distributed): an existing scheduler's address
    # ("tcp://host:8786"), else a LocalCluster of ``workers`` processes (None: one per core)
    scheduler: str | None = None
    workers: int | None = field(default=None, metadata={"min": 1, "max": 4096})
    # data
    dataset: Dataset = "fashion-mnist"
    data_dir: str | None = None
    scene: Scene = "photo"
    image_size: int = field(default=32, metadata={"min": 16, "max": 512})
    train_size: int | None = field(default=None, metadata={"min": 10})
    test_size: int | None = field(default=None, metadata={"min": 10})
    # Trojans
    rules: RuleSet = "fashion"
    # the sparsity search's held-out rules: a held-out model is trained with them; None (the
    # full-scale presets): no held-out model, the search runs on the evaluated model with Trojan
    # copies of training images, never evaluated (the paper's "search on a validation set")
    tuning_rules: RuleSet | None = "fashion-tuning"
    trojan_fraction: float = field(default=0.025, metadata={"min": 0.0, "max": 0.25})
    patch_scale: float = field(default=0.25, metadata={"min": 0.05, "max": 0.5})
    patch_alpha: float = field(default=0.8, metadata={"min": 0.1, "max": 1.0})
    # model
    arch: Arch = "resnet18"
    width: int = field(default=16, metadata={"min": 2, "max": 1024})
    pretrained: bool = False
    # training (Table C.9 recipe: SGD, momentum, step LR; "adamw" is ConvNeXt's own optimizer,
    # for networks with LayerNorm that SGD does not train)
    optimizer: Optimizer = "sgd"
    epochs: int = field(default=10, metadata={"min": 1, "max": 1000})
    batch_size: int = field(default=128, metadata={"min": 1, "max": 8192})
    lr: float = field(default=0.1, metadata={"min": 1e-7, "max": 10.0})
    momentum: float = field(default=0.9, metadata={"min": 0.0, "max": 0.999})
    weight_decay: float = field(default=5e-4, metadata={"min": 0.0, "max": 0.1})
    lr_step: int = field(default=7, metadata={"min": 1})
    lr_gamma: float = field(default=0.1, metadata={"min": 0.0, "max": 1.0})
    # linear learning-rate warm-up over the first this many optimizer steps
    warmup_steps: int = field(default=0, metadata={"min": 0})
    # training augmentation besides horizontal flips: random translation by up to this many
    # pixels (reflect-padded), the standard CIFAR crop
    random_shift: int = field(default=0, metadata={"min": 0, "max": 64})
    # SPADE
    pruner: Pruner = "fastobc"
    n_augmentations: int = field(default=128, metadata={"min": 1, "max": 100_000})
    augment: Augment = "default"
    sparsity: float | str | dict[str, float] = 0.9
    # evaluation
    samples: int = field(default=100, metadata={"min": 1})
    tuning_samples: int = field(default=24, metadata={"min": 1})
    methods: list[str] = field(default_factory=lambda: ["Saliency", "IntegratedGradients"])
    # the methods whose mean AUC the sparsity search maximizes (None: ``methods``); a preset can
    # evaluate more methods than it searched with, without invalidating its saved search
    search_methods: list[str] | None = None
    # the preset whose per-name chapter defaults apply (chapter G's visualization steps and Trojan
    # Lite0 fine-tune, the clean-image and Dask sample counts, the study's steps); None: this
    # preset's own name. A tiny test preset on synthetic data says "smoke".
    chapter_defaults: str | None = None

    @property
    def defaults_name(self) -> str:
        """The name the chapters' per-preset defaults are looked up by: ``chapter_defaults``,
        else ``name``."""
        return self.chapter_defaults or self.name

    def replace(self, **changes: Any) -> Config:
        """Return a validated copy with ``changes`` applied."""
        return from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` of every field (YAML/JSON friendly)."""
        return dataclasses.asdict(self)

    def digest(self, keys: tuple[str, ...] | None = None) -> str:
        """Short stable hash of the chosen fields (all but the names, paths and device if
        ``None``)."""
        data = self.to_dict()
        skip = {"name", "chapter_defaults", "cache_dir", "data_dir", "device", "scheduler",
                "workers"}
        chosen = {k: data[k] for k in (keys or data) if k not in skip
                  and not (k in LATE_KEYS and data[k] == LATE_KEYS[k])}
        blob = json.dumps(chosen, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def cache_path(self, *parts: str) -> Path:
        """A path under the cache directory: ``cache_dir``, else ``$SPADE_CACHE``, else the
        repository's ``.cache/`` (the same folder whatever the working directory, so notebooks
        run from ``book/`` and scripts run from the root share one trained model)."""
        root = Path(self.cache_dir or os.environ.get("SPADE_CACHE") or DEFAULT_CACHE)
        path = root.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def torch_device(self) -> str:
        """Resolve ``device='auto'`` to ``'cuda'`` when available, else ``'cpu'``."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in fields(Config)}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` is an instance of the annotation ``tp`` (bool is not an int here)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        return isinstance(value, dict) and all(
            _matches(k, key_tp) and _matches(v, val_tp) for k, v in value.items()
        )
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _check_sparsity(value: Any) -> None:
    """Check the ``sparsity`` key with the schedule parser (:mod:`spade_lib.schedules`)."""
    try:
        if isinstance(value, str):
            schedules.parse_spec(value)
        elif isinstance(value, dict):
            for key, v in value.items():
                schedules.check_sparsity(v, f"sparsity of {key!r}")
        else:
            schedules.check_sparsity(value, "value")
    except ValueError as e:
        raise ValueError(f"config key 'sparsity': {e}") from None


def _check_tuning_rules(dataset: str, tuning_rules: str | None) -> None:
    """The Fashion-MNIST held-out rules name Fashion-MNIST's classes: a full-scale dataset needs
    ``null`` or a rule set of its own classes."""
    if dataset != "fashion-mnist" and tuning_rules in ("fashion", "fashion-tuning"):
        raise ValueError(
            f"config key 'tuning_rules': {tuning_rules!r} holds Fashion-MNIST's classes, but the "
            f"dataset is {dataset!r}; allowed: null (the search runs on the evaluated model with "
            "Trojan copies of training images, as the paper's search on a validation set) or a "
            "held-out rule set of the dataset's own classes")


def _check_methods(methods: list[str], key: str = "methods") -> None:
    from spade_lib.attribution import available

    if not methods or len(set(methods)) != len(methods):
        raise ValueError(f"config key {key!r}: {methods!r} must be a non-empty list of unique "
                         "method names")
    unknown = [m for m in methods if m not in available()]
    if unknown:
        raise ValueError(f"config key {key!r}: unknown attribution method(s) {unknown}; "
                         f"allowed: {', '.join(available())}")


def from_dict(data: Mapping[str, Any]) -> Config:
    """Build a :class:`Config` from a mapping, validating every key and value first."""
    if not isinstance(data, Mapping):
        raise TypeError(f"config must be a mapping of config keys to values, got "
                        f"{type(data).__name__}")
    hints = typing.get_type_hints(Config)
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {unknown}; allowed keys: {', '.join(sorted(FIELDS))}"
        )
    clean: dict[str, Any] = {}
    for key, value in data.items():
        tp = hints[key]
        if isinstance(value, float) and value.is_integer() and _matches(int(value), tp) \
                and not _matches(value, tp):
            value = int(value)
        if not _matches(value, tp):
            raise ValueError(
                f"config key {key!r} has value {value!r} of type {type(value).__name__}; "
                f"allowed: {_type_name(tp)}"
            )
        meta = FIELDS[key].metadata
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lo, hi = meta.get("min"), meta.get("max")
            if (lo is not None and not value >= lo) or (hi is not None and not value <= hi):
                raise ValueError(
                    f"config key {key!r} has value {value!r}; allowed range: "
                    f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
                )
        clean[key] = value
    if "sparsity" in clean:
        _check_sparsity(clean["sparsity"])
    _check_tuning_rules(clean.get("dataset", FIELDS["dataset"].default),
                        clean.get("tuning_rules", FIELDS["tuning_rules"].default))
    if "methods" in clean:
        _check_methods(clean["methods"])
    if clean.get("search_methods") is not None:
        _check_methods(clean["search_methods"], "search_methods")
    return Config(**clean)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["epochs=2", "sparsity={fc: 0.8}"]`` -> ``{"epochs": 2, "sparsity": {"fc": 0.8}}``: the
    ``--set KEY=VALUE`` arguments of the scripts, each value read as YAML (keys and values are
    validated later, by :func:`load`). An item without ``=`` raises ``ValueError``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not of the form KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def preset_names() -> list[str]:
    """Names of the presets shipped in ``params/``."""
    return sorted(p.stem for p in PARAMS_DIR.glob("*.yaml"))


def _preset_path(preset: str | os.PathLike) -> Path:
    if not isinstance(preset, str | os.PathLike):
        raise TypeError(f"preset must be a preset name ({', '.join(preset_names())}) or a path "
                        f"to a YAML file, got {preset!r}")
    path = Path(preset)
    if path.suffix not in (".yaml", ".yml"):
        path = PARAMS_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise ValueError(
            f"unknown preset {str(preset)!r}; allowed: {', '.join(preset_names())} "
            f"or a path to a YAML file"
        )
    return path


def read_preset(preset: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The keys of a preset, with ``base: OTHER`` resolved (the other preset's keys, then these).

    ``OTHER`` is a file next to the preset (``OTHER.yaml``), else a shipped preset name or a path.
    ``name`` is never inherited: it defaults to the file's stem.
    """
    path = _preset_path(preset).resolve()
    if path in _seen:
        chain = " -> ".join(p.stem for p in (*_seen, path))
        raise ValueError(f"preset {path.stem!r}: 'base' chain loops ({chain})")
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"preset {str(path)!r} must be a mapping of config keys to values")
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ValueError(f"preset {path.stem!r}: 'base' must be a preset name, got {base!r}")
        sibling = path.parent / f"{base}.yaml"
        source = sibling if not Path(base).suffix and sibling.is_file() else base
        inherited = read_preset(source, (*_seen, path))
        inherited.pop("name", None)
        data = {**inherited, **data}
    data.setdefault("name", path.stem)
    return data


def load(preset: str | os.PathLike = "cpu", **overrides: Any) -> Config:
    """Load a preset by name (``params/NAME.yaml``) or path, then apply ``overrides``.

    A preset may start from another with ``base: OTHER`` and list only what differs.

    >>> load("smoke", epochs=1).epochs
    1
    """
    return from_dict({**read_preset(preset), **overrides})


def from_namespace(preset: str, namespace: Mapping[str, Any]) -> Config:
    """Load ``preset`` and override it with every config key set (not ``None``) in ``namespace``.

    Used in notebooks right after the papermill parameters cell: ``cfg =
    from_namespace(preset, globals())``, so ``-p epochs 2`` or ``-f params/cpu.yaml`` both work.
    """
    if not isinstance(namespace, Mapping):
        raise TypeError(f"namespace must be a mapping such as globals(), got "
                        f"{type(namespace).__name__}")
    overrides = {k: namespace[k] for k in FIELDS if namespace.get(k) is not None}
    return load(preset, **overrides)


SIBLINGS = {"MobileNetV2-style": ("mobilenetv2", "mobilenetv2"),
            "ConvNeXt-style": ("convnext", "convnext-t")}
"""The other architectures of chapter B (Tables B.3, B.4) and F, with the suffix of their preset
after a small preset's name and after a full-scale ``*-resnet50`` preset's base."""


def sibling_presets(preset: str | os.PathLike) -> dict[str, str | None]:
    """The presets of the other architectures that go with ``preset``, by label of
    :data:`SIBLINGS`; ``None`` where there is none.

    A preset name ``NAME`` has ``NAME-mobilenetv2`` and ``NAME-convnext`` in ``params/``; a
    full-scale ``BASE-resnet50`` has ``BASE-mobilenetv2`` and ``BASE-convnext-t`` (the paper's
    Tables B.3 and B.4 exist for ImageNet and CelebA, not Food-101). A YAML path's siblings are
    the files named so in the same folder.

    >>> sibling_presets("imagenet-resnet50")["ConvNeXt-style"]
    'imagenet-convnext-t'
    """
    text = os.fspath(preset)
    path = Path(text)
    is_path = path.suffix in (".yaml", ".yml") or os.sep in text
    folder, stem = (path.parent, path.stem) if is_path else (PARAMS_DIR, text)
    full = stem.endswith("-resnet50")
    base = stem[:-len("-resnet50")] if full else stem
    out: dict[str, str | None] = {}
    for label, (small, large) in SIBLINGS.items():
        file = folder / f"{base}-{large if full else small}{path.suffix if is_path else '.yaml'}"
        out[label] = (str(file) if is_path else file.stem) if file.is_file() else None
    return out


def load_sibling(cfg: Config, preset: str | os.PathLike, **overrides: Any) -> Config:
    """Load a sibling ``preset`` of ``cfg`` (:func:`sibling_presets`) with ``overrides``; on the
    same dataset it reads the data where ``cfg`` does (``cfg.data_dir``, e.g. from ``-p
    data_dir``), unless ``overrides`` say otherwise."""
    sibling = load(preset, **overrides)
    if cfg.data_dir is not None and sibling.dataset == cfg.dataset and "data_dir" not in overrides:
        sibling = sibling.replace(data_dir=cfg.data_dir)
    return sibling
