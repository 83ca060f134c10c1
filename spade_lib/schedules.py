"""Which layers SPADE prunes and how sparse each one becomes.

:func:`default_layers` is the paper's choice (every Conv2d and Linear but the stem and grouped
convs), :func:`select_layers` picks layers by name patterns, and :func:`resolve_sparsity` turns a
sparsity spec into a per-layer target (:func:`pruned_layers` names those above 0): a float, a dict
of layer names or block prefixes,
:func:`linear` (the paper's schedule rising over the layers), :func:`only` (Table D.13) or one of
the config strings ``"linear"``, ``"linear:FIRST:LAST"`` and ``"only:PREFIX[,PREFIX...]:S"``
(:func:`parse_spec`, also what :mod:`spade_lib.config` checks the ``sparsity`` key with).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = [
    "LinearSchedule", "OnlyBlocks", "SparsitySpec", "check_sparsity", "default_layers",
    "get_layers", "is_prunable", "linear", "only", "parse_spec", "prunable_layers",
    "pruned_layers", "resolve_sparsity", "select_layers",
]


def check_sparsity(sparsity: Any, what: str = "sparsity") -> float:
    """``sparsity`` as a float, checked to be a number in ``[0, 1)``.

    ``what`` names the value in the error. Raises ``ValueError`` (bools, non-numbers, NaN and
    values outside the range are refused).
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ValueError(f"{what} must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"{what} {sparsity!r} is outside the allowed range [0, 1)")
    return float(sparsity)


def is_prunable(module: nn.Module) -> bool:
    """Whether SPADE can prune ``module``: a Linear, or a Conv2d with ``groups == 1``."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def get_layers(model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Module]:
    """The modules of ``model`` named ``layers``, as ``{name: module}`` in the given order.

    Raises ``ValueError`` naming the valid layers if a name is unknown or not a Conv2d
    (``groups == 1``) / Linear module, ``TypeError`` if ``layers`` is a single string.
    """
    if isinstance(layers, str):
        raise TypeError(f"layers must be a sequence of names, not the string {layers!r}")
    named = dict(model.named_modules())
    valid = [n for n, m in named.items() if is_prunable(m)]
    out = {}
    for name in layers:
        if name not in named or not is_prunable(named[name]):
            what = ("unknown layer" if name not in named
                    else "layer is not a Conv2d (groups=1) or Linear")
            raise ValueError(f"{what}: {name!r}; valid layers: {', '.join(valid)}")
        out[name] = named[name]
    return out


def prunable_layers(model: nn.Module) -> list[str]:
    """Names of all Conv2d (``groups == 1``) and Linear modules, in module order."""
    return [name for name, m in model.named_modules() if is_prunable(m)]


def default_layers(model: nn.Module) -> list[str]:
    """The paper's default: every Conv2d and Linear except the stem and grouped convs.

    The stem is the first Conv2d in module order; depthwise and other grouped convs are skipped.
    """
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    stem = convs[0] if convs else None
    return [name for name in prunable_layers(model) if name != stem]


def select_layers(model: nn.Module, patterns: str | Sequence[str]) -> list[str]:
    """Prunable layers whose names match any of the fnmatch-style ``patterns``, in module order.

    A pattern that matches no prunable layer is an error that lists the valid names.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    valid = prunable_layers(model)
    if not isinstance(patterns, Iterable) or not (patterns := list(patterns)):
        raise ValueError(f"layers must be a name or pattern, or a non-empty sequence of them, got "
                         f"{patterns!r}; valid layers: {', '.join(valid)}")
    for p in patterns:
        if not isinstance(p, str) or not fnmatch.filter(valid, p):
            raise ValueError(f"layer pattern {p!r} matches no Conv2d (groups=1) or Linear layer; "
                             f"valid layers: {', '.join(valid)}")
    return [name for name in valid if any(fnmatch.fnmatchcase(name, p) for p in patterns)]


@dataclass(frozen=True)
class LinearSchedule:
    """Sparsity rising linearly from ``first`` (first pruned layer) to ``last`` (last one)."""

    first: float = 0.0
    last: float = 0.99


@dataclass(frozen=True)
class OnlyBlocks:
    """Prune only the layers under the given name prefixes (Table D.13); the others stay dense."""

    blocks: tuple[str, ...]
    sparsity: float


SparsitySpec = float | Mapping[str, float] | LinearSchedule | OnlyBlocks | str


def linear(first: float = 0.0, last: float = 0.99) -> LinearSchedule:
    """The paper's linear schedule over the pruned layers in network order (0 to 0.99)."""
    return LinearSchedule(check_sparsity(first, "first"), check_sparsity(last, "last"))


def only(blocks: str | Sequence[str], sparsity: float) -> OnlyBlocks:
    """Prune only layers whose names are, or start with, ``block + "."`` for a given block."""
    blocks = (blocks,) if isinstance(blocks, str) else tuple(blocks)
    if not blocks:
        raise ValueError("only() needs at least one block name prefix")
    return OnlyBlocks(blocks, check_sparsity(sparsity))


def parse_spec(spec: str) -> SparsitySpec:
    """Parse the config strings ``linear``, ``linear:FIRST:LAST`` and ``only:P[,P...]:S``.

    Returns the :class:`LinearSchedule` or :class:`OnlyBlocks` the string stands for. Raises
    ``ValueError`` for an unknown form or a number that is not a sparsity in ``[0, 1)``. This is
    the one parser of these strings: :func:`resolve_sparsity` and the config check use it.
    """
    parts = spec.split(":")
    try:
        if parts[0] == "linear" and len(parts) == 1:
            return linear()
        if parts[0] == "linear" and len(parts) == 3:
            return linear(float(parts[1]), float(parts[2]))
        if parts[0] == "only" and len(parts) == 3 and parts[1]:
            return only(parts[1].split(","), float(parts[2]))
    except ValueError as e:
        raise ValueError(f"bad sparsity spec {spec!r}: {e}") from None
    raise ValueError(f"unknown sparsity spec {spec!r}; allowed: a float in [0, 1), 'linear', "
                     "'linear:FIRST:LAST', 'only:PREFIX[,PREFIX...]:S', a dict, linear(), only()")


def resolve_sparsity(
    model: nn.Module, spec: SparsitySpec, layers: Sequence[str] | None = None,
) -> dict[str, float]:
    """Per-layer target sparsity for ``layers`` (default :func:`default_layers`), in order.

    ``spec`` is a float (every layer), a dict whose keys are layer names or block prefixes (a
    layer takes the value of the longest key it equals or starts with followed by a dot, e.g.
    ``{"layers.3": 0.9, "fc": 0.9}``; layers no key covers get 0, i.e. stay dense; a key covering
    no layer is an error listing the valid ones), :func:`linear`,
    :func:`only` or one of the config strings ``"linear"``, ``"linear:FIRST:LAST"``,
    ``"only:PREFIX[,PREFIX...]:S"``. With a single layer, ``linear`` gives it ``last``.
    """
    layers = default_layers(model) if layers is None else list(layers)
    get_layers(model, layers)
    if isinstance(spec, str):
        spec = parse_spec(spec)
    if isinstance(spec, LinearSchedule):
        n = len(layers)
        step = (spec.last - spec.first) / (n - 1) if n > 1 else 0.0
        start = spec.first if n > 1 else spec.last
        return {name: start + step * i for i, name in enumerate(layers)}
    if isinstance(spec, OnlyBlocks):
        for b in spec.blocks:
            if not any(name == b or name.startswith(b + ".") for name in layers):
                raise ValueError(f"block {b!r} contains none of the pruned layers; "
                                 f"valid layers: {', '.join(layers)}")
        return {name: spec.sparsity if any(name == b or name.startswith(b + ".")
                                           for b in spec.blocks) else 0.0 for name in layers}
    if isinstance(spec, Mapping):
        def covers(key: str, name: str) -> bool:
            return name == key or name.startswith(key + ".")

        unknown = [k for k in spec if not isinstance(k, str)
                   or not any(covers(k, name) for name in layers)]
        if unknown:
            raise ValueError(f"unknown layer(s) in sparsity dict: {', '.join(map(repr, unknown))}; "
                             f"keys are layer names or block prefixes of: {', '.join(layers)}")
        out = {}
        for name in layers:
            hits = [k for k in spec if covers(k, name)]
            key = max(hits, key=len) if hits else None
            out[name] = 0.0 if key is None else check_sparsity(spec[key], f"sparsity of {key!r}")
        return out
    value = check_sparsity(spec)
    return dict.fromkeys(layers, value)


def pruned_layers(model: nn.Module, sparsity: SparsitySpec) -> list[str]:
    """The layers that ``sparsity`` prunes (:func:`resolve_sparsity` above 0), in model order."""
    return [n for n, s in resolve_sparsity(model, sparsity).items() if s > 0]
