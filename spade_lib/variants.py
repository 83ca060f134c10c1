"""Variants: the networks an evaluation sample is explained with.

A :class:`Variant` says how the explained network is obtained: the dense model, or a SPADE trace
with a sparsity schedule whose Hessians come from a sample source (:mod:`spade_lib.sources`:
the sample itself, another image, many images), with optional overrides of the augmentation
recipe, the number of views, the solver and its options. :func:`resolve_variants` checks a run's
variants against the model; :func:`variant_network` makes one sample's network;
:func:`main_variants` are chapter B's. The runner (:mod:`spade_lib.results`) re-exports them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from spade_lib import pruning, schedules, sources
from spade_lib.augment import check_recipe
from spade_lib.checks import check_positive_int
from spade_lib.config import Config
from spade_lib.samples import Samples, sample_seed
from spade_lib.trace import trace, trace_images

__all__ = ["BUILTIN_VARIANTS", "TRACE_BATCH", "Variant", "main_variants", "resolve_variants",
           "variant_network"]

TRACE_BATCH = 256
"""Forward batch size of the augmented views in every trace (a fixed value, so that the search's
Hessians are bit-identical to the runner's)."""

BUILTIN_VARIANTS = ("dense", "spade", "isd", "ist", "isc", "mst", "msc", "msd")


@dataclass(frozen=True)
class Variant:
    """One way of obtaining the network that is explained.

    Attributes
    ----------
    name
        Label in the results table.
    sparsity
        ``None`` for the dense model, else a SPADE schedule (anything
        :func:`spade_lib.schedules.resolve_sparsity` takes: a float, ``"linear"``,
        ``"linear:A:B"``, ``"only:P[,P]:S"``, a dict of layer names, ...).
    other_image
        The ISD control (the same as ``source="ISD"``): the Hessians come from a random clean test
        image of another class (:func:`isd_donor`) instead of the sample, with the same
        augmentation seed.
    source
        Where the Hessians come from, a key of :data:`spade_lib.sources.SOURCES` (Table D.11):
        ``"ISI"`` (the sample, SPADE), ``"IST"``, ``"ISC"``, ``"ISD"`` (one other image,
        augmented) or ``"MST"``, ``"MSC"``, ``"MSD"`` (many training images, not augmented).
    recipe
        Augmentation recipe of the trace (:func:`spade_lib.augment.recipe_components`, e.g.
        ``"J+G+RC"``); ``None``: the config's ``augment``.
    n_augmentations
        Augmented views of the trace; ``None``: the config's ``n_augmentations``.
    images
        Images per many-image source (the paper's 10240 by default; a group with fewer uses all).
    pruner
        The solver of the trace (:data:`spade_lib.pruning.SOLVERS`); ``None``: the config's.
    pruner_options
        Options of the solver (:func:`spade_lib.pruning.prune_layer`: ``damp``, ``mask_group``,
        ``block_size``), e.g. ``{"mask_group": "row"}``; ``None``: its defaults.

    Raises
    ------
    ValueError
        An unknown source or recipe, a bad count, ``other_image`` with a source other than ISD, or
        options without a sparsity to prune with.
    """

    name: str
    sparsity: schedules.SparsitySpec | None = None
    other_image: bool = False
    source: str = "ISI"
    recipe: str | None = None
    n_augmentations: int | None = None
    images: int = sources.PAPER_IMAGES
    pruner: str | None = None
    pruner_options: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        sources.check_source(self.source)
        if self.other_image and self.source not in ("ISI", "ISD"):
            raise ValueError(f"variant {self.name!r}: other_image means source 'ISD', but source "
                             f"is {self.source!r}")
        object.__setattr__(self, "other_image", self.other_image or self.source == "ISD")
        object.__setattr__(self, "source", "ISD" if self.other_image else self.source)
        if self.recipe is not None:
            check_recipe(self.recipe)
        if self.n_augmentations is not None:
            check_positive_int(self.n_augmentations, f"variant {self.name!r}: n_augmentations")
        check_positive_int(self.images, f"variant {self.name!r}: images")
        if self.pruner is not None or self.pruner_options is not None:
            try:
                pruning.check_method(self.pruner or "fastobc", dict(self.pruner_options or {}))
            except ValueError as e:
                raise ValueError(f"variant {self.name!r}: {e}") from None
        options = (self.source != "ISI", self.recipe is not None,
                   self.n_augmentations is not None, self.pruner is not None,
                   self.pruner_options is not None)
        if self.sparsity is None and any(options):
            raise ValueError(f"variant {self.name!r}: source, recipe, n_augmentations, pruner "
                             "and pruner_options need a sparsity to prune with")

    def describe(self) -> dict[str, Any]:
        """A JSON-able description (for hashing and the store's metadata).

        Options at their defaults are left out, so adding options did not change the hash of the
        variants that existed before them.
        """
        spec = self.sparsity
        if dataclasses.is_dataclass(spec):
            spec = {"type": type(spec).__name__, **dataclasses.asdict(spec)}
        elif isinstance(spec, Mapping):
            spec = {str(k): float(v) for k, v in spec.items()}
        out: dict[str, Any] = {"name": self.name, "sparsity": spec,
                               "other_image": self.other_image}
        if self.source not in ("ISI", "ISD"):
            out["source"] = self.source
        if self.source in sources.MANY:
            out["images"] = self.images
        if self.recipe is not None:
            out["recipe"] = self.recipe
        if self.n_augmentations is not None:
            out["n_augmentations"] = self.n_augmentations
        if self.pruner is not None:
            out["pruner"] = self.pruner
        if self.pruner_options is not None:
            out["pruner_options"] = dict(self.pruner_options)
        return out


def resolve_variants(cfg: Config, model: nn.Module,
                     variants: Sequence[str | Variant] | Mapping[str, Any]) -> list[Variant]:
    """Turn variant names and specs into :class:`Variant` objects, checking them first.

    Parameters
    ----------
    cfg
        Gives ``cfg.sparsity`` for the built-in names.
    model
        Sparsity specs are resolved against its layers (unknown layer names are errors).
    variants
        A sequence of built-in names (``"dense"``, ``"spade"``: ``cfg.sparsity``, ``"isd"``:
        ``cfg.sparsity`` with Hessians from another image; ``"ist"``, ``"isc"``, ``"mst"``,
        ``"msc"``, ``"msd"``: the other sample sources of Table D.11, see
        :data:`spade_lib.sources.SOURCES`) and :class:`Variant` objects, or a
        mapping of names to sparsity specs (``None`` is dense), e.g.
        ``{"dense": None, "spade": 0.9, "spade-linear": "linear:0:0.99"}``.
    """
    builtin = {"dense": Variant("dense"), "spade": Variant("spade", cfg.sparsity),
               "isd": Variant("isd", cfg.sparsity, other_image=True),
               **{s.lower(): Variant(s.lower(), cfg.sparsity, source=s)
                  for s in sources.SOURCES if s not in ("ISI", "ISD")}}
    out: list[Variant] = []
    if isinstance(variants, Mapping):
        for name, spec in variants.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"variant names must be non-empty strings, got {name!r}")
            if isinstance(spec, Variant):
                out.append(dataclasses.replace(spec, name=name))
            else:
                out.append(Variant(name, spec))
    elif isinstance(variants, (str, bytes)) or not isinstance(variants, Sequence):
        raise ValueError(f"variants must be a sequence of names/Variant objects or a mapping of "
                         f"names to sparsity specs, got {variants!r}")
    else:
        for v in variants:
            if isinstance(v, Variant):
                out.append(v)
            elif v in builtin:
                out.append(builtin[v])
            else:
                raise ValueError(f"unknown variant {v!r}; allowed names: "
                                 f"{', '.join(BUILTIN_VARIANTS)}, a Variant, or a mapping of "
                                 "names to sparsity specs such as {'spade-linear': 'linear'}")
    if not out:
        raise ValueError("at least one variant is needed")
    names = [v.name for v in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate variant names {dupes}; names must be unique")
    for v in out:
        if v.sparsity is None:
            if v.other_image:
                raise ValueError(f"variant {v.name!r}: other_image needs a sparsity to prune with")
            continue
        try:
            targets = schedules.resolve_sparsity(model, v.sparsity)
        except (ValueError, TypeError) as e:
            raise ValueError(f"variant {v.name!r}: {e}") from None
        if not any(s > 0 for s in targets.values()):
            raise ValueError(f"variant {v.name!r}: sparsity {v.sparsity!r} prunes no layer; use "
                             "None for the dense model")
    return out


def main_variants(cfg: Config) -> dict[str, Variant]:
    """The variants of chapter B's main table (Table B.2 with its controls), by name.

    ``dense``, ``spade`` (``cfg.sparsity``), ``spade-linear`` (the linear schedule of Table D.14)
    and ``isd`` (Table D.11's control). Every chapter that reuses those rows asks for exactly
    these, so their store (:func:`results_key`) is the one chapter B filled.
    """
    return {"dense": Variant("dense"), "spade": Variant("spade", cfg.sparsity),
            "spade-linear": Variant("spade-linear", "linear"),
            "isd": Variant("isd", cfg.sparsity, other_image=True)}


def variant_network(cfg: Config, model: nn.Module, samples: Samples, position: int,
                    variant: Variant, shared: dict[Any, tuple[nn.Module, float]] | None = None,
                    ) -> tuple[nn.Module, float, int]:
    """The network that explains sample ``position`` under ``variant``.

    Returns ``(network, trace_seconds, donor)``: ``model`` itself for the dense variant, else a
    pruned copy traced with the sample's seed on the views ``variant.source`` names
    (:mod:`spade_lib.sources`): the sample's own augmented views (ISI), another image's (IST,
    ISC, ISD: ``donor`` is its test index, else -1), or many training images (MST, MSC, MSD).
    A many-image network is the same for every sample of its group; pass a dict as ``shared``
    to compute it once per group (its ``trace_seconds`` are those of that one trace).
    """
    if variant.sparsity is None:
        return model, 0.0, -1
    if variant.source in sources.MANY:
        group, images = sources.many_images(cfg, samples, position, variant.source,
                                            variant.images)
        key = (variant.name, group)
        if shared is None or key not in shared:
            result = trace_images(model, images, sparsity=variant.sparsity,
                                  pruner=variant.pruner or cfg.pruner, batch_size=TRACE_BATCH,
                                  **dict(variant.pruner_options or {}))
            found = (result.model, result.timings["total"])
            if shared is None:
                return (*found, -1)
            shared[key] = found
        return (*shared[key], -1)
    seed = sample_seed(cfg.seed, int(samples.table.iloc[position]["sample"]))
    source, donor = sources.single_image(samples, position, variant.source, seed)
    result = trace(model, source, sparsity=variant.sparsity, pruner=variant.pruner or cfg.pruner,
                   n_augmentations=variant.n_augmentations or cfg.n_augmentations,
                   recipe=variant.recipe or cfg.augment, batch_size=TRACE_BATCH, seed=seed,
                   **dict(variant.pruner_options or {}))
    return result.model, result.timings["total"], donor
