"""Per-layer sparsity search (Section 3.2, Appendix D.3): greedy over layer groups, last to first.

The pruned layers are grouped by block (:func:`layer_groups`; ``layers.0`` ... ``layers.3`` and
``fc`` for our ResNets). Starting with every group dense, the last group tries every value of the
grid {0, .2, .4, .6, .8, .9, .95, .99} and keeps the one with the best score, then the group
before it does the same with the later groups fixed at their choices and the earlier ones dense,
and so on back to the first group (:func:`greedy_search`). The score is the mean Trojan AUC over
the tuning samples and saliency methods, on the HELD-OUT Trojan model (the second rule set), never
on the evaluation model.

Layers are pruned independently from the dense model's statistics, so a layer pruned at a given
sparsity does not depend on what the other layers do. :class:`Candidates` uses that: per tuning
sample it computes every layer's Hessian once, prunes each layer at each grid value at most once
(when first needed) and stitches the pruned weights into a copy for every schedule it scores. The
stitched network equals :func:`spade_lib.trace.trace` with the same schedule and seed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
import yaml
from torch import Tensor, nn
from tqdm.auto import tqdm

from spade_lib import hessians, metrics, pruning, results, schedules, trojan
from spade_lib.augment import augmented_batches
from spade_lib.config import Config
from spade_lib.files import atomic_write
from spade_lib.models import device_of

__all__ = [
    "GRID", "SEARCH_AGGREGATIONS", "SEARCH_KEYS", "Candidates", "SearchResult", "greedy_search",
    "layer_groups", "saved_search", "search_digest", "search_methods", "schedule_score",
    "search_sparsity",
]

GRID = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99)
"""The paper's grid of per-group sparsities."""

SEARCH_AGGREGATIONS = ("best", "sum", "abs")
"""How a schedule's score averages AUCs: ``best`` (per method, the better of the signed-sum and
abs-sum means, as the paper reports; then the mean over methods), or one fixed aggregation."""

SEARCH_KEYS = ("seed", "pruner", "n_augmentations", "augment")
"""Config keys that change the search (besides the model, samples, methods, grid and groups)."""

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


# --------------------------------------------------------------------------------------------
# Layer groups
# --------------------------------------------------------------------------------------------

def _auto_prefix(model: nn.Module, name: str) -> str:
    """The block a layer belongs to: descend from the root while the module is a container of
    containers (a list of stages), then stop one level below it."""
    parts = name.split(".")
    module: nn.Module = model
    for depth, part in enumerate(parts):
        module = getattr(module, part)
        children = list(module.children())
        expand = (isinstance(module, _CONTAINERS) and children
                  and all(isinstance(c, _CONTAINERS) for c in children))
        if not expand:
            return ".".join(parts[:depth + 1])
    return name


def layer_groups(
    model: nn.Module, layers: Sequence[str] | None = None,
    groups: int | Sequence[str] | None = None,
) -> dict[str, list[str]]:
    """Group the pruned layers by block, in network order.

    Parameters
    ----------
    model
        The network.
    layers
        The pruned layers (default :func:`spade_lib.schedules.default_layers`).
    groups
        ``None``: automatic; a layer belongs to the top-level module above it, except that a
        container whose children are all containers (a list of stages, like our ResNets'
        ``layers``) is split into its children (``layers.0``, ``layers.1``, ...; torchvision's
        ResNet gives ``layer1`` ... ``layer4``, ``fc``). An int ``d``: the first ``d`` components
        of the layer name. A sequence of name prefixes: each layer joins the longest prefix that
        it equals or starts with (``prefix + "."``); every layer must match one.

    Returns
    -------
    dict
        Group name to its layers, groups ordered by their first layer.
    """
    layers = schedules.default_layers(model) if layers is None else list(layers)
    schedules.resolve_sparsity(model, 0.0, layers)
    if not layers:
        raise ValueError("there are no layers to group")
    if groups is None:
        keys = [_auto_prefix(model, name) for name in layers]
    elif isinstance(groups, int) and not isinstance(groups, bool):
        if groups < 1:
            raise ValueError(f"groups as a depth must be >= 1, got {groups}")
        keys = [".".join(name.split(".")[:groups]) for name in layers]
    elif isinstance(groups, Sequence) and not isinstance(groups, str) and groups:
        keys = []
        for name in layers:
            hits = [p for p in groups if name == p or name.startswith(p + ".")]
            if not hits:
                raise ValueError(f"layer {name!r} is in none of the groups {list(groups)}; "
                                 f"layers: {', '.join(layers)}")
            keys.append(max(hits, key=len))
        unused = [p for p in groups if p not in keys]
        if unused:
            raise ValueError(f"group prefix(es) {unused} contain none of the pruned layers; "
                             f"layers: {', '.join(layers)}")
    else:
        raise ValueError(f"groups must be None, a depth >= 1 or a non-empty list of layer name "
                         f"prefixes, got {groups!r}")
    out: dict[str, list[str]] = {}
    for key, name in zip(keys, layers, strict=True):
        out.setdefault(key, []).append(name)
    return out


# --------------------------------------------------------------------------------------------
# Greedy search
# --------------------------------------------------------------------------------------------

def _check_grid(grid: Sequence[float]) -> tuple[float, ...]:
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or not grid:
        raise ValueError(f"grid must be a non-empty list of sparsities in [0, 1), got {grid!r}")
    values = tuple(schedules.check_sparsity(v, "grid value") for v in grid)
    if len(set(values)) != len(values):
        raise ValueError(f"grid values must be unique, got {list(grid)}")
    return values


def greedy_search(
    groups: Sequence[str],
    score: Callable[[dict[str, float]], float | Mapping[str, float]],
    grid: Sequence[float] = GRID,
    progress: bool = False,
    on_choice: Callable[[str, float], None] | None = None,
) -> tuple[dict[str, float], pd.DataFrame]:
    """Greedy per-group search from the last group back to the first.

    Every group starts at 0. For each group from the last one back, every grid value is scored
    with the later groups at their chosen values and the earlier ones at 0, and the best value is
    kept; ties keep the earlier grid value (the smaller one for the default grid), NaN scores never
    win. A schedule scored before is not scored again.

    Parameters
    ----------
    groups
        Group names in network order.
    score
        Maps a schedule ``{group: sparsity}`` to a number to maximise, or to a mapping with the
        number under ``"score"`` and more values to record in the history.
    grid
        Candidate sparsities.
    progress
        Show a progress bar over the candidates.
    on_choice
        Called with ``(group, value)`` once a group's value is fixed.

    Returns
    -------
    tuple
        The schedule ``{group: value}`` and the history: one row per scored candidate with ``step``,
        ``group``, ``value``, ``score`` (plus any extra values), and ``chosen``.
    """
    groups = list(groups)
    if not groups or len(set(groups)) != len(groups):
        raise ValueError(f"groups must be a non-empty list of unique names, got {groups}")
    grid = _check_grid(grid)
    current = dict.fromkeys(groups, 0.0)
    seen: dict[tuple[float, ...], dict[str, float]] = {}
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(groups) * len(grid), desc="sparsity search", disable=not progress)
    with bar:
        for step, group in enumerate(reversed(groups)):
            best_value, best_score, first = None, -math.inf, len(rows)
            for value in grid:
                candidate = {**current, group: value}
                key = tuple(candidate[g] for g in groups)
                if key not in seen:
                    out = score(dict(candidate))
                    seen[key] = dict(out) if isinstance(out, Mapping) else {"score": out}
                result = seen[key]
                s = float(result["score"])
                rows.append({"step": step, "group": group, "value": value, **result,
                             "chosen": False})
                if s > best_score:
                    best_value, best_score = value, s
                bar.update(1)
            if best_value is None:
                raise RuntimeError(f"every candidate of group {group!r} scored NaN or -inf")
            current[group] = best_value
            rows[first + grid.index(best_value)]["chosen"] = True
            if on_choice is not None:
                on_choice(group, best_value)
    return current, pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Candidate networks
# --------------------------------------------------------------------------------------------

class Candidates:
    """Pruned weights of every layer at every requested sparsity, per sample, stitched on demand.

    Parameters
    ----------
    model
        The dense network (not changed; statistics come from a private copy in eval mode).
    images
        The samples ``[S, 3, H, W]``.
    seeds
        One augmentation seed per sample (as given to :func:`spade_lib.trace.trace`).
    layers
        The layers that may be pruned.
    pruner, n_augmentations, recipe, batch_size
        As in :func:`spade_lib.trace.trace`; the views are the trace's
        (:func:`spade_lib.augment.augmented_batches`).
    **pruner_options
        Passed to :func:`spade_lib.pruning.prune_layer`.
    """

    def __init__(self, model: nn.Module, images: Tensor, seeds: Sequence[int],
                 layers: Sequence[str], pruner: str = "fastobc", n_augmentations: int = 1024,
                 recipe: str = "default", batch_size: int = results.TRACE_BATCH,
                 **pruner_options: Any) -> None:
        if images.dim() != 4 or len(seeds) != images.shape[0]:
            raise ValueError(f"need images [S, 3, H, W] and one seed per image, got "
                             f"{list(images.shape)} and {len(seeds)} seeds")
        pruning.check_method(pruner, pruner_options)
        self.dense = copy.deepcopy(model).eval()
        self.work = copy.deepcopy(self.dense)
        self.layers = list(layers)
        self.pruner, self.options = pruner, dict(pruner_options)
        device = device_of(self.dense, default=None)
        self.hessians: list[dict[str, Tensor]] = []
        for image, seed in zip(images.to(device), seeds, strict=True):
            batches = augmented_batches(image, n_augmentations, recipe, int(seed), batch_size)
            self.hessians.append(hessians.layer_hessians(self.dense, batches, self.layers))
        self._modules = dict(self.work.named_modules())
        self._dense = {name: dict(self.dense.named_modules())[name].weight.detach()
                       for name in self.layers}
        self._pruned: dict[tuple[int, str, float], Tensor] = {}
        self.solves = 0

    def __len__(self) -> int:
        return len(self.hessians)

    def weight(self, sample: int, layer: str, sparsity: float) -> Tensor:
        """The layer's weight pruned at ``sparsity`` for one sample (solved once, then kept)."""
        if sparsity == 0:
            return self._dense[layer]
        key = (sample, layer, float(sparsity))
        if key not in self._pruned:
            hessian = self.hessians[sample].get(layer)
            if hessian is None:
                raise ValueError(f"layer {layer!r} was released or is not among the layers "
                                 f"{self.layers}")
            self._pruned[key], _ = pruning.prune_layer(self._dense[layer], hessian, sparsity,
                                                       self.pruner, **self.options)
            self.solves += 1
        return self._pruned[key]

    @torch.no_grad()
    def load(self, sample: int, schedule: Mapping[str, float]) -> nn.Module:
        """Stitch ``schedule`` (``{layer: sparsity}``, others dense) into the shared work copy."""
        unknown = [k for k in schedule if k not in self._dense]
        if unknown:
            raise ValueError(f"unknown layer(s) {unknown}; valid: {', '.join(self.layers)}")
        for name in self.layers:
            self._modules[name].weight.copy_(self.weight(sample, name, schedule.get(name, 0.0)))
        return self.work

    def model(self, sample: int, schedule: Mapping[str, float]) -> nn.Module:
        """A new network: the dense one with ``schedule`` stitched in for one sample."""
        return copy.deepcopy(self.load(sample, schedule))

    def release(self, layers: Sequence[str], keep: float | None = None) -> None:
        """Free the Hessians of ``layers`` and their pruned weights except at ``keep``."""
        for h in self.hessians:
            for name in layers:
                h.pop(name, None)
        drop = [k for k in self._pruned if k[1] in layers and k[2] != keep]
        for k in drop:
            del self._pruned[k]


def schedule_score(candidates: Candidates, samples: results.Samples,
                   schedule: Mapping[str, float], methods: Sequence[str],
                   aggregation: str = "best",
                   method_options: Mapping[str, Mapping[str, Any]] | None = None,
                   ) -> dict[str, float]:
    """Mean Trojan AUC of a layer schedule over the samples and methods.

    Returns ``score`` (by ``aggregation``, see :data:`SEARCH_AGGREGATIONS`), and the plain means
    ``auc_sum`` and ``auc_abs``. Each method's mean skips its NaN (degenerate) samples, but a
    method with no score on any sample makes ``score`` NaN, so such a schedule never wins
    (:func:`greedy_search`) instead of being scored on the other methods alone.
    """
    images, masks, targets = samples.images(), samples.masks(), samples.targets()
    parts = []
    for i in range(len(samples)):
        net = candidates.load(i, schedule)
        part = results.score_methods(net, images[i], masks[i], int(targets[i]), methods,
                                     method_options)
        parts.append(part.assign(sample=i))
    table = pd.concat(parts, ignore_index=True)
    if aggregation == "best":
        value = metrics.best_of_aggregations(table, by="method")["best"].mean(skipna=False)
    else:
        value = table.groupby("method")[f"auc_{aggregation}"].mean().mean(skipna=False)
    return {"score": float(value), "auc_sum": float(table["auc_sum"].mean()),
            "auc_abs": float(table["auc_abs"].mean())}


# --------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------

@dataclass
class SearchResult:
    """What :func:`search_sparsity` found.

    Attributes
    ----------
    schedule
        ``{layer: sparsity}`` for every pruned layer, in network order: a valid ``sparsity``
        config value (``cfg.replace(sparsity=result.schedule)``).
    group_values
        ``{group: sparsity}``.
    groups
        ``{group: [layers]}``.
    history
        One row per scored candidate: ``step``, ``group``, ``value``, ``score``, ``auc_sum``,
        ``auc_abs``, ``chosen`` (for a Figure D.3-style plot).
    score
        The chosen schedule's score.
    key
        Hash of everything the search depended on (its cache file name).
    info
        Methods, aggregation, grid, sample ids and how many layer solves were run.
    """

    schedule: dict[str, float]
    group_values: dict[str, float]
    groups: dict[str, list[str]]
    history: pd.DataFrame
    score: float
    key: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def to_yaml(self) -> str:
        """The schedule as a preset line, ``sparsity: {group: value, ...}`` (groups are block
        prefixes, which a sparsity dict accepts; it resolves to :attr:`schedule`)."""
        return yaml.safe_dump({"sparsity": self.group_values}, sort_keys=False,
                              default_flow_style=True, width=100)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (see :meth:`from_dict`)."""
        return {"schedule": self.schedule, "group_values": self.group_values,
                "groups": self.groups, "history": self.history.to_dict(orient="list"),
                "score": self.score, "key": self.key, "info": self.info}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SearchResult:
        """Inverse of :meth:`to_dict` (also reads files saved when the history was named
        ``"trace"``)."""
        history = d["history"] if "history" in d else d["trace"]
        return cls(dict(d["schedule"]), dict(d["group_values"]),
                   {k: list(v) for k, v in d["groups"].items()}, pd.DataFrame(history),
                   float(d["score"]), d.get("key", ""), dict(d.get("info", {})))


def _check_held_out(cfg: Config, samples: results.Samples) -> None:
    if cfg.tuning_rules is None:
        # no held-out model: the tuning samples are the training split's (samples.tuning_samples)
        return
    if cfg.rules == cfg.tuning_rules:
        raise ValueError(f"cfg.rules and cfg.tuning_rules are both {cfg.rules!r}; the search "
                         "needs a held-out rule set")
    try:
        evaluation = tuple(trojan.rule_set(cfg.rules))
    except ValueError:
        return
    if tuple(samples.poisoned.rules) == evaluation:
        raise ValueError(f"the tuning samples carry the evaluation rules {cfg.rules!r}; search on "
                         f"samples of the held-out model (rules {cfg.tuning_rules!r}), e.g. "
                         "results.tuning_samples(cfg, model)")


def search_sparsity(
    cfg: Config,
    model: nn.Module | None = None,
    samples: results.Samples | None = None,
    methods: Sequence[str] | None = None,
    grid: Sequence[float] = GRID,
    groups: int | Sequence[str] | None = None,
    aggregation: str = "best",
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
    store: bool = True,
    progress: bool = True,
) -> SearchResult:
    """Search per-group sparsities on held-out tuning samples (Section 3.2), cached.

    Parameters
    ----------
    cfg
        Gives the pruner, augmentations, seed and the defaults below.
    model
        The HELD-OUT Trojan model (default: :func:`tuning_model`, on ``cfg.torch_device()``):
        ``trained_model(cfg.replace(rules=cfg.tuning_rules))``, or the evaluated model itself
        when ``cfg.tuning_rules`` is ``None`` (full-scale presets).
    samples
        Tuning samples of that model (default :func:`spade_lib.results.tuning_samples`); with
        held-out rules, samples carrying the evaluation rules are refused.
    methods
        Saliency methods averaged in the score (default ``cfg.search_methods``, else
        ``cfg.methods``).
    grid
        Candidate sparsities per group (default :data:`GRID`).
    groups
        How layers are grouped, see :func:`layer_groups`.
    aggregation
        ``"best"`` (default: per method the better aggregation's mean AUC, as the paper reports),
        ``"sum"`` or ``"abs"``; averaged over methods.
    method_options
        Per method options of :func:`spade_lib.attribution.attribute`.
    store
        Cache the result as JSON under ``cfg.cache_path("search")`` and reuse it.
    progress
        Show progress bars.
    """
    if aggregation not in SEARCH_AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; allowed: "
                         f"{', '.join(SEARCH_AGGREGATIONS)}")
    grid = _check_grid(grid)
    methods = list(search_methods(cfg) if methods is None else methods)
    results.check_methods(methods, method_options)
    if model is None:
        model = tuning_model(cfg, progress).model.to(cfg.torch_device())
    if samples is None:
        samples = results.tuning_samples(cfg, model)
    if not isinstance(samples, results.Samples) or len(samples) == 0:
        raise ValueError(f"samples must be a non-empty Samples object, got {samples!r}")
    _check_held_out(cfg, samples)
    group_map = layer_groups(model, groups=groups)
    layers = [name for names in group_map.values() for name in names]
    blob = json.dumps({
        "config": cfg.digest(SEARCH_KEYS), "model": results.model_fingerprint(model),
        "samples": samples.ids, "rules": [r.name for r in samples.poisoned.rules],
        "methods": methods, "options": {m: dict(o) for m, o in (method_options or {}).items()},
        "grid": grid, "groups": group_map, "aggregation": aggregation,
    }, sort_keys=True, default=str).encode()
    key = hashlib.sha256(blob).hexdigest()[:12]
    path = cfg.cache_path("search", f"{key}.json")
    if store and path.exists():
        return SearchResult.from_dict(json.loads(path.read_text()))
    seeds = [results.sample_seed(cfg.seed, s) for s in samples.ids]
    candidates = Candidates(model, samples.images(), seeds, layers, cfg.pruner,
                            cfg.n_augmentations, cfg.augment)

    def score(group_schedule: dict[str, float]) -> dict[str, float]:
        schedule = {name: v for g, v in group_schedule.items() for name in group_map[g]}
        return schedule_score(candidates, samples, schedule, methods, aggregation,
                              method_options)

    def on_choice(group: str, value: float) -> None:
        candidates.release(group_map[group], keep=value)

    chosen, table = greedy_search(list(group_map), score, grid, progress, on_choice)
    schedule = {name: float(chosen[g]) for g, names in group_map.items() for name in names}
    final = table.loc[table["chosen"], "score"].iloc[-1]
    result = SearchResult(
        schedule, {g: float(v) for g, v in chosen.items()}, group_map, table, float(final), key,
        {"methods": methods, "aggregation": aggregation, "grid": list(grid),
         "samples": samples.ids, "rules": [r.name for r in samples.poisoned.rules],
         "solves": candidates.solves})
    if store:
        blob = json.dumps(result.to_dict(), indent=1, default=str).encode()
        atomic_write(path, lambda fh: fh.write(blob))
    return result


def tuning_model(cfg: Config, progress: bool = True) -> Any:
    """The model the sparsity search tunes on (a :class:`spade_lib.train.TrainResult`): the
    held-out model trained with ``cfg.tuning_rules``, or, when those are ``None`` (full-scale
    presets), the evaluated model ``trained_model(cfg)``, whose tuning samples then come from the
    training split (:func:`spade_lib.samples.tuning_samples`)."""
    from spade_lib.train import trained_model

    if cfg.tuning_rules is None:
        return trained_model(cfg, progress=progress)
    return trained_model(cfg.replace(rules=cfg.tuning_rules), progress=progress)


def search_methods(cfg: Config) -> list[str]:
    """The methods the search scores with: ``cfg.search_methods``, else ``cfg.methods``."""
    return list(cfg.search_methods if cfg.search_methods is not None else cfg.methods)


def search_digest(cfg: Config) -> str:
    """Hash of what a saved search depends on: the held-out model's training keys, the search
    keys, the tuning rules and samples, and the methods searched with (:func:`search_methods`;
    a changed preset invalidates it)."""
    from spade_lib.config import TRAINING_KEYS

    keys = (*TRAINING_KEYS, *SEARCH_KEYS, "tuning_rules", "tuning_samples", "methods")
    searched = cfg.replace(methods=search_methods(cfg), search_methods=None)
    return searched.digest(tuple(dict.fromkeys(keys)))


def saved_search(cfg: Config, progress: bool = True) -> tuple[SearchResult, dict[str, Any]]:
    """The search behind a preset: ``params/NAME-search.json`` if saved, else run it now.

    ``scripts/search.py NAME`` writes that file (with the held-out model's accuracy and the
    search time) so that a book build does not retrain the held-out model. It is used only while
    its ``digest`` equals :func:`search_digest` of ``cfg``. Otherwise the search runs here
    (training the held-out model if it is not cached). Returns the result and the
    record (``{"source": "saved" | "run now", ...}``).
    """
    from spade_lib.config import PARAMS_DIR

    path = PARAMS_DIR / f"{cfg.name}-search.json"
    if path.exists():
        record = json.loads(path.read_text())
        if record.get("digest") == search_digest(cfg):
            return SearchResult.from_dict(record["result"]), {"source": "saved",
                                                              "path": str(path), **record}
    held_out = tuning_model(cfg, progress)
    found = search_sparsity(cfg, held_out.model.to(cfg.torch_device()), progress=progress)
    return found, {"source": "run now", "held_out_model": {
        "clean_accuracy": held_out.clean_accuracy, "attack_success": held_out.attack_success,
        "train_seconds": held_out.seconds}}
