"""Chapter E's evaluation: gradient noise over the evaluation samples, dense and through SPADE
(Figure E.5).

The paper reports the mean cosine similarity between the gradients of 100 noisy copies of an image,
per layer, for the dense model and for the SPADE trace (0.7355 -> 0.7721 on average). The
measurement on one image is :func:`spade_lib.fidelity.gradient_noise`;
:func:`gradient_noise_rows` runs it on the evaluation samples (dense and SPADE, the same noise for
both), cached per sample under :func:`gradient_noise_key`, and :func:`gradient_noise_summary`,
:func:`gradient_noise_table` and :func:`gradient_noise_verdict` read the table. The paper's claim
is data here (:data:`PAPER_GRADIENT_COSINE`), and the verdict is computed from the numbers at one
standard error (:func:`spade_lib.tables.claim_verdict`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from torch import nn

from spade_lib import reproducibility, results
from spade_lib.checks import check_columns, check_noise, check_positive_int
from spade_lib.config import Config
from spade_lib.fidelity import (
    GRADIENT_NOISE_COLUMNS,
    PAPER_COPIES,
    SMOOTHGRAD_NOISE,
    gradient_noise,
)
from spade_lib.models import fingerprint as model_fingerprint
from spade_lib.samples import Samples, sample_seed
from spade_lib.schedules import pruned_layers
from spade_lib.store import ResultStore, key_hash, run_resumable
from spade_lib.tables import ALL_LAYERS, claim_verdict, layer_means, spread

__all__ = [
    "GRADIENT_COLUMNS", "PAPER_GRADIENT_COSINE", "gradient_noise_key", "gradient_noise_rows",
    "gradient_noise_summary", "gradient_noise_table", "gradient_noise_verdict",
]

PAPER_GRADIENT_COSINE = {"dense": 0.7355, "spade": 0.7721}
"""Figure E.5: the mean cosine similarity between the gradients of 100 noisy copies of an image,
averaged over layers and 100 ImageNet images (ResNet-50), dense and through SPADE."""

_VERSION = 1
"""Part of every cache key here: bump it when a computation below changes its numbers."""


GRADIENT_COLUMNS = ("sample", "rule_name", "target", "variant", *GRADIENT_NOISE_COLUMNS,
                    "config_hash")
"""Columns of :func:`gradient_noise_rows` (one row per sample, variant and layer)."""


def gradient_noise_key(cfg: Config, model: nn.Module, n_copies: int, noise: float,
                       rules: Sequence[str] = ()) -> str:
    """The hash that names a gradient-noise run's store: the trace settings of ``cfg`` (with
    ``sparsity``), the model's weights, the poisoned set's rule names, ``n_copies`` and
    ``noise``."""
    return key_hash({"what": "gradient-noise", "version": _VERSION,
                     "config": cfg.digest((*results.RESULT_KEYS, "sparsity")),
                     "model": model_fingerprint(model), "rules": list(rules),
                     "n_copies": int(n_copies), "noise": float(noise)})


def _gradient_sample(cfg: Config, model: nn.Module, samples: Samples, position: int,
                     layers: Sequence[str], n_copies: int, noise: float, key: str) -> pd.DataFrame:
    info = samples.table.iloc[position]
    sample, target = int(info["sample"]), int(info["target"])
    image = samples.poisoned.float_images([sample])[0]
    seed = sample_seed(cfg.seed, sample)
    spec = results.Variant("spade", cfg.sparsity)
    spade = results.variant_network(cfg, model, samples, position, spec)[0]
    parts = []
    for variant, net in (("dense", model), ("spade", spade)):
        part = gradient_noise(net, image, target, layers, n_copies, noise, seed)
        part.insert(0, "variant", variant)
        parts.append(part)
    rows = pd.concat(parts, ignore_index=True)
    rows.insert(0, "sample", sample)
    rows.insert(1, "rule_name", str(info["rule_name"]))
    rows.insert(2, "target", target)
    rows["config_hash"] = key
    return rows[list(GRADIENT_COLUMNS)]


def gradient_noise_rows(
    cfg: Config,
    model: nn.Module,
    samples: Samples,
    n_copies: int = PAPER_COPIES,
    noise: float = SMOOTHGRAD_NOISE,
    store: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """Figure E.5's numbers: :func:`spade_lib.fidelity.gradient_noise` of every sample, dense and
    through SPADE.

    SPADE is the runner's trace (:func:`spade_lib.results.variant_network` with
    ``cfg.sparsity``, ``cfg.pruner``, ``cfg.n_augmentations``, ``cfg.augment`` and the seed
    :func:`spade_lib.samples.sample_seed`), so it is the network chapter B explains. The layers
    are the input and every layer ``cfg.sparsity`` prunes; the target is the Trojan target; both
    networks see the same noisy copies (seeded by the sample's seed).

    Parameters
    ----------
    cfg, model
        The preset and its trained model (not changed).
    samples
        Evaluation samples (:func:`spade_lib.samples.evaluation_samples`).
    n_copies, noise
        See :func:`spade_lib.fidelity.gradient_noise`.
    store
        Keep each sample's rows in ``cfg.cache_path("fidelity", "gradient-noise", KEY)``
        (:func:`gradient_noise_key`), one file per sample: a rebuild recomputes nothing, an
        interrupted run continues. ``False``: compute everything, keep nothing.
    progress
        Show a progress bar over samples.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`GRADIENT_COLUMNS`, ordered by sample (as in ``samples``), variant
        (dense, spade) and position.
    """
    if not isinstance(samples, Samples) or len(samples) == 0:
        raise ValueError(f"samples must be a non-empty Samples object, got {samples!r}")
    n_copies = check_positive_int(n_copies, "n_copies")
    noise = check_noise(noise)
    layers = pruned_layers(model, cfg.sparsity)
    key = gradient_noise_key(cfg, model, n_copies, noise, [r.name for r in samples.poisoned.rules])
    target = ResultStore(cfg.cache_path("fidelity", "gradient-noise", key, "meta.json").parent,
                         typer=None, columns=GRADIENT_COLUMNS) if store else None
    if target is not None and target.read_meta() is None:
        target.write_meta({"key": key, "config": cfg.to_dict(), "n_copies": n_copies,
                           "noise": noise, "layers": layers, "model": model_fingerprint(model),
                           "numerics": reproducibility.settings()})
    return run_resumable(target, samples.ids, lambda position: _gradient_sample(
        cfg, model, samples, position, layers, n_copies, noise, key), progress)


def gradient_noise_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Figure E.5's bars: per variant and layer, the mean over samples of the mean pairwise
    cosine, its standard deviation (the paper's error bars), standard error and counts.

    The last rows (layer :data:`ALL_LAYERS`) average each sample's layers first (NaN where a
    layer is NaN, counted in ``n_nan``). Columns: ``variant``, ``layer``, ``position``, ``mean``,
    ``std``, ``se``, ``n``, ``n_nan``.
    """
    check_columns(rows, ("sample", "variant", "layer", "position", "cosine"),
                  "gradient_noise_rows()")
    out = []
    for (variant, layer, position), part in rows.groupby(["variant", "layer", "position"],
                                                          sort=False):
        out.append({"variant": variant, "layer": layer, "position": position,
                    **spread(part["cosine"])})
    last = int(rows["position"].max()) + 1
    for variant, part in layer_means(rows, ["sample"], "variant", "cosine").groupby(
            "variant", sort=False):
        out.append({"variant": variant, "layer": ALL_LAYERS, "position": last,
                    **spread(part["cosine"])})
    return pd.DataFrame(out).sort_values(["position", "variant"], kind="stable").reset_index(
        drop=True)


def gradient_noise_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Figure E.5 as a table: per layer (in order, then :data:`ALL_LAYERS`), the mean cosine of
    dense and SPADE over samples with their standard deviations, and the mean of the per-sample
    difference (SPADE minus dense) with its standard error over the ``n`` samples that have both.

    Columns: ``dense``, ``dense_std``, ``spade``, ``spade_std``, ``delta``, ``se``, ``n``.
    """
    summary = gradient_noise_summary(rows)
    per = rows.set_index(["sample", "layer", "variant"])["cosine"].unstack("variant")
    whole = layer_means(rows, ["sample"], "variant", "cosine").pivot(
        index="sample", columns="variant", values="cosine")
    out = []
    for layer in dict.fromkeys(summary["layer"]):
        pick = whole if layer == ALL_LAYERS else per.xs(layer, level="layer")
        mine = summary[summary["layer"] == layer].set_index("variant")
        diff = spread(pick["spade"] - pick["dense"])
        out.append({"layer": layer, "dense": mine.loc["dense", "mean"],
                    "dense_std": mine.loc["dense", "std"], "spade": mine.loc["spade", "mean"],
                    "spade_std": mine.loc["spade", "std"], "delta": diff["mean"],
                    "se": diff["se"], "n": diff["n"]})
    return pd.DataFrame(out).set_index("layer")


def gradient_noise_verdict(rows: pd.DataFrame,
                           paper: Mapping[str, float] = PAPER_GRADIENT_COSINE) -> dict[str, Any]:
    """Does SPADE make the gradients of noisy copies more alike, as in Figure E.5?

    The claim tested is the paper's direction, ``spade > dense`` for the mean cosine averaged
    over layers (the levels depend on the network and the noise scale; the paper's are
    ``paper["dense"] -> paper["spade"]``). ``delta`` is the mean over samples of the per-sample
    difference (SPADE minus dense, each averaged over layers), ``se`` its standard error; the
    verdict: "holds" when ``delta - se > 0``, "fails" when ``delta + se < 0``, else
    "inconclusive" ("not comparable" when no sample has every layer). The same test per layer gives
    ``layers_higher`` / ``layers_lower`` (layers where SPADE is above / below dense beyond one
    standard error) out of ``layers``.

    Returns
    -------
    dict
        ``dense``, ``spade``, ``delta``, ``se``, ``n``, ``verdict``, ``layers_higher``,
        ``layers_lower``, ``layers``, ``paper_dense``, ``paper_spade``, ``target_kept_dense``
        and ``target_kept_spade`` (share of noisy copies still predicting the target; NaN
        without that column), ``sentence`` (Markdown).
    """
    check_columns(rows, ("sample", "variant", "layer", "cosine"), "gradient_noise_rows()")
    variants = set(rows["variant"])
    if not {"dense", "spade"} <= variants:
        raise ValueError(f"the table needs variants 'dense' and 'spade', has {sorted(variants)}")
    per = rows.set_index(["sample", "layer", "variant"])["cosine"].unstack("variant")
    diff = (per["spade"] - per["dense"]).rename("delta").reset_index()
    means = layer_means(rows, ["sample"], "variant", "cosine").pivot(
        index="sample", columns="variant", values="cosine")
    total = spread(means["spade"] - means["dense"])
    verdict = claim_verdict(total["mean"], total["se"], 1.0)
    higher = lower = 0
    for _, part in diff.groupby("layer", sort=False):
        s = spread(part["delta"])
        v = claim_verdict(s["mean"], s["se"], 1.0)
        higher += v == "holds"
        lower += v == "fails"
    kept = rows.drop_duplicates(["sample", "variant"]).groupby("variant")["target_kept"].mean() \
        if "target_kept" in rows else pd.Series(math.nan, index=["dense", "spade"])
    out = {"dense": float(means["dense"].mean()), "spade": float(means["spade"].mean()),
           "target_kept_dense": float(kept["dense"]), "target_kept_spade": float(kept["spade"]),
           "delta": total["mean"], "se": total["se"], "n": total["n"], "verdict": verdict,
           "layers_higher": int(higher), "layers_lower": int(lower),
           "layers": int(diff["layer"].nunique()), "paper_dense": float(paper["dense"]),
           "paper_spade": float(paper["spade"])}
    out["sentence"] = _gradient_sentence(out)
    return out


def _gradient_sentence(v: Mapping[str, Any]) -> str:
    start = (f"The paper: with SPADE the mean cosine similarity rises from {v['paper_dense']:.4f} "
             f"to {v['paper_spade']:.4f}, at every layer. Here (averaged over layers, "
             f"{v['n']} samples): dense {v['dense']:.4f}, SPADE {v['spade']:.4f}, difference "
             f"**{v['delta']:+.4f} +- {v['se']:.4f}**")
    meaning = {
        "holds": "SPADE's gradients are more alike at one standard error: the claim **holds**",
        "fails": "SPADE's gradients are less alike at one standard error: the claim **fails**",
        "inconclusive": "one standard error reaches across zero: **inconclusive**",
        "not comparable": "no sample has a cosine at every layer: **not comparable**",
    }[v["verdict"]]
    text = (f"{start}; {meaning}. Per layer, SPADE is higher beyond one standard error at "
            f"{v['layers_higher']} of {v['layers']} layers and lower at {v['layers_lower']}.")
    if not math.isnan(v["target_kept_dense"]):
        text += (f" The noisy copies keep the target prediction {v['target_kept_dense']:.0%} of "
                 f"the time on the dense model and {v['target_kept_spade']:.0%} through SPADE.")
    return text


