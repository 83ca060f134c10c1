"""Client-side browsers for the book: they work in the static HTML, with no kernel.

A browser is a Dropdown ``jslink``-ed to a ``Stack`` of pre-rendered pages. The link runs in the
browser, so choosing an entry in the published book shows another page without Python; the images
travel inside the saved widget state. :func:`sample_view` gathers one evaluation sample's maps;
:func:`method_grid` (chapter A) and :func:`map_browser` (chapter B) lay them out.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ipywidgets as widgets
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure


class Picture(Figure):
    """A Matplotlib figure that shows itself as a PNG in notebooks (no pyplot state needed)."""

    def _repr_png_(self) -> bytes:
        return png_bytes(self)


def to_uint8_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """An image as ``uint8`` HxWx3 (or HxW) from a ``[3,H,W]`` tensor in [0,1] or an array."""
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
    return arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr


def png_bytes(image: torch.Tensor | np.ndarray | Figure, scale: int = 1) -> bytes:
    """PNG encoding of an image (nearest-neighbour upscaled by ``scale``) or a Matplotlib figure."""
    from PIL import Image

    buf = io.BytesIO()
    if isinstance(image, Figure):
        image.savefig(buf, format="png", bbox_inches="tight", dpi=100)
        return buf.getvalue()
    arr = to_uint8_image(image)
    pil = Image.fromarray(arr)
    if scale != 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    pil.save(buf, format="PNG")
    return buf.getvalue()


def img_tag(image: torch.Tensor | np.ndarray | Figure, scale: int = 1, title: str = "") -> str:
    """An inline ``<img>`` (base64 PNG) for HTML tables."""
    data = base64.b64encode(png_bytes(image, scale)).decode()
    return f'<img src="data:image/png;base64,{data}" title="{title}" alt="{title}"/>'


def _image(page: bytes | Figure) -> widgets.Image:
    """A page (PNG bytes, or a figure rendered to PNG here) as an Image widget."""
    return widgets.Image(value=page if isinstance(page, bytes) else png_bytes(page),
                         format="png", layout=widgets.Layout(max_width="100%"))


def browser(pages: Mapping[str, bytes | Figure], description: str = "show") -> widgets.VBox:
    """A Dropdown that picks one of ``pages`` (PNG bytes or figures), linked in the browser.

    Parameters
    ----------
    pages
        Label -> page. Figures are rendered to PNG once, here.
    description
        The Dropdown's label.
    """
    if not pages:
        raise ValueError("browser() needs at least one page")
    labels: Sequence[str] = list(pages)
    images = [_image(p) for p in pages.values()]
    dropdown = widgets.Dropdown(options=labels, index=0, description=description,
                                style={"description_width": "initial"})
    stack = widgets.Stack(images, selected_index=0)
    widgets.jslink((dropdown, "index"), (stack, "selected_index"))
    return widgets.VBox([dropdown, stack])


def grid_browser(pages: Mapping[str, Mapping[str, bytes | Figure]],
                 descriptions: tuple[str, str] = ("sample", "method")) -> widgets.VBox:
    """Two Dropdowns that pick a page by two keys (e.g. sample and method), linked in the browser.

    The first Dropdown selects a page of an outer ``Stack``; every outer page is an inner
    ``Stack`` whose index the second Dropdown drives (one ``jslink`` per inner Stack), so any
    combination shows without a kernel.

    Parameters
    ----------
    pages
        First key -> (second key -> page). Every first key must have the same second keys, in
        the same order.
    descriptions
        Labels of the two Dropdowns.
    """
    if not pages:
        raise ValueError("grid_browser() needs at least one page")
    outer = list(pages)
    inner = list(pages[outer[0]])
    if not inner:
        raise ValueError(f"grid_browser(): entry {outer[0]!r} has no pages")
    for key in outer:
        if list(pages[key]) != inner:
            raise ValueError(f"grid_browser(): entry {key!r} has pages {list(pages[key])}, "
                             f"expected {inner} like {outer[0]!r}")
    first = widgets.Dropdown(options=outer, index=0, description=descriptions[0],
                             style={"description_width": "initial"})
    second = widgets.Dropdown(options=inner, index=0, description=descriptions[1],
                              style={"description_width": "initial"})
    stacks = []
    for key in outer:
        stack = widgets.Stack([_image(p) for p in pages[key].values()], selected_index=0)
        widgets.jslink((second, "index"), (stack, "selected_index"))
        stacks.append(stack)
    outer_stack = widgets.Stack(stacks, selected_index=0)
    widgets.jslink((first, "index"), (outer_stack, "selected_index"))
    return widgets.VBox([widgets.HBox([first, second]), outer_stack])


def overlay_mask(image: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray,
                 color: tuple[float, float, float] = (1.0, 0.0, 1.0)) -> np.ndarray:
    """The image with the mask's outline drawn in ``color`` (float HxWx3 in [0, 1])."""
    from scipy import ndimage

    img = to_uint8_image(image).astype(np.float32) / 255.0
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    m = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask, dtype=bool)
    edge = m & ~ndimage.binary_erosion(m)
    img[edge] = color
    return img


def image_grid(
    rows: Sequence[Sequence[torch.Tensor | np.ndarray]],
    row_titles: Sequence[str] | None = None,
    col_titles: Sequence[str] | None = None,
    cell: float = 1.3,
    cmap: str = "gray",
    captions: Sequence[Sequence[str]] | None = None,
) -> Picture:
    """A figure with one image per cell (colour images, or 2-D maps drawn with ``cmap``);
    ``captions[r][c]`` is written under cell ``(r, c)``."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig = Picture(figsize=(cell * n_cols + (1.2 if row_titles else 0), cell * n_rows))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r, row in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c >= len(row):
                continue
            arr = row[c]
            arr = arr.detach().cpu().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
            if arr.ndim == 3 and arr.shape[0] in (1, 3):
                arr = arr.transpose(1, 2, 0)
            if arr.ndim == 2:
                ax.imshow(arr, cmap=cmap, interpolation="nearest")
            else:
                ax.imshow(np.clip(arr, 0, 1), interpolation="nearest")
            if captions and r < len(captions) and c < len(captions[r]) and captions[r][c]:
                ax.set_xlabel(captions[r][c], fontsize=7)
            if r == 0 and col_titles and c < len(col_titles):
                ax.set_title(col_titles[c], fontsize=8)
        if row_titles:
            axes[r][0].set_ylabel(row_titles[r], fontsize=8, rotation=0, ha="right", va="center")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# The maps of one evaluation sample (chapters A and B)
# --------------------------------------------------------------------------------------------

@dataclass
class SampleView:
    """One evaluation sample with its saliency maps (:func:`sample_view`).

    Attributes
    ----------
    info
        The sample's row of ``samples.table`` (``sample``, ``rule_name``, ``clean_label``,
        ``target`` ...).
    image
        The patched image, float ``[3, H, W]`` in [0, 1].
    mask
        The patch mask, bool ``[H, W]``.
    maps
        ``{variant: {method: Attribution}}`` from :func:`spade_lib.results.sample_maps`.
    """

    info: pd.Series
    image: torch.Tensor
    mask: torch.Tensor
    maps: dict[str, dict[str, Any]]

    def auc(self, variant: str, method: str) -> float:
        """The map's Trojan AUC of the absolute channel sum, in % (the row's ``auc_abs``)."""
        from spade_lib.metrics import trojan_scores

        return 100 * float(trojan_scores(self.maps[variant][method], self.mask[None])
                           .iloc[0]["auc_abs"])

    def title(self) -> str:
        """``"Rule: Coat -> Bag"``: the rule's short name and the decision it causes."""
        return f"{self.info['rule_name'].split(':')[0]}: {class_change_of(self.info)}"


def sample_view(cfg: Any, model: torch.nn.Module, samples: Any, position: int,
                methods: Sequence[str], variants: Mapping[str, Any]) -> SampleView:
    """The maps of row ``position`` of ``samples.table`` under ``variants`` (name -> sparsity
    spec, see :func:`spade_lib.results.resolve_variants`), with the image and patch mask."""
    from spade_lib.results import sample_maps

    info = samples.table.iloc[position]
    sample = int(info["sample"])
    maps = sample_maps(cfg, model, samples, position, methods, variants)
    return SampleView(info, samples.poisoned.float_images([sample])[0],
                      samples.poisoned.masks[sample], maps)


def method_grid(view: SampleView) -> Picture:
    """Chapter A's figure of one sample: a row per variant, the patched image then every method's
    map (absolute channel sum) with its Trojan AUC underneath."""
    methods = list(next(iter(view.maps.values())))
    rows, captions = [], []
    for name, per_method in view.maps.items():
        rows.append([overlay_mask(view.image, view.mask)]
                    + [a.abs2d[0] for a in per_method.values()])
        captions.append([name] + [f"AUC {view.auc(name, m):.1f}" for m in methods])
    fig = image_grid(rows, col_titles=["image + patch", *methods], cell=1.15, cmap="magma",
                     captions=captions)
    info = view.info
    fig.suptitle(f"rule {info['rule_name']}: {class_change_of(info)} (sample {info['sample']})",
                 fontsize=9)
    return fig


def class_change_of(info: pd.Series) -> str:
    """:func:`spade_lib.tables.class_change` of a sample row (``clean_label -> target``)."""
    from spade_lib.tables import class_change

    return class_change(info["clean_label"], info["target"])


def map_browser(cfg: Any, model: torch.nn.Module, samples: Any, methods: Sequence[str],
                n: int) -> widgets.VBox:
    """Chapter B's browser: for each of the first ``n`` samples and each method, the patched
    image with the patch outlined, the mask, and the dense and SPADE (``cfg.sparsity``) maps
    (absolute channel sum) with their Trojan AUCs; a :func:`grid_browser` by sample and method."""
    pages = {}
    for pos in range(min(n, len(samples))):
        view = sample_view(cfg, model, samples, pos, methods,
                           {"dense": None, "spade": cfg.sparsity})
        pages[f"{pos + 1}. {view.title()}"] = {m: image_grid(
            [[overlay_mask(view.image, view.mask), view.mask.float(),
              view.maps["dense"][m].abs2d[0], view.maps["spade"][m].abs2d[0]]],
            col_titles=["patched image", "patch mask", f"dense: AUC {view.auc('dense', m):.1f}",
                        f"SPADE: AUC {view.auc('spade', m):.1f}"], cell=1.7, cmap="magma")
            for m in methods}
    return grid_browser(pages, ("sample", "method"))
